"""checkpoint.save_checkpoint: a save goes aside, is marked complete, renamed, then named latest; megatron is
handed an empty folder (a non-empty one makes it log "Overwriting old incomplete / corrupted checkpoint")."""

from __future__ import annotations

import pytest

from rntp_megatron.metrics import is_timing
from rntp_megatron.runtime.spawn import run_ranks


def _save_twice(rank: int, world_size: int, root: str) -> dict:
    import logging
    from pathlib import Path

    from rntp_megatron.checkpoint import COMPLETE, LATEST, save_checkpoint
    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "tiny", "transformer_impl": "local"}})
    init_distributed(cfg.parallel, seed=2)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("megatron").addHandler(handler)
    try:
        model = build_model(cfg.model, cfg.parallel)
        for step in (1, 2):
            save_checkpoint(root, step, [model], None, trainer_state={"step": step}, rank_state={"r": rank},
                            keep_last=1)
        kept = sorted(p.name for p in Path(root).iterdir())
        latest = (Path(root) / LATEST).read_text().strip()
        return {"warnings": records, "kept": kept, "latest": latest,
                "complete": (Path(root) / latest / COMPLETE).exists(),
                "rank_state": (Path(root) / latest / "trainer_state" / "rank_00000.pt").exists()}
    finally:
        logging.getLogger("megatron").removeHandler(handler)
        destroy_distributed()


@pytest.mark.distributed
def test_saves_are_complete_named_latest_and_megatron_sees_an_empty_folder(tmp_path):
    [report] = run_ranks(_save_twice, 1, (str(tmp_path / "ckpt"),))
    assert report["latest"] == "iter_0000002" and report["complete"] and report["rank_state"], report
    assert report["kept"] == ["iter_0000002", "latest"], report["kept"]  # keep_last=1, no .tmp left behind
    assert not [w for w in report["warnings"] if "Overwriting" in w], report["warnings"]


def _train_saving(rank: int, world_size: int, root: str, cases: dict[str, list[str]]) -> dict[str, list[str]]:
    """For each case, the checkpoints a 3-step next-token run leaves under root/case with its overrides."""
    from pathlib import Path

    from rntp_megatron.config import build_config
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    saved = {}
    try:
        for name, overrides in cases.items():
            folder = f"{root}/{name}"
            cfg = build_config({}, ["model.card=tiny", "model.vocab_size=262", "rl.objective=ntp",
                                    "schedule.train_steps=3", "schedule.global_batch_size=2",
                                    "schedule.micro_batch_size=2", "schedule.seq_length=32", "data.context_len=32",
                                    "checkpoint.keep_last=10", f"checkpoint.dir={folder}",
                                    f"logging.dir={folder}/log", "logging.progress=false", *overrides])
            assert Trainer(cfg).run() == 0
            saved[name] = sorted(p.name for p in Path(folder).glob("iter_*"))
    finally:
        destroy_distributed()
    return saved


@pytest.mark.distributed
def test_saves_come_every_n_steps_or_every_m_minutes_whichever_first(tmp_path):
    cases = {"steps": ["checkpoint.save_interval=2", "checkpoint.save_interval_minutes=600"],
             "time": ["checkpoint.save_interval=100", "checkpoint.save_interval_minutes=1e-5"]}  # 0.6 ms: every step
    [saved] = run_ranks(_train_saving, 1, (str(tmp_path), cases))
    assert saved["steps"] == ["iter_0000002", "iter_0000003"]  # step 2, then the end of the run
    assert saved["time"] == ["iter_0000001", "iter_0000002", "iter_0000003"]


def _distopt_resume(rank: int, world_size: int, root: str) -> list[list[dict]]:
    """Metrics of a 2-step DP2 run with the distributed optimizer, and of one stopped after step 1 and resumed."""
    import json
    from pathlib import Path

    from rntp_megatron.config import build_config
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    def run(name: str, steps: int) -> None:
        cfg = build_config({}, ["model.card=tiny", "model.vocab_size=262", "rl.objective=ntp", "schedule.lr=1e-2",
                                f"schedule.train_steps={steps}", "schedule.global_batch_size=4",
                                "schedule.micro_batch_size=2", "schedule.seq_length=32", "data.context_len=32",
                                "parallel.use_distributed_optimizer=true", f"logging.dir={root}/{name}",
                                "logging.progress=false"])
        assert Trainer(cfg).run() == 0

    try:
        run("whole", 2)
        run("resumed", 1)
        run("resumed", 2)
    finally:
        destroy_distributed()
    return [[{k: v for k, v in json.loads(line).items() if not is_timing(k)}
             for line in (Path(root) / name / "metrics.jsonl").read_text().splitlines()] for name in ("whole", "resumed")]


@pytest.mark.distributed
def test_distributed_optimizer_state_saves_and_resumes_exactly(tmp_path):
    whole, resumed = run_ranks(_distopt_resume, 2, (str(tmp_path),))[0]
    assert [m["step"] for m in whole] == [0, 1] and resumed == whole
