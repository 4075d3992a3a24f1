"""Likelihood scoring through megatron's schedule: continuation log-probs match a float64 log_softmax of the
full single-process forward, at TP1 (3 micro-batches with padding), TP2 and PP2; the EMA baseline model
starts at the policy (scores like it) and follows p_bar = d p_bar + (1 - d) p."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PREFIXES = [[5, 9, 11, 3], [7], [1, 2, 3, 4, 5, 6, 7, 8], [200, 100], [42, 43, 44]]
CONTINUATIONS = [[17, 18], [3, 4, 5], [9], [250, 251, 252], [0, 1]]
TEMPERATURE = 0.8


def score_layout(rank: int, world: int, layouts: list[dict], ckpt: str, reference: bool) -> list[dict]:
    from megatron.core import dist_checkpointing, parallel_state

    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rewards.baseline import EMABaseline
    from rntp_megatron.rewards.scoring import continuation_logprobs
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    out = []
    for parallel in layouts:
        cfg = build_config({"model": {"card": "tiny"}, "parallel": parallel})
        init_distributed(cfg.parallel, seed=1234)
        model = build_model(cfg.model, cfg.parallel)
        if reference:
            dist_checkpointing.save(model.sharded_state_dict(), ckpt)
        else:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        logp, mask = continuation_logprobs([model], PREFIXES, CONTINUATIONS, micro_batch_size=2,
                                           temperature=TEMPERATURE)
        result = {"logp": logp, "mask": mask}
        if reference:
            # independent: one full forward per row, float64 log_softmax over the whole vocabulary
            expected = torch.zeros_like(logp)
            for i, (p, c) in enumerate(zip(PREFIXES, CONTINUATIONS)):
                row = torch.tensor([p + c[:-1]])
                with torch.no_grad():
                    logits = model(row, torch.arange(row.shape[1])[None], None)[0].double()
                full = torch.log_softmax(logits / TEMPERATURE, -1)
                expected[i, :len(c)] = torch.stack([full[len(p) - 1 + k, c[k]] for k in range(len(c))]).float()
            result["expected"] = expected
            ema = EMABaseline.build(cfg.model, cfg.parallel, decay=0.9)
            ema.reset(model)
            name, before = next((n, p.detach().clone()) for n, p in model.named_parameters())
            baseline_logp, _ = continuation_logprobs([ema.model], PREFIXES, CONTINUATIONS, 2, temperature=TEMPERATURE)
            result["reset_scores_like_policy"] = (baseline_logp - logp).abs().max().item()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            ema.update(model)
            result["ema_err"] = (dict(ema.model.named_parameters())[name] - (before + 0.1)).abs().max().item()
        out.append(result)
        parallel_state.destroy_model_parallel()
    destroy_distributed()
    return out


def test_scoring_matches_full_forward_under_tp_and_pp(tmp_path):
    (tmp_path / "w").mkdir()
    ckpt = str(tmp_path / "w")
    (ref,) = run_ranks(score_layout, 1, args=([{}], ckpt, True))[0]
    assert ref["mask"].sum().item() == sum(len(c) for c in CONTINUATIONS)
    torch.testing.assert_close(ref["logp"], ref["expected"], rtol=1e-5, atol=1e-5)
    assert ref["ema_err"] < 1e-6 and ref["reset_scores_like_policy"] < 1e-6
    per_rank = run_ranks(score_layout, 2, args=([{"tensor_model_parallel_size": 2},
                                                  {"pipeline_model_parallel_size": 2}], ckpt, False))
    for rank, results in enumerate(per_rank):
        for layout, res in zip(("TP2", "PP2"), results):
            torch.testing.assert_close(res["logp"], ref["logp"], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{layout} rank {rank}: {m}")
