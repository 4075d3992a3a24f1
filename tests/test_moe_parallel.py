"""Expert parallelism: the RNTP loss hook's loss, metrics and gradients of one step (with the load-balancing aux
loss on) are the same at EP2 (over two DP ranks) and at TP2 (sequence parallel) x EP2 x DP2 as in one process at
EP1, float32 on gloo, and the aux loss is logged. Experts are compared by global expert number (EP rank r holds r * E/EP + j)."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks
from rntp_megatron.model.hf_mapping import split_tp_shard
from tests.test_rl_loss_parallel import RTOL, loss_step

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MICRO = 4  # rows per micro-batch at every layout: the aux loss is per micro-batch, so its tokens must match


def run_layout(rank: int, world: int, parallel: dict, ckpt: str, save: bool) -> dict:
    """One forward/backward of the RNTP loss at a layout; metrics and this rank's grads by global name."""
    from rntp_megatron.config import build_config
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "tiny_qwen3_moe", "moe_aux_loss_coeff": 0.01}, "parallel": parallel,
                        "rl": {"objective": "ntp"},  # the model only: loss_step builds the RNTP loss from RL
                        "reward": {"ntp_weight": 0.5}})
    init_distributed(cfg.parallel, seed=1234)
    try:
        return loss_step(cfg, ckpt, save, MICRO)
    finally:
        destroy_distributed()


def test_expert_parallel_loss_and_grads_match_ep1(tmp_path):
    (tmp_path / "weights").mkdir()
    ckpt = str(tmp_path / "weights")
    (ref,) = run_ranks(run_layout, 1, args=({}, ckpt, True))
    assert ref["metrics"]["moe_load_balancing_loss"] > 0
    assert sum(1 for n in ref["grads"] if ".mlp.experts." in n) == 2 * 8 * 2  # layers x experts x (fc1, fc2)
    tp2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    for world, parallel in ((2, {"expert_model_parallel_size": 2}), (4, {"expert_model_parallel_size": 2, **tp2})):
        for rank, res in enumerate(run_ranks(run_layout, world, args=(parallel, ckpt, False))):
            what = f"{parallel} rank {rank}"
            for name in ("loss", "pg_loss", "ntp_loss", "kl", "entropy", "moe_load_balancing_loss"):
                a, b = res["metrics"][name], ref["metrics"][name]
                assert abs(a - b) <= RTOL * max(abs(b), 1e-6), f"{what}: metric {name} {a} vs EP1 {b}"
            assert sum(1 for n in res["grads"] if ".mlp.experts." in n) == 2 * 8 * 2 // 2  # half the experts
            for name, (grad, dim) in res["grads"].items():
                full = ref["grads"][name][0]
                expected = full if dim is None else split_tp_shard(name, full, res["tp"], res["tp_rank"])
                err = ((grad - expected).norm() / expected.norm().clamp(min=1e-12)).item()
                assert err <= RTOL, f"{what}: grad {name} relative error {err:.2e}"


def _scored_stream(rank: int, world: int, parallel: dict, ckpt: str, data: str, dp_ranks: list[int]) -> list:
    """Episodes of entropy-selected sites from this rank's (or, at EP1 in one process, each of dp_ranks') share
    of the documents, twice 4 of them; the proxy's arrays of every score call; weights saved (EP1) or loaded."""
    from megatron.core import dist_checkpointing

    from rntp_megatron.config import build_config
    from rntp_megatron.data.proxy import ProxyScorer
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.data.tokenizer import tokenizer_for
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "tiny_qwen3_moe", "vocab_size": 262}, "parallel": parallel,
                        "data": {"sources": [{"kind": "jsonl", "path": data}], "shard_bytes": 300,
                                 "context_len": 24, "min_context": 8, "site_selection": "entropy",
                                 "entropy_threshold": 1.0},
                        "checkpoint": {"load": ckpt}})  # what makes the reference the scorer in a run
    init_distributed(cfg.parallel, seed=1234)
    try:
        model = build_model(cfg.model, cfg.parallel)
        if parallel:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        else:
            dist_checkpointing.save(model.sharded_state_dict(), ckpt)
        model.eval()
        tokenizer = tokenizer_for(cfg.data)
        out = []
        for dp_rank in dp_ranks or [rank]:
            scorer = ProxyScorer(model, tokenizer.vocab_size, cfg.data.entropy_top_k, tokenizer.pad_id, 2)
            calls, score = [], scorer.score
            scorer.score = lambda chunks: calls.append(score(chunks)) or calls[-1]  # records, then returns
            stream = EpisodeStream(cfg.data, tokenizer, dp_rank, 2, scorer=scorer)
            episodes = [(ep.prompt_ids, ep.continuation_ids) for _ in range(2) for ep in stream.take(4)]
            out.append({"episodes": episodes, "calls": calls})
        return out
    finally:
        destroy_distributed()


def test_expert_parallel_ranks_score_their_own_documents_in_step(tmp_path):
    """Entropy site selection at EP2: the two data-parallel ranks read different documents (different numbers
    of chunks and score calls), yet the MoE proxy's forwards (collectives of the EP group) stay in step: no
    hang, and each rank's arrays and episodes are those its documents get at EP1."""
    import json

    import numpy as np

    words = "the of a model token expert router layer entropy site next chunk text".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=int(rng.integers(4, 40)))) for _ in range(40)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "weights").mkdir()
    ckpt = str(tmp_path / "weights")
    (reference,) = run_ranks(_scored_stream, 1, args=({}, ckpt, str(data), [0, 1]))
    ranks = run_ranks(_scored_stream, 2, args=({"expert_model_parallel_size": 2}, ckpt, str(data), []),
                      timeout_s=300)
    counts = [[len(c) for c in ref["calls"]] for ref in reference]
    assert counts[0] != counts[1], f"the ranks should score different numbers of chunks: {counts}"
    for rank, ((got,), ref) in enumerate(zip(ranks, reference)):
        assert [len(c) for c in got["calls"]] == [len(c) for c in ref["calls"]], rank
        for call, ref_call in zip(got["calls"], ref["calls"]):
            for (ent, lp), (ref_ent, ref_lp) in zip(call, ref_call):
                np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-6)
        assert got["episodes"] == ref["episodes"], rank
