"""The in-process engine on a Qwen3-MoE model: greedy decoding is the full forward's argmax and log-probs match
it (EP1); at EP2 each data-parallel rank brings prompts of its own (different lengths and counts) and gets the
rollouts it gets at EP1 from the same weights and seeds."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks
from tests.test_megatron_engine import _check_rollouts

pytestmark = [pytest.mark.distributed]

RANK_PROMPTS = [["#ab;c?<think>", "hello world"], ["#xy;z?<think>", "one two three four", "ab"]]


def _rollouts(rank: int, world: int, ckpt: str) -> dict:
    """Greedy and sampled rollouts of each rank's prompts (at EP1, one process plays both ranks)."""
    from megatron.core import dist_checkpointing

    from rntp_megatron.config import build_config
    from rntp_megatron.data.tokenizer import ByteTokenizer
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rollout.engine import SamplingParams
    from rntp_megatron.rollout.megatron_engine import MegatronEngine
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "tiny_qwen3_moe", "vocab_size": 262, "init_method_std": 0.2},
                        "parallel": {"expert_model_parallel_size": world}})
    init_distributed(cfg.parallel, seed=3)
    try:
        model = build_model(cfg.model, cfg.parallel)
        if world == 1:
            dist_checkpointing.save(model.sharded_state_dict(), ckpt)
        else:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        tok = ByteTokenizer()
        engine = MegatronEngine(model, tok, max_batch_size=8)
        out = {}
        for r in ([rank] if world > 1 else range(len(RANK_PROMPTS))):
            prompts = [tok.encode(p) for p in RANK_PROMPTS[r]]
            greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
            sampled = engine.generate(prompts, SamplingParams(temperature=1.0, n=2, max_new_tokens=12, seed=5 + r))
            out[r] = [(g.token_ids, g.logprobs) for g in greedy + sampled]
            if world == 1:  # full forwards need no partner rank at EP1
                out[f"lp_greedy_{r}"] = _check_rollouts(model, tok, greedy, 0.0)
                out[f"lp_sampled_{r}"] = _check_rollouts(model, tok, sampled, 1.0)
        return out
    finally:
        destroy_distributed()


def test_moe_engine_matches_full_forward_and_ep2_matches_ep1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    [ep1] = run_ranks(_rollouts, 1, (str(tmp_path / "ckpt"),))
    for r in range(len(RANK_PROMPTS)):
        assert ep1[f"lp_greedy_{r}"] < 1e-4 and ep1[f"lp_sampled_{r}"] < 1e-4, ep1
    ep2 = run_ranks(_rollouts, 2, (str(tmp_path / "ckpt"),))
    for r, res in enumerate(ep2):
        assert [ids for ids, _ in res[r]] == [ids for ids, _ in ep1[r]], f"EP2 rank {r} sampled other tokens"
        for (_, lp2), (_, lp1) in zip(res[r], ep1[r]):
            assert torch.allclose(torch.tensor(lp2), torch.tensor(lp1), atol=1e-5)
