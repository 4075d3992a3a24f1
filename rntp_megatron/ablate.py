"""`rntp ablate --config recipes/configs/ablate_text.yaml [--scale NAME] [--seeds N] [--set key=value]`: RNTP
against plain next-token training on real text, at matched compute.

1. Pretrain a small model once (`base` + `pretrain`, objective ntp) and evaluate it on held-out text: its greedy
   next-token accuracy and its untrained think mode are the two baselines. That evaluation also fixes the
   held-out sites' entropy buckets (RPT's easy / medium / hard: entropy > 0.5 / 1.0 / 1.5 nats under the
   pretrained model), which every later checkpoint is bucketed by (`rntp eval --buckets-from`).
2. From that checkpoint, run every branch (`base` + `branches.<name>`) until its own FLOPs (flops_total of
   rntp_megatron/flops.py: training + rollout + scoring) reach `budget.branch_flops`, in `budget.evals` equal
   slices, once per seed (`seeds`; the seed is the run's `seed`: thought sampling and site draws); after each
   slice the checkpoint is evaluated on the same held-out sites. The next-token branch (rl.objective ntp)
   continues the pretraining run itself: its checkpoint (weights, Adam state, step, learning-rate schedule,
   data cursor) is copied with its FLOP count set to 0, so it trains on text the pretraining had not reached;
   it samples nothing, so it runs once (every seed would repeat it bit for bit).
3. Write RUN_DIR/ablation.md and .json: one row per branch, seed and evaluation, and the comparison of each
   branch's last evaluation with next-token training: the per-site difference in held-out next-token accuracy
   (a branch in its own mode: RNTP branches answer after a greedy thought, next-token training and the
   pretrained model predict greedily; seeds averaged per site), with a paired bootstrap 95% interval over the
   sites, per entropy bucket. RUN_DIR/ablation.png plots accuracy against cumulative FLOPs.

Every phase resumes: a finished slice is not run again, and a run killed mid-way restarts from its checkpoints.
The spec file holds `base` (a RunConfig tree), `pretrain`, `heldout` (sources), `budget`, `eval`, `seeds`,
`branches` and `scales` (named overlays merged into the spec by --scale); --set overrides the merged spec by
dotted key.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rntp_megatron.config import ConfigError, apply_override, build_config, to_dict

SPEC_KEYS = ("base", "pretrain", "heldout", "budget", "eval", "seeds", "branches", "scales")
BUCKETS = (("all", "all"), ("easy", "H>0.5"), ("medium", "H>1.0"), ("hard", "H>1.5"))  # RPT's, by the fixed model
BOOTSTRAP_REPS = 2000
TABLE_COLUMNS = (("all", "next_token"), ("all", "no_thought"), ("all", "thought"), ("all", "info_gain"), ("all", "ppl"),
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


def evaluate(config_path: Path, checkpoint: Path, spec: dict[str, Any], out: Path, buckets: Path
             ) -> dict[str, dict[str, float]]:
    """`rntp eval` of a checkpoint on the held-out sources (uniform sites), bucketed by the entropies in `buckets`
    (written by the first evaluation, the pretrained model's)."""
    from rntp_megatron import eval_cmd

    overrides = [f"data.sources={json.dumps(spec['heldout'])}", "data.site_selection=uniform",
                 "data.episode_format=single", "data.sites_per_chunk=1",
                 *spec.get("eval", {}).get("set", [])]
    args = argparse.Namespace(config=str(config_path), checkpoint=str(checkpoint), overrides=overrides,
                              sites=int(spec.get("eval", {}).get("sites", 64)), out=str(out),
                              buckets_from=str(buckets))
    if eval_cmd.run(args):
        raise RuntimeError(f"rntp eval failed on {checkpoint}")
    return json.loads(out.read_text())


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last record of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads([line for line in lines if line.strip()][-1])


def continue_from(pre_ckpt: Path, ckpt_dir: Path) -> None:
    """ckpt_dir starts as a copy of the pretraining's last checkpoint (model, optimizer, step, data cursor, RNG)
    with its FLOP count 0: a run resuming it continues the pretraining exactly, its budget counting its own FLOPs."""
    from rntp_megatron.checkpoint import LATEST, latest_checkpoint

    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 copies; the others wait for its `latest`
        while latest_checkpoint(ckpt_dir) is None:
            time.sleep(0.5)
        return
    if latest_checkpoint(ckpt_dir) is not None:
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    copy_dir = ckpt_dir / pre_ckpt.name
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.copytree(pre_ckpt, copy_dir)
    state_file = copy_dir / "trainer_state" / "global.json"
    state = json.loads(state_file.read_text())
    state["flops"] = {}
    state_file.write_text(json.dumps(state, sort_keys=True))
    (ckpt_dir / LATEST).write_text(copy_dir.name)


def run_ablation(spec: dict[str, Any], run_dir: Path, seeds: int = 1) -> list[dict[str, Any]]:
    """Pretrain once, run and evaluate every branch and seed at equal FLOPs; the rows of the table (see module
    docstring). A row's `sites` names the evaluation's per-site file."""
    from rntp_megatron.checkpoint import checkpoint_step, latest_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    buckets = run_dir / "heldout_sites.json"  # the sites' entropy under the pretrained model, for every evaluation
    pre_dir = run_dir / "pretrain"
    pre = phase_config(spec, merge(spec.get("pretrain", {}), {"rl": {"objective": "ntp"}}), pre_dir, {})
    done = pre_dir / "done.json"
    if not done.exists():
        train(pre)
        done.write_text(json.dumps(final_metrics(pre_dir)))
    pre_ckpt = latest_checkpoint(Path(pre["checkpoint"]["dir"]))
    (pre_dir / "config.yaml").write_text(yaml.safe_dump(pre))
    if not (pre_dir / "eval.json").exists():
        evaluate(pre_dir / "config.yaml", pre_ckpt, spec, pre_dir / "eval.json", buckets)
    start = {"branch": "pretrained", "seed": 0, "step": 0, "flops": 0.0,
             "eval": json.loads((pre_dir / "eval.json").read_text()), "sites": str(pre_dir / "eval.sites.json")}
    rows.append(start)
    budget, slices = float(spec["budget"]["branch_flops"]), int(spec["budget"].get("evals", 1))
    base_seed = int(spec.get("base", {}).get("seed", 1234))
    for name, branch in spec["branches"].items():
        if branch is None:  # left out (by a scale)
            continue
        continues = (branch.get("rl") or {}).get("objective") == "ntp"
        for seed in range(1 if continues else seeds):
            b_dir = run_dir / name / f"seed_{seed}"
            if continues:
                continue_from(pre_ckpt, b_dir / "checkpoints")
            first_step = checkpoint_step(pre_ckpt) if continues else 0
            for k in range(1, slices + 1):
                extra = {"seed": base_seed + seed, "schedule": {"flops_budget": budget * k / slices,
                                                                "train_steps": 10**9}}
                if not continues:
                    extra["checkpoint"] = {"load": str(pre_ckpt)}
                cfg = phase_config(spec, branch, b_dir, extra)
                out = b_dir / f"eval_{k}.json"
                if not out.exists():
                    b_dir.mkdir(parents=True, exist_ok=True)
                    (b_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
                    train(cfg)
                    evaluate(b_dir / "config.yaml", latest_checkpoint(b_dir / "checkpoints"), spec, out, buckets)
                    (b_dir / f"metrics_{k}.json").write_text(json.dumps(final_metrics(b_dir)))
                last = json.loads((b_dir / f"metrics_{k}.json").read_text())
                rows.append({"branch": name, "seed": seed, "mode": "next_token" if continues else "thought",
                             "step": int(last["step"]) + 1 - first_step,
                             "flops": last["flops_total"], "flops_rollout": last["flops_rollout"],
                             "flops_scoring": last["flops_scoring"], "eval": json.loads(out.read_text()),
                             "sites": str(out.with_suffix(".sites.json"))})
    return rows


def paired_bootstrap(diff: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> tuple[float, float, float]:
    """mean(diff[n]) and the 2.5 / 97.5 percentiles of its mean over `reps` resamples of the n sites (with
    replacement; each site keeps its pair, so what the two models share cancels)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    means = diff[rng.integers(0, len(diff), size=(reps, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def branch_accuracy(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per branch (and the two baselines): its per-site held-out accuracy at its last evaluation in its own mode
    (row["mode"]: RNTP after a greedy thought, next-token training greedy; the pretrained model both ways),
    averaged over seeds; with the sites' entropies."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        last[(r["branch"], r["seed"])] = r  # rows come in slice order: the last one stays
    out: dict[str, dict[str, Any]] = {}
    for (name, _), r in last.items():
        per = json.loads(Path(r["sites"]).read_text())
        modes = ([(name, r["mode"])] if name != "pretrained" else
                 [("baseline: pretrained, greedy next token", "next_token"),
                  ("baseline: pretrained, untrained think mode", "thought")])
        for label, metric in modes:
            entry = out.setdefault(label, {"runs": [], "entropy": np.asarray(per["entropy"], dtype=float),
                                           "metric": metric, "flops": r["flops"]})
            entry["runs"].append(np.asarray(per[metric], dtype=float))
    for entry in out.values():
        entry["accuracy"] = np.mean(entry.pop("runs"), axis=0)
    return out


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each branch and baseline against next-token training: per bucket, accuracy, the mean per-site difference
    and its paired bootstrap 95% interval."""
    acc = branch_accuracy(rows)
    continued = [r["branch"] for r in rows if r.get("mode") == "next_token"]
    if not continued:
        return []
    ref = acc[continued[0]]
    entropy = ref["entropy"]
    out = []
    for label, entry in acc.items():
        cells = {}
        for bucket, rule in BUCKETS:
            keep = np.ones_like(entropy, dtype=bool) if rule == "all" else entropy > float(rule[2:])
            if not keep.any():
                continue
            diff = entry["accuracy"][keep] - ref["accuracy"][keep]
            cells[bucket] = {"n": int(keep.sum()), "accuracy": float(entry["accuracy"][keep].mean()),
                             **dict(zip(("diff", "lo", "hi"), paired_bootstrap(diff)))}
        out.append({"branch": label, "metric": entry["metric"], "flops": entry["flops"], "buckets": cells})
    return out


def format_comparison(table: list[dict[str, Any]], seeds: int) -> str:
    """The comparison as Markdown: accuracy and the difference to next-token training [95% interval] by bucket."""
    if not table:
        return ""
    n = {b: table[0]["buckets"][b]["n"] for b, _ in BUCKETS if b in table[0]["buckets"]}
    head = ["branch (mode)"] + [f"{b} (n={n[b]})" for b, _ in BUCKETS if b in n]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [f"{r['branch']} ({r['metric']})"]
        for b, _ in BUCKETS:
            if b in n:
                c = r["buckets"][b]
                cells.append(f"{c['accuracy']:.3f} ({c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}])")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        f"Held-out next-token accuracy of each branch in its own mode, and its difference to next-token training "
        f"[paired bootstrap 95% interval over the sites, {BOOTSTRAP_REPS} resamples; RNTP branches averaged over "
        f"{seeds} seed(s) per site]. Buckets by the pretrained model's entropy at the site (RPT): easy > 0.5, "
        f"medium > 1.0, hard > 1.5 nats (they overlap).", "", *lines])


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table: branch, step, FLOPs, then TABLE_COLUMNS of the evaluation."""
    head = ["branch", "seed", "step", "FLOPs"] + [f"{m} ({b})" if b != "all" else m for b, m in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["branch"], str(r["seed"]), str(r["step"]), f"{r['flops']:.3g}"]
        for b, m in TABLE_COLUMNS:
            v = r["eval"].get(b, {}).get(m)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]["eval"].get("all", {}).get("n") if rows else None
    return "\n".join(lines) + (f"\n\n{int(n)} held-out sites per evaluation; H>1.0: sites where the pretrained model's "
                               "next-token entropy exceeds 1 nat." if n else "")


def plot_rows(rows: list[dict[str, Any]], out_png: Path, title: str) -> Path:
    """Held-out accuracy (greedy next token: solid; after a thought: dashed) and perplexity against cumulative FLOPs
    (seed 0 of each branch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(11, 4))
    start = rows[0]
    for i, name in enumerate(dict.fromkeys(r["branch"] for r in rows[1:])):
        pts = [start] + [r for r in rows if r["branch"] == name and r["seed"] == 0]
        x = [r["flops"] for r in pts]
        color = f"C{i}"
        acc.plot(x, [r["eval"]["all"]["next_token"] for r in pts], "-o", color=color, label=f"{name}: next token")
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
    parser.add_argument("--seeds", type=int, default=None,
                        help="runs of each RNTP branch, seeds base.seed + 0..N-1 (default: the spec's `seeds`, or 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the spec, e.g. --set budget.branch_flops=1e12")


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.scale, args.overrides)
    run_dir = Path(args.run_dir)
    seeds = args.seeds if args.seeds is not None else int(spec.get("seeds", 1))
    if seeds < 1:
        raise ConfigError(f"--seeds: needs at least 1 run per branch, got {seeds}")
    rows = run_ablation(spec, run_dir, seeds)
    if int(os.environ.get("RANK", "0")) == 0:  # every rank ran the phases; one writes the results
        compared = comparison(rows)
        table = format_comparison(compared, seeds) + "\n\n" + format_rows(rows)
        (run_dir / "ablation.md").write_text(table + "\n")
        (run_dir / "ablation.json").write_text(json.dumps({"rows": rows, "comparison": compared}, indent=1))
        png = plot_rows(rows, run_dir / "ablation.png", f"{Path(args.config).stem} ({args.scale or 'default'})")
        print(f"\n{table}\n\ntable: {run_dir / 'ablation.md'}\nplot: {png}")
    return 0
