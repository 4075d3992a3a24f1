"""The frozen side models at the trainer's layout, against float64 computations of a single-process model: the
KL term of the RNTP loss with reference log-probs from a frozen reference loaded from a checkpoint
(rl/reference.py), and the proxy's per-token top-k entropy and log-prob arrays (data/proxy.py), at TP2 and PP2
(gloo). A padded vocabulary (250 tokenizer ids of 256) checks that padding ids stay out of every softmax."""

from __future__ import annotations

import random

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, SEQ, TEMPERATURE, TOP_K, KL_COEF = 250, 24, 0.8, 16, 0.1


def _rollouts():
    from rntp_megatron.rollout.engine import Rollout

    rng = random.Random(5)
    out = []
    for i in range(4):
        prompt = [rng.randrange(VOCAB) for _ in range(3 + 2 * i)]
        tokens = [rng.randrange(VOCAB) for _ in range(6 - i)]
        out.append(Rollout(prompt, tokens, "", [-5.5] * len(tokens), "length", prompt_index=i))
    return out


CHUNKS = [[(7 * i + 3 * j) % VOCAB for j in range(n)] for i, n in enumerate((20, 9, 14))]


def _float64(model: torch.nn.Module, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log-softmax[n, VOCAB] of the model's predictions after each prefix of ids, in float64 end to end."""
    model.double()  # and back: float32 -> float64 -> float32 is exact
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, :, :VOCAB]
    finally:
        model.float()
    assert logits.dtype == torch.float64
    return torch.log_softmax(logits / temperature, -1)


def _expected(rank: int, world: int, tmp: str) -> dict:
    """TP1: save a policy and a reference (different weights); their float64 KL, ref log-probs and proxy scores."""
    from megatron.core import dist_checkpointing

    from rntp_megatron.checkpoint import save_checkpoint
    from rntp_megatron.config import build_config
    from rntp_megatron.data.sites import topk_entropy
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "tiny", "init_method_std": 0.2}})
    init_distributed(cfg.parallel, seed=1)
    policy, reference = build_model(cfg.model, cfg.parallel), build_model(cfg.model, cfg.parallel)
    dist_checkpointing.save(policy.sharded_state_dict(), f"{tmp}/policy")
    save_checkpoint(f"{tmp}/reference", 0, [reference], None, {"step": 0}, {})
    kl_sum, n, ref_rows = 0.0, 0, []
    for r in _rollouts():
        ids = r.prompt_ids + r.token_ids
        p, g = len(r.prompt_ids), len(r.token_ids)
        labels = torch.tensor(r.token_ids)[:, None]
        lp = _float64(policy, ids, TEMPERATURE)[p - 1:p - 1 + g].gather(-1, labels).squeeze(-1)
        lr = _float64(reference, ids, TEMPERATURE)[p - 1:p - 1 + g].gather(-1, labels).squeeze(-1)
        d = lp - lr
        kl_sum += (torch.exp(-d) - 1 + d).sum().item()
        n += g
        ref_rows.append(lr)
    scores = []
    for c in CHUNKS:
        logp = _float64(reference, c)[:-1]
        scores.append((topk_entropy(logp, TOP_K), logp.gather(-1, torch.tensor(c[1:])[:, None]).squeeze(-1)))
    destroy_distributed()
    return {"kl": kl_sum / n, "ref_rows": ref_rows, "scores": scores}


def _layouts(rank: int, world: int, tmp: str, layouts: list[dict]) -> list[dict]:
    """Each layout: the policy from its checkpoint, the frozen reference via model/frozen.py; the loss's kl metric
    with reference_logprobs in the batch, the reference rows, and the proxy scores of CHUNKS."""
    from megatron.core import dist_checkpointing, parallel_state

    from rntp_megatron.config import build_config
    from rntp_megatron.data.episode import Episode
    from rntp_megatron.data.proxy import ProxyScorer
    from rntp_megatron.model.frozen import build_frozen
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import wrap_ddp
    from rntp_megatron.rl.batch import pack_rollouts, with_global_counts
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.rl.reference import reference_logprobs
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.step import forward_backward, reduce_logged

    out = []
    for parallel in layouts:
        cfg = build_config({"model": {"card": "tiny", "init_method_std": 0.2}, "parallel": parallel,
                            "rl": {"kl_coef": KL_COEF, "reference": f"{tmp}/reference/iter_0000000"}})
        init_distributed(cfg.parallel, seed=1)
        model = build_model(cfg.model, cfg.parallel)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{tmp}/policy"))
        ddp = wrap_ddp(model, cfg.parallel)
        reference = build_frozen(cfg.model, cfg.parallel, cfg.rl.reference, "rl.reference")
        rollouts = _rollouts()
        n = len(rollouts)
        episodes = [Episode(r.prompt_ids, [], [], "", 0) for r in rollouts]
        batch = pack_rollouts(episodes, rollouts, torch.linspace(-1, 1, n), torch.zeros(n), [], SEQ, 0)
        batch.ref_logprobs = reference_logprobs(reference, rollouts, SEQ, 2, 0, TEMPERATURE, VOCAB)
        batch = with_global_counts(batch, cfg.rl.train_on)
        loss = RNTPLoss(cfg.rl, TEMPERATURE, vocab_size=VOCAB)
        mbs = batch.microbatches(2)
        metrics = reduce_logged(forward_backward([ddp], loss.forward_step, mbs, len(mbs), SEQ, 2, forward_only=True))
        rows = [batch.ref_logprobs[i, len(r.prompt_ids) - 1:len(r.prompt_ids) - 1 + len(r.token_ids)]
                for i, r in enumerate(rollouts)]
        scores = ProxyScorer(reference, VOCAB, TOP_K, micro_batch_size=2).score(CHUNKS)
        out.append({"kl": metrics["kl"], "ref_rows": rows, "scores": scores})
        parallel_state.destroy_model_parallel()
    destroy_distributed()
    return out


def test_kl_and_proxy_scores_match_float64_at_tp2_and_pp2(tmp_path):
    (tmp_path / "policy").mkdir()
    (expected,) = run_ranks(_expected, 1, args=(str(tmp_path),))
    assert expected["kl"] > 0.01, "policy and reference must differ for the KL check to have teeth"
    per_rank = run_ranks(_layouts, 2, args=(str(tmp_path), [{"tensor_model_parallel_size": 2},
                                                             {"pipeline_model_parallel_size": 2}]))
    for rank, results in enumerate(per_rank):
        for layout, res in zip(("TP2", "PP2"), results):
            what = f"{layout} rank {rank}"
            assert abs(res["kl"] - expected["kl"]) <= 1e-5 * expected["kl"], (what, res["kl"], expected["kl"])
            for got, want in zip(res["ref_rows"], expected["ref_rows"]):
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0, msg=lambda m: f"{what}: {m}")
            for (ent, lp), (want_ent, want_lp) in zip(res["scores"], expected["scores"]):
                assert torch.isnan(torch.tensor(ent[0])) and torch.isnan(torch.tensor(lp[0]))
                torch.testing.assert_close(torch.tensor(ent[1:]), want_ent, atol=1e-5, rtol=0)
                torch.testing.assert_close(torch.tensor(lp[1:]), want_lp, atol=1e-5, rtol=0)
    # every rank of a model-parallel group holds the same bits (the sites drawn from them must agree)
    for i in range(2):
        for (a, b), (c, d) in zip(per_rank[0][i]["scores"], per_rank[1][i]["scores"]):
            assert (a[1:] == c[1:]).all() and (b[1:] == d[1:]).all()
