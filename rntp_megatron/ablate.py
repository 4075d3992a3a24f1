"""`rntp ablate --config recipes/configs/ablate_text.yaml [--scale NAME] [--set key=value]`: RNTP against plain
next-token training on real text, at matched compute.

1. Pretrain a small model once (`base` + `pretrain`, objective ntp) and evaluate it on held-out text.
2. From that checkpoint, run every branch (`base` + `branches.<name>`) until its own FLOPs (flops_total of
   rntp_megatron/flops.py: training + rollout + scoring) reach `budget.branch_flops`, in `budget.evals` equal
   slices; after each slice the branch's checkpoint is evaluated with `rntp eval` on the held-out split
   (next-token accuracy without and with a greedy thought, in the RPT entropy buckets; information gain;
   perplexity).
3. Write RUN_DIR/ablation.md and .json (one row per branch and evaluation) and RUN_DIR/ablation.png (held-out
   accuracy against the branch's cumulative FLOPs).

Every phase resumes: a finished slice is not run again, and a run killed mid-way restarts from its checkpoints.
The spec file holds `base` (a RunConfig tree), `pretrain`, `heldout` (sources), `budget`, `eval`, `branches` and
`scales` (named overlays merged into the spec by --scale); --set overrides the merged spec by dotted key.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from rntp_megatron.config import ConfigError, apply_override, build_config, to_dict

SPEC_KEYS = ("base", "pretrain", "heldout", "budget", "eval", "branches", "scales")
TABLE_COLUMNS = (("all", "no_thought"), ("all", "thought"), ("all", "info_gain"), ("all", "ppl"),
                 ("H>1.0", "no_thought"), ("H>1.0", "thought"), ("all", "thought_len"))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with the mappings of `over` merged in recursively (other values replace)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_spec(path: str | Path, scale: str | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """The ablation spec: the YAML file, its `scales[scale]` overlay merged in, then the dotted overrides."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown ablation keys {sorted(unknown)} (known: {', '.join(SPEC_KEYS)})")
    if scale is not None:
        if scale not in spec.get("scales", {}):
            raise ConfigError(f"--scale: {scale!r} is not one of {sorted(spec.get('scales', {}))} in {path}")
        spec = merge(spec, spec["scales"][scale])
    for o in overrides:
        apply_override(spec, o)
    if not spec.get("branches"):
        raise ConfigError(f"{path}: `branches` names no branch")
    if float(spec.get("budget", {}).get("branch_flops", 0)) <= 0:
        raise ConfigError(f"{path}: budget.branch_flops must be > 0")
    return spec


def phase_config(spec: dict[str, Any], phase: dict[str, Any], run_dir: Path, extra: dict[str, Any]) -> dict:
    """The RunConfig tree of one phase: base + the phase's overrides + where it writes; validated."""
    tree = merge(merge(spec.get("base", {}), phase), merge(extra, {
        "logging": {"dir": str(run_dir), "plot": False}, "checkpoint": {"dir": str(run_dir / "checkpoints")}}))
    return to_dict(build_config(tree))


def train(tree: dict[str, Any]) -> None:
    """One `rntp train` of the config tree, in process; resumes from its checkpoint.dir."""
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    trainer = Trainer(build_config(tree))
    try:
        if trainer.run():
            raise RuntimeError(f"training in {tree['logging']['dir']} stopped before its end (preempted)")
    finally:
        trainer.close()
        destroy_distributed()


def evaluate(config_path: Path, checkpoint: Path, spec: dict[str, Any], out: Path) -> dict[str, dict[str, float]]:
    """`rntp eval` of a checkpoint on the held-out sources (uniform sites, the model's entropy buckets)."""
    from rntp_megatron import eval_cmd

    overrides = [f"data.sources={json.dumps(spec['heldout'])}", "data.site_selection=uniform",
                 "data.episode_format=single", "data.sites_per_chunk=1",
                 *spec.get("eval", {}).get("set", [])]
    args = argparse.Namespace(config=str(config_path), checkpoint=str(checkpoint), overrides=overrides,
                              sites=int(spec.get("eval", {}).get("sites", 64)), out=str(out))
    if eval_cmd.run(args):
        raise RuntimeError(f"rntp eval failed on {checkpoint}")
    return json.loads(out.read_text())


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last record of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads([line for line in lines if line.strip()][-1])


def run_ablation(spec: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Pretrain once, run and evaluate every branch at equal FLOPs; the rows of the table (see module docstring)."""
    from rntp_megatron.checkpoint import latest_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pre_dir = run_dir / "pretrain"
    pre = phase_config(spec, merge(spec.get("pretrain", {}), {"rl": {"objective": "ntp"}}), pre_dir, {})
    done = pre_dir / "done.json"
    if not done.exists():
        train(pre)
        done.write_text(json.dumps(final_metrics(pre_dir)))
    pre_ckpt = latest_checkpoint(Path(pre["checkpoint"]["dir"]))
    (pre_dir / "config.yaml").write_text(yaml.safe_dump(pre))
    if not (pre_dir / "eval.json").exists():
        evaluate(pre_dir / "config.yaml", pre_ckpt, spec, pre_dir / "eval.json")
    start = json.loads((pre_dir / "eval.json").read_text())
    budget, slices = float(spec["budget"]["branch_flops"]), int(spec["budget"].get("evals", 1))
    for name, branch in spec["branches"].items():
        if branch is None:  # left out (by a scale)
            continue
        rows.append({"branch": name, "step": 0, "flops": 0.0, "eval": start})
        b_dir = run_dir / name
        for k in range(1, slices + 1):
            cfg = phase_config(spec, branch, b_dir, {"checkpoint": {"load": str(pre_ckpt)}, "schedule": {
                "flops_budget": budget * k / slices, "train_steps": 10**9}})
            out = b_dir / f"eval_{k}.json"
            if not out.exists():
                b_dir.mkdir(parents=True, exist_ok=True)
                (b_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
                train(cfg)
                evaluate(b_dir / "config.yaml", latest_checkpoint(b_dir / "checkpoints"), spec, out)
                (b_dir / f"metrics_{k}.json").write_text(json.dumps(final_metrics(b_dir)))
            last = json.loads((b_dir / f"metrics_{k}.json").read_text())
            rows.append({"branch": name, "step": int(last["step"]) + 1, "flops": last["flops_total"],
                         "flops_rollout": last["flops_rollout"], "flops_scoring": last["flops_scoring"],
                         "eval": json.loads(out.read_text())})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table: branch, step, FLOPs, then TABLE_COLUMNS of the evaluation."""
    head = ["branch", "step", "FLOPs"] + [f"{m} ({b})" if b != "all" else m for b, m in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["branch"], str(r["step"]), f"{r['flops']:.3g}"]
        for b, m in TABLE_COLUMNS:
            v = r["eval"].get(b, {}).get(m)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]["eval"].get("all", {}).get("n") if rows else None
    return "\n".join(lines) + (f"\n\n{int(n)} held-out sites per evaluation; H>1.0: sites where the model's "
                               "next-token entropy exceeds 1 nat." if n else "")


def plot_rows(rows: list[dict[str, Any]], out_png: Path, title: str) -> Path:
    """Held-out accuracy (no thought: solid; after a thought: dashed) and perplexity against cumulative FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(dict.fromkeys(r["branch"] for r in rows)):
        pts = [r for r in rows if r["branch"] == name]
        x = [r["flops"] for r in pts]
        color = f"C{i}"
        acc.plot(x, [r["eval"]["all"]["no_thought"] for r in pts], "-o", color=color, label=f"{name}: no thought")
        acc.plot(x, [r["eval"]["all"]["thought"] for r in pts], "--x", color=color, label=f"{name}: thought")
        ppl.plot(x, [r["eval"]["all"]["ppl"] for r in pts], "-o", color=color, label=name)
    acc.set(xlabel="branch FLOPs (train + rollout + scoring)", ylabel="held-out next-token accuracy")
    ppl.set(xlabel="branch FLOPs (train + rollout + scoring)", ylabel="held-out perplexity (per token)")
    for ax in (acc, ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the ablation spec (recipes/configs/ablate_text.yaml)")
    parser.add_argument("--scale", default=None, help="a named overlay of the spec's `scales` (e.g. smoke, gpu)")
    parser.add_argument("--run-dir", default="runs/ablate", help="checkpoints, evaluations, table and plot")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the spec, e.g. --set budget.branch_flops=1e12")


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.scale, args.overrides)
    run_dir = Path(args.run_dir)
    rows = run_ablation(spec, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # every rank ran the phases; one writes the results
        table = format_rows(rows)
        (run_dir / "ablation.md").write_text(table + "\n")
        (run_dir / "ablation.json").write_text(json.dumps(rows, indent=1))
        png = plot_rows(rows, run_dir / "ablation.png", f"{Path(args.config).stem} ({args.scale or 'default'})")
        print(f"\n{table}\n\ntable: {run_dir / 'ablation.md'}\nplot: {png}")
    return 0
