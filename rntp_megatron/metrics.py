"""Metrics: a console progress line, a JSONL log, TensorBoard, Weights & Biases (logging.wandb, wandb_run.py),
and a PNG of the curves at the end of a run.

Only the writing rank (global rank 0) logs; every call elsewhere is a no-op. The console shows what a person
watching wants (step, loss or reward, tokens/s, ETA, the step's phases and the share of it the trainer's devices
were busy); every value goes to metrics.jsonl, TensorBoard and W&B.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from rntp_megatron.config import LoggingConfig


PHASES = ("data_wait", "rollout", "rewards", "scoring", "train", "weight_sync")
HEADLINE = ("loss", "reward", "tokens_per_s")  # the values the console line shows, when a step has them


def is_timing(key: str) -> bool:
    """Whether a logged value is a wall-clock measurement (it differs between runs that compute the same)."""
    return key in ("step_time_s", "tokens_per_s") or key.startswith("time/")


class PhaseTimer:
    """Wall seconds of a step's phases (PHASES). A phase entered inside another pauses it, so phases never
    overlap: their sum plus `time/other_s` is the step's time."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._open: list[str] = []  # the phases entered and not left, innermost last
        self._since = 0.0  # when the innermost open phase last resumed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (one of PHASES), pausing the phase it runs inside."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        self._switch()
        self._open.append(name)
        try:
            yield
        finally:
            self._switch()
            self._open.pop()

    def _switch(self) -> None:
        """Credit the time since the last switch to the innermost open phase."""
        now = time.monotonic()
        if self._open:
            self.seconds[self._open[-1]] += now - self._since
        self._since = now

    def take(self, step_s: float, busy: Iterable[str]) -> dict[str, float]:
        """The step's `time/<phase>_s`, `time/other_s` (step_s less the phases) and `time/device_busy_share`
        (the phases in `busy`, those that ran on the trainer's devices, over step_s); then starts over."""
        out = {f"time/{name}_s": s for name, s in self.seconds.items()}
        out["time/other_s"] = max(step_s - sum(self.seconds.values()), 0.0)
        out["time/device_busy_share"] = sum(self.seconds[b] for b in busy) / step_s if step_s > 0 else 0.0
        self.seconds = dict.fromkeys(PHASES, 0.0)
        return out


SHORT = {"tokens_per_s": "tok/s", "data_wait": "data", "weight_sync": "sync"}  # console labels


def console_line(step: int, total_steps: int, elapsed: float, eta: Optional[float], values: dict[str, Any],
                 budget_share: Optional[float] = None) -> str:
    """`[step i/N 12.3s eta 4m05s] loss=.. reward=.. tok/s=.. | rollout 1.2s train 310ms busy 64%`: the headline
    values and the phases that took a millisecond or more; other values and counters are left to the logs. A run
    that ends at its FLOP budget shows `step i, 31% of flops_budget` instead of the step count."""
    of = f"/{total_steps}" if budget_share is None else f", {budget_share:.0%} of flops_budget"
    head = f"[step {step + 1}{of} {elapsed:.1f}s" + (f" eta {_duration(eta)}]" if eta is not None else "]")
    shown = [f"{SHORT.get(k, k)}={values[k]:.4g}" for k in HEADLINE if isinstance(values.get(k), (int, float))]
    phases = [f"{SHORT.get(name, name)} {_seconds(values[f'time/{name}_s'])}" for name in PHASES
              if values.get(f"time/{name}_s", 0.0) >= 0.0005]
    if "time/device_busy_share" in values:
        phases.append(f"busy {values['time/device_busy_share']:.0%}")
    return " ".join([head, *shown] + (["|", *phases] if phases else []))


def _seconds(seconds: float) -> str:
    """310ms below a second, else 1.2s."""
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def _duration(seconds: float) -> str:
    """12s, 4m05s or 3h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class MetricsLogger:
    """Append-only metrics per step; `resume_at` drops lines past the step a run restarts from."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, enabled: bool = True, total_steps: int = 0,
                 resume_at: Optional[int] = None, run_config: Optional[dict[str, Any]] = None,
                 flops_budget: Optional[float] = None) -> None:
        self.cfg, self.enabled, self.total_steps, self.flops_budget = cfg, enabled, total_steps, flops_budget
        self._flops_from: Optional[tuple[float, float]] = None  # (time, flops_total) of the first logged step
        self.dir = Path(run_dir)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._t0 = time.monotonic()
        self._first_step: Optional[int] = None  # the first step this process logged (a resumed run's ETA)
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
        if self._first_step is None:
            self._first_step = step
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
            elapsed = time.monotonic() - self._t0
            done = step + 1 - self._first_step
            eta = elapsed / done * (self.total_steps - step - 1) if self.total_steps else None
            share, flops = None, values.get("flops_total")
            if self.flops_budget and isinstance(flops, (int, float)):  # the budget ends the run: ETA by FLOPs
                share = flops / self.flops_budget
                t1, f1 = self._flops_from or (time.monotonic(), flops)
                self._flops_from = (t1, f1)
                rate = (flops - f1) / (time.monotonic() - t1) if flops > f1 else 0.0
                eta = (self.flops_budget - flops) / rate if rate > 0 else None
            print(console_line(step, self.total_steps, elapsed, eta, values, share), file=sys.stderr, flush=True)

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
