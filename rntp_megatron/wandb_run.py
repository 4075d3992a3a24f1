"""Weights & Biases for a run (`logging.wandb`), an optional dependency (`pip install -e '.[wandb]'`).

The run's W&B id is kept in `logging.dir/wandb_run_id`: a resumed run (same logging.dir) and the results
logged after training (tables, the curves PNG) continue the same W&B run. Steps a resumed run repeats are
dropped by W&B (it keeps the first copy; an exact resume logs the same values).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from rntp_megatron.config import ConfigError, LoggingConfig, WandbConfig

ID_FILE = "wandb_run_id"


def _wandb():
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"logging.wandb: the wandb package does not import ({e}); fix: pip install -e "
                          "'.[wandb]', or logging.wandb: null") from None
    return wandb


def open_wandb(cfg: WandbConfig, run_dir: str | Path, run_config: Optional[dict[str, Any]] = None):
    """The W&B run of `run_dir`: a new one (its id written to run_dir/wandb_run_id) or the one that id names.
    Files go under $WANDB_DIR when set, else run_dir."""
    wandb = _wandb()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, tags=list(cfg.tags), id=run_id,
                     resume="allow" if run_id else None, dir=os.environ.get("WANDB_DIR", str(run_dir)),
                     name=run_dir.name, config=run_config)
    if run_id is None:
        id_file.write_text(run.id)
    return run


def log_results(cfg: LoggingConfig, run_dir: str | Path, tables: dict[str, dict[str, dict[str, float]]],
                images: dict[str, str | Path], step: Optional[int] = None) -> None:
    """Final evaluation tables ({title: {bucket: {metric: value}}}) and PNGs into the run's W&B run at `step`
    (the run's last step + 1: a resumed offline session does not know where the run stopped); a no-op
    without logging.wandb."""
    if cfg.wandb is None:
        return
    wandb = _wandb()
    run = open_wandb(cfg.wandb, run_dir)
    try:
        logged: dict[str, Any] = {}
        for title, table in tables.items():
            metrics = sorted({m for row in table.values() for m in row})
            logged[title.replace(" ", "_")] = wandb.Table(
                columns=["bucket", *metrics], data=[[b, *(row.get(m) for m in metrics)] for b, row in table.items()])
        for name, png in images.items():
            logged[name] = wandb.Image(str(png))
        run.log(logged, step=step)
    finally:
        run.finish()
