"""checkpoint.save_checkpoint: a save goes aside, is marked complete, renamed, then named latest; megatron is
handed an empty folder (a non-empty one makes it log "Overwriting old incomplete / corrupted checkpoint")."""

from __future__ import annotations

import pytest

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
