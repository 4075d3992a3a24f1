"""Metrics: a console progress line, a JSONL log, TensorBoard, Weights & Biases (logging.wandb, wandb_run.py),
and a PNG of the curves at the end of a run.

Only the writing rank (global rank 0) logs; every call elsewhere is a no-op.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from rntp_megatron.config import LoggingConfig


class MetricsLogger:
    """Append-only metrics per step; `resume_at` drops lines past the step a run restarts from."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, enabled: bool = True, total_steps: int = 0,
                 resume_at: Optional[int] = None, run_config: Optional[dict[str, Any]] = None) -> None:
        self.cfg, self.enabled, self.total_steps = cfg, enabled, total_steps
        self.dir = Path(run_dir)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._t0 = time.monotonic()
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_at is not None and self.path.exists():
            # A crash after a log line but before the next checkpoint replays those steps: keep one copy.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) < resume_at]
            self.path.write_text("".join(line + "\n" for line in kept))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if cfg.wandb is not None:
            from rntp_megatron.wandb_run import open_wandb

            self._wandb = open_wandb(cfg.wandb, self.dir, run_config)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        if self.cfg.jsonl:
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.cfg.progress and (step % max(self.cfg.log_interval, 1) == 0 or step + 1 == self.total_steps):
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items()
                             if isinstance(v, (int, float)) and "/" not in k)
            elapsed = time.monotonic() - self._t0
            print(f"[step {step + 1}/{self.total_steps} {elapsed:6.1f}s] {shown}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], keys: list[str], out_png: str | Path, title: str = "") -> Path:
    """A PNG with one panel per key present in the records (step on x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * max(len(keys), 1)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
