"""Weights & Biases in offline mode (files written, no network): a training run logs what metrics.jsonl holds and
its config, a resumed run continues the same W&B run, and the final tables and curves PNG join it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rntp_megatron.config import build_config

wandb = pytest.importorskip("wandb")  # the `wandb` extra, part of `dev` (make test installs it)


def wandb_records(path: Path):
    """The protobuf records of an offline run file (run-ID.wandb): a leveldb-style log of 32 KiB blocks, each
    record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes, after
    the file's own 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finished(path: Path) -> bool:
    """Whether an offline run file holds its session's exit record (all of it is written)."""
    return any(rec.WhichOneof("record_type") == "exit" for rec in wandb_records(path))


def _history(run_files: list[Path]) -> tuple[dict[int, dict], list]:
    """{step: {key: value}} over the offline run files, and their run records."""
    steps, runs = {}, []
    for path in run_files:
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                steps.setdefault(rec.history.step.num, {}).update(item)
            elif kind == "run":
                runs.append(rec.run)
    return steps, runs


@pytest.mark.slow
def test_offline_run_logs_metrics_config_and_resumes_the_same_run(tmp_path, monkeypatch):
    from rntp_megatron.evaluate import save_table
    from rntp_megatron.metrics import plot_curves, read_metrics
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer
    from rntp_megatron.wandb_run import ID_FILE, log_results

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    run_dir = tmp_path / "run"
    base = {"model": {"card": "tiny", "vocab_size": 384}, "rl": {"objective": "ntp"},
            "data": {"sources": [{"kind": "synthetic"}], "context_len": 64},
            "schedule": {"global_batch_size": 2, "micro_batch_size": 2, "seq_length": 32},
            "checkpoint": {"save_interval": 2},
            "logging": {"dir": str(run_dir), "progress": False,
                        "wandb": {"project": "rntp-test", "mode": "offline", "tags": ["ci"]}}}
    for steps in (2, 3):  # 2 steps, then the same run resumed from its checkpoint to step 3
        try:
            assert Trainer(build_config(base, [f"schedule.train_steps={steps}"])).run() == 0
        finally:
            destroy_distributed()
    png = plot_curves(read_metrics(run_dir / "metrics.jsonl"), ["loss"], tmp_path / "curves.png")
    table = {"C": {"n": 3.0, "thought": 0.5}}
    save_table(table, str(tmp_path / "eval.json"))
    log_results(build_config(base).logging, run_dir, {"after RL": table}, {"curves": png}, step=3)

    run_id = (run_dir / ID_FILE).read_text().strip()
    run_files = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 60  # wandb's service process may finish writing a file after finish() returns
    while not all(_finished(p) for p in run_files) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(run_files) == 3 and all(p.name == f"run-{run_id}.wandb" for p in run_files)  # one run, 3 sessions
    steps, runs = _history(run_files)
    jsonl = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in jsonl] == [0, 1, 2]
    for record in jsonl:  # every JSONL value is in W&B's history at the same step
        logged = steps[record["step"]]
        assert all(logged[k] == pytest.approx(v) for k, v in record.items() if k != "step"), (record, logged)
    assert {r.run_id for r in runs} == {run_id} and all(list(r.tags) == ["ci"] for r in runs)
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["rl"]["objective"] == "ntp" and config["schedule"]["seq_length"] == 32
    results = steps[3]
    assert results["after_RL/_type"] == "table-file" and results["curves/_type"] == "image-file"
    media = list((tmp_path / "wandb" / "wandb").glob("offline-run-*/files/media/*/*"))
    assert {p.suffix for p in media} == {".json", ".png"}


def test_missing_wandb_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    from rntp_megatron.config import ConfigError
    from rntp_megatron.wandb_run import open_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    cfg = build_config({"logging": {"wandb": {"mode": "offline"}}}).logging.wandb
    with pytest.raises(ConfigError, match=r"logging.wandb: .*fix: pip install -e '.\[wandb\]'"):
        open_wandb(cfg, tmp_path)
