"""info_gain's no-thought baseline p_bar is one value per site, shared by the site's G thoughts, so a group-centred
advantage (GRPO, RLOO, Dr. GRPO) cancels it: the trainer scores it only every reward.info_gain_interval steps for
the logged `info_gain` (one forward per site, not per rollout), the gradient is the same as with it, and where it
does not cancel (vrcli's thresholds, shuffled rewards, interleaved turns) it is scored every step."""

from __future__ import annotations

import json

import pytest
import torch

from rntp_megatron.config import baseline_role, build_config
from rntp_megatron.runtime.spawn import run_ranks

pytestmark = [pytest.mark.distributed]


@pytest.mark.parametrize("reward, extra, role", [
    ({"name": "info_gain"}, {}, "metric"),
    ({"name": "info_gain"}, {"rl": {"advantage": "rloo"}}, "metric"),
    ({"name": "info_gain"}, {"rl": {"advantage": "dr_grpo"}}, "metric"),
    ({"name": "info_gain", "format_weight": 0.5, "length_cost": 0.01}, {}, "metric"),  # additive shaping: cancels
    ({"name": "info_gain", "info_gain_interval": 0}, {}, "none"),
    ({"name": "info_gain", "shuffle": True}, {}, "gradient"),
    ({"name": "info_gain"}, {"data": {"episode_format": "interleaved"}}, "gradient"),
    ({"name": "vrcli"}, {}, "gradient"),
    ({"name": "vrcli", "info_gain_interval": 0}, {}, "gradient"),
    ({"name": "loglik"}, {}, "metric"),
    ({"name": "prefix"}, {}, "none"),
])
def test_baseline_role_by_reward_and_advantage(reward, extra, role):
    cfg = build_config({"reward": reward, **extra})
    assert baseline_role(cfg) == role


def _run(overrides: dict, tmp: str, name: str) -> tuple[dict, list, list[dict]]:
    """Train overrides' steps from the seed's weights: (final weights, [(scored model, rows) per baseline forward],
    metric records)."""
    from rntp_megatron.config import build_config
    from rntp_megatron.rewards import scoring
    from rntp_megatron.trainer import Trainer

    cfg = build_config({**overrides, "logging": {"dir": f"{tmp}/{name}", "progress": False, "plot": False}})
    trainer = Trainer(cfg)
    calls: list = []
    real = scoring.continuation_logprobs

    def counted(chunks, prefixes, *args, **kwargs):
        calls.append((chunks[0], len(prefixes)))
        return real(chunks, prefixes, *args, **kwargs)

    scoring.continuation_logprobs = counted
    try:
        assert trainer.run() == 0
    finally:
        scoring.continuation_logprobs = real
    baseline = trainer.side.baseline_model(trainer.ddp)
    forwards = [rows for model, rows in calls if model is baseline and model is not trainer.ddp]
    if baseline is trainer.ddp:  # policy baseline: the baseline forwards are the calls beyond one per step
        forwards = [rows for _, rows in calls[1::2]]
    weights = {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}
    records = [json.loads(line) for line in open(f"{tmp}/{name}/metrics.jsonl")]
    trainer.close()
    return weights, forwards, records


def _train(rank: int, world: int, tmp: str) -> dict:
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    base = {
        "model": {"card": "tiny", "vocab_size": 262, "init_method_std": 0.3},
        "data": {"sources": [{"kind": "pydoc"}], "context_len": 40, "min_context": 8, "answer_horizon": 2},
        "rollout": {"max_new_tokens": 8, "temperature": 1.0},
        "reward": {"name": "info_gain", "baseline": "ema", "ema_decay": 0.5},
        "rl": {"group_size": 4},
        "schedule": {"train_steps": 3, "global_batch_size": 8, "micro_batch_size": 4, "seq_length": 64, "lr": 1e-2},
    }
    init_distributed(build_config(base).parallel, 1234)
    try:
        out: dict = {}
        _, out["every_2"], out["records_2"] = _run({**base, "reward": {**base["reward"], "info_gain_interval": 2}},
                                                   tmp, "every_2")
        one = {**base, "schedule": {**base["schedule"], "train_steps": 1}}
        w_with, out["with"], _ = _run({**one, "reward": {**base["reward"], "info_gain_interval": 1}}, tmp, "with")
        w_without, out["without"], _ = _run({**one, "reward": {**base["reward"], "info_gain_interval": 0}}, tmp,
                                            "without")
        from rntp_megatron.model.provider import build_model

        init = {n: p.detach().double() for n, p in build_model(build_config(one).model,
                                                                build_config(one).parallel).named_parameters()}
        out["moved"] = max((w_with[n] - init[n]).abs().max().item() for n in init)
        out["diff"] = max((w_with[n] - w_without[n]).abs().max().item() for n in w_with)
        _, out["vrcli"], _ = _run({**base, "reward": {"name": "vrcli", "baseline": "policy", "info_gain_interval": 0},
                                   "schedule": {**base["schedule"], "train_steps": 2}}, tmp, "vrcli")
        return out
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_cancelling_baseline_is_scored_every_n_steps_per_site_and_leaves_the_gradient(tmp_path):
    (out,) = run_ranks(_train, 1, args=(str(tmp_path),))
    # 3 steps, interval 2: steps 0 and 2, each one forward over the step's 2 sites (8 rollouts / G=4), not 8 rows
    assert out["every_2"] == [2, 2], out["every_2"]
    assert ["info_gain" in r for r in out["records_2"]] == [True, False, True]
    assert all(torch.isfinite(torch.tensor(r["info_gain"])) for r in out["records_2"][::2])
    assert out["with"] == [2] and out["without"] == []
    assert out["moved"] > 1e-3, "the step did not move the weights: equal weights would prove nothing"
    assert out["diff"] < 1e-6, f"the baseline changed the update by {out['diff']} (it must cancel)"
    assert out["vrcli"] == [2, 2], "vrcli reads the baseline through thresholds: scored every step"
