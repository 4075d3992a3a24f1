"""How sparse is a weight update once served in bf16? Trains a config and, after every step, counts the elements
whose bf16 value (the dtype a rollout server holds) differs bit for bit from the previous step's.

    .venv/bin/python tools/measure_weight_delta.py --config recipes/configs/demo_rl.yaml \
        --set checkpoint.load=runs/delta/pretrain/checkpoints/iter_0000200 --set schedule.lr=1.0e-6

Printed per step: fraction of bf16 elements changed (all parameters; and the largest / smallest per tensor), the
learning rate, and the bytes a delta of (int32 index, bf16 value) pairs would send as a fraction of the full
bf16 tensors (3 x the changed fraction: 6 bytes per changed element against 2 per element). Delta sync (slime,
verl) pays off where that is well below 1. One process; the parameters are this rank's (no model parallelism).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from bench_io import parse_args, write_json

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SETS = ["schedule.train_steps=2", "schedule.global_batch_size=8", "schedule.micro_batch_size=8",
              "rollout.max_new_tokens=8", "checkpoint.save_interval=0"]


def bf16_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the parameter cast to bf16, as int16 bits (so that -0.0 vs 0.0 and NaNs compare exactly)."""
    return {n: p.detach().to(torch.bfloat16).view(torch.int16).clone() for n, p in model.named_parameters()}


def changed_fractions(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """name -> fraction of elements whose bits differ between before[name] and after[name]."""
    return {n: (before[n] != after[n]).float().mean().item() for n in before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "demo_rl.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    args = parse_args(parser, smoke={"overrides": list(SMOKE_SETS)})  # a --set given after --smoke wins
    with tempfile.TemporaryDirectory(prefix="rntp-weight-delta-") as tmp:
        # --smoke writes its run (metrics, no checkpoints) to a temporary folder unless logging.dir is set
        smoke_dir = [f"logging.dir={tmp}"] if args.smoke else []
        measure(args, smoke_dir + args.overrides)


def measure(args: argparse.Namespace, overrides: list[str]) -> None:
    """Train args.config with `overrides`, printing each step's changed fraction of bf16 elements; a summary."""
    from rntp_megatron.config import load_config
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    trainer = Trainer(load_config(args.config, overrides))
    sizes = {n: p.numel() for n, p in trainer.model.named_parameters()}
    total = sum(sizes.values())
    state = {"bits": bf16_bits(trainer.model)}
    log = trainer.metrics.log
    rows = []

    def log_with_delta(step: int, values: dict[str, float]) -> None:
        bits = bf16_bits(trainer.model)
        frac = changed_fractions(state["bits"], bits)
        state["bits"] = bits
        overall = sum(frac[n] * sizes[n] for n in frac) / total
        values["bf16_changed_frac"] = overall
        rows.append((step, values.get("lr", float("nan")), overall, max(frac.values()), min(frac.values())))
        print(f"step {step}: lr {rows[-1][1]:.2e}  bf16 elements changed {overall:.4f} "
              f"(per tensor {rows[-1][4]:.4f}..{rows[-1][3]:.4f}), delta bytes / full {3 * overall:.3f}", flush=True)
        log(step, values)

    trainer.metrics.log = log_with_delta
    try:
        trainer.run()
    finally:
        trainer.close()
        destroy_distributed()
    fracs = [r[2] for r in rows]
    print(f"\n{total} parameters over {len(sizes)} tensors; {len(rows)} steps: changed fraction mean "
          f"{sum(fracs) / len(fracs):.4f}, min {min(fracs):.4f}, max {max(fracs):.4f}")
    write_json(args.json, "measure_weight_delta", [
        {"name": f"step {step}", "lr": lr, "changed_fraction": overall, "tensor_max": high, "tensor_min": low,
         "delta_bytes_over_full": 3 * overall} for step, lr, overall, high, low in rows] + [
        {"name": "changed fraction mean", "changed_fraction": sum(fracs) / len(fracs), "min": min(fracs),
         "max": max(fracs), "delta_bytes_over_full": 3 * sum(fracs) / len(fracs)}],
        args, parameters=total, tensors=len(sizes))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
