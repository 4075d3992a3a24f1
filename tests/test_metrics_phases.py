"""Phase timings and the console line (metrics.py): nested phases pause the outer one; a real RL run logs every
phase, and they with `time/other_s` sum to the step time; the console line is short, shows the headline
values, the phases and ETA, and no zero-valued counter."""

from __future__ import annotations

import re
import time

import pytest

from rntp_megatron.metrics import PHASES, PhaseTimer, console_line


def test_a_nested_phase_pauses_the_outer_one():
    timer = PhaseTimer()
    t0 = time.monotonic()
    with timer.phase("rollout"):
        time.sleep(0.02)
        with timer.phase("data_wait"):
            time.sleep(0.05)
        time.sleep(0.02)
    with timer.phase("train"):
        time.sleep(0.03)
    step = time.monotonic() - t0 + 0.01
    out = timer.take(step, busy=("train",))
    assert 0.05 <= out["time/data_wait_s"] < 0.04 + out["time/rollout_s"] + 0.05
    assert 0.04 <= out["time/rollout_s"] < out["time/data_wait_s"] + 0.04  # the data wait is not in it
    assert sum(out[f"time/{p}_s"] for p in PHASES) + out["time/other_s"] == pytest.approx(step)
    assert out["time/device_busy_share"] == pytest.approx(out["time/train_s"] / step)
    assert timer.take(1.0, busy=())["time/rollout_s"] == 0.0  # take() starts over
    with pytest.raises(ValueError, match="unknown phase 'gen'"):
        with timer.phase("gen"):
            pass


def test_console_line_shows_the_headline_and_drops_zero_counters():
    values = {"loss": 0.1234567, "reward": 0.5, "tokens_per_s": 1523.4, "lr": 1e-4, "consumed_tokens": 9000.0,
              "data/skipped/short": 0.0, "moe/routing_mismatch": 0.0, "flops_total": 1e15, "step_time_s": 2.0,
              **{f"time/{p}_s": 0.0 for p in PHASES}, "time/rollout_s": 1.25, "time/train_s": 0.5,
              "time/weight_sync_s": 0.0001, "time/device_busy_share": 0.25}
    line = console_line(9, 40, 20.0, 61.0, values)
    assert line == "[step 10/40 20.0s eta 1m01s] loss=0.1235 reward=0.5 tok/s=1523 | rollout 1.2s train 500ms busy 25%"


def test_a_run_ended_by_its_flop_budget_shows_the_share_spent_and_an_eta_by_flops(tmp_path, capsys, monkeypatch):
    """rntp ablate's branches run to schedule.flops_budget with a step count that never binds (10^9)."""
    from rntp_megatron.config import LoggingConfig
    from rntp_megatron.metrics import MetricsLogger

    clock = iter([0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 30.0])
    monkeypatch.setattr("rntp_megatron.metrics.time.monotonic", lambda: next(clock))
    logger = MetricsLogger(LoggingConfig(log_interval=1, plot=False), tmp_path, total_steps=10**9, flops_budget=1e12)
    for step, flops in enumerate((1e11, 2e11, 3e11)):
        logger.log(step, {"loss": 1.0, "flops_total": flops})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[step 1, 10% of flops_budget 10.0s]"), lines[0]  # no rate yet: no ETA
    assert lines[2].startswith("[step 3, 30% of flops_budget 30.0s eta 1m10s]"), lines[2]  # 1e10 FLOP/s, 7e11 left


@pytest.mark.slow
def test_rl_run_logs_its_phases_and_a_short_console_line(tmp_path, capsys):
    """Two RNTP steps of the tiny model with a likelihood reward (its scoring passes)."""
    from rntp_megatron.config import build_config
    from rntp_megatron.metrics import read_metrics
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    cfg = build_config({}, [
        "model.card=tiny", "model.vocab_size=262", "rl.group_size=2", "schedule.global_batch_size=4",
        "schedule.micro_batch_size=2", "schedule.train_steps=2", "schedule.seq_length=64", "data.context_len=40",
        "data.min_context=8", "rollout.max_new_tokens=6", "rollout.temperature=1.0", "reward.name=prob",
        f"logging.dir={tmp_path}", "logging.plot=false"])
    trainer = Trainer(cfg)
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
        destroy_distributed()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 2
    for r in records:
        phases = {p: r[f"time/{p}_s"] for p in PHASES}
        assert all(phases[p] > 0 for p in ("data_wait", "rollout", "rewards", "scoring", "train", "weight_sync")), r
        total = sum(phases.values())
        assert total <= r["step_time_s"] and r["time/other_s"] < 0.25 * r["step_time_s"], r
        assert total + r["time/other_s"] == pytest.approx(r["step_time_s"], rel=1e-9)
        # the in-process engine is colocated: the trainer's devices generate, score and train
        busy = (phases["rollout"] + phases["scoring"] + phases["train"]) / r["step_time_s"]
        assert r["time/device_busy_share"] == pytest.approx(busy) and 0 < busy < 1
        assert r["tokens_per_s"] > 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[step ")]
    assert len(lines) == 2, lines
    for line in lines:
        assert len(line) < 140, line
        head, phases = line.split(" | ")
        assert re.fullmatch(r"\[step \d/2 \S+s eta \d+s\] loss=\S+ reward=\S+ tok/s=\S+", head), line
        shown = re.findall(r"(\w+) (\d+m?s)", phases)  # the phases that took >= 1 ms, in PHASES order
        assert {"rollout", "scoring", "train"} <= {name for name, _ in shown}, line
        assert [name for name, _ in shown] == [n for n in ("data", "rollout", "rewards", "scoring", "train", "sync")
                                               if n in dict(shown)], line
        assert re.search(r" busy \d+%$", phases), line
        assert not re.search(r"=0(\.0*)?( |$)| 0m?s", line.split("]")[1]), line  # no zero counter or phase
    assert "eta " in lines[0] and lines[-1].startswith("[step 2/2") and " eta 0s]" in lines[-1]
