"""An RNTP run of tiny_qwen3_moe at EP2 (two data-parallel ranks, each holding half the experts) trains, saves,
resumes and exports to Hugging Face like the same run at EP1: real `rntp convert` and `rntp train` processes
from one imported HF model; the EP2 run stops after 2 steps and a second launch resumes it to 4.

The EP2 run replays its routing (rl.routing_replay): its PPO anchor is the recording pass's log-probs instead of
the rollouts', which the training forward reproduces exactly (ratio 1, moe/routing_mismatch 0), so it trains as
the EP1 run without replay does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rntp_megatron.metrics import is_timing
from rntp_megatron.runtime.spawn import run_ranks
from tests.test_moe_hf import TOKENS, save_random_hf_moe

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 4


def _rntp(rank: int, world_size: int, argv: list[str]) -> int:
    from rntp_megatron.cli import main

    return main(argv)


def _train(run_dir: Path, init: Path, steps: int, *extra: str) -> None:
    overrides = ["model.card=tiny_qwen3_moe", "model.vocab_size=262", "rl.group_size=4",
                 "schedule.global_batch_size=8", "schedule.micro_batch_size=4", f"schedule.train_steps={steps}",
                 "schedule.seq_length=96", "schedule.lr=3e-3", "data.context_len=64", "data.min_context=8",
                 "rollout.max_new_tokens=12", "rollout.temperature=1.0", "reward.name=prob",
                 "checkpoint.save_interval=2", f"checkpoint.load={init}", f"logging.dir={run_dir}",
                 "logging.progress=false", *extra]
    assert run_ranks(_rntp, 2, (["train"] + [a for o in overrides for a in ("--set", o)],)) == [0, 0]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not is_timing(k)} for line in lines if line.strip()]


def _export(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from rntp_megatron.weights.hf_checkpoint import SafetensorsFolder

    argv = ["convert", "to-hf", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(out)]
    assert run_ranks(_rntp, 1, (argv,)) == [0]  # one process: the EP2 checkpoint reshards to EP1 on load
    folder = SafetensorsFolder(out)
    return {name: folder[name] for name in folder}


def test_ep2_run_trains_resumes_and_exports_like_ep1(tmp_path):
    import transformers

    save_random_hf_moe(tmp_path / "hf", vocab_size=262)
    init = tmp_path / "init"
    assert run_ranks(_rntp, 1, (["convert", "from-hf", "--hf", str(tmp_path / "hf"), "--out", str(init)],)) == [0]
    init = init / "iter_0000000"
    # one rollout a row at both: EP2's shared rows pad to its group's layout, and the load-balancing loss averages
    # over every fed token, padding too (shared rows under EP: tests/test_shared_context.py)
    _train(tmp_path / "ep1", init, STEPS, "rl.shared_context=false")
    ep2_replay = ("parallel.expert_model_parallel_size=2", "rl.routing_replay=true", "rl.shared_context=false")
    _train(tmp_path / "ep2", init, 2, *ep2_replay)
    _train(tmp_path / "ep2", init, STEPS, *ep2_replay)  # resumes at step 2
    ep1, ep2 = _records(tmp_path / "ep1"), _records(tmp_path / "ep2")
    assert [r["step"] for r in ep2] == list(range(STEPS)) and ep1[0]["moe_load_balancing_loss"] > 0
    for a, b in zip(ep2, ep1):
        assert a.pop("moe/routing_mismatch") == 0.0 and a["ratio"] == 1.0, a
        assert a.keys() == b.keys()
        for key in a:
            if "flops_scoring" in key or key == "flops_total":  # the recording pass is one more forward
                assert a[key] > b[key], (a["step"], key)
                continue
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (a["step"], key, a[key], b[key])
    hf1, hf2 = _export(tmp_path / "ep1", tmp_path / "hf1"), _export(tmp_path / "ep2", tmp_path / "hf2")
    assert sorted(hf1) == sorted(hf2) and any(".mlp.experts.7.down_proj" in n for n in hf2)
    for name in hf1:  # Adam turns the ~1e-7 relative gradient differences of near-zero entries into ~1e-5 steps
        torch.testing.assert_close(hf2[name], hf1[name], rtol=0, atol=1e-4, msg=name)
    models = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf{i}", dtype=torch.float32)
              for i in (1, 2)]
    with torch.no_grad():
        torch.testing.assert_close(models[1](TOKENS).logits, models[0](TOKENS).logits, rtol=1e-4, atol=1e-4)
