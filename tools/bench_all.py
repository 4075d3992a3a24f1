"""The headline benchmarks side by side in one run (`make bench`): each row runs one tool of tools/ at the chosen
size, reads the table the tool writes with --json, and checks it against its goal.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_all.py [--smoke | --full] [--out runs/bench] [--only NAME ...]

Sizes: --smoke runs every tool at its own --smoke size (seconds each: the CI check); the default fits in ~15 minutes
on a 2-core CPU machine; --full runs the sizes BENCHMARKS.md quotes. Written to --out: summary.md and summary.json
(the commit, the machine, the load average before and after, and one row per measurement with its value, goal and
PASS / FAIL / not available / error), and each tool's JSON table and log. A row is one entry of ROWS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = "sglang-venv/bin/python"
Judge = Callable[[list[dict]], tuple[str, bool]]


@dataclass(frozen=True)
class Row:
    """One headline measurement: `tool` (a file of tools/) with `args`, on `nproc` torchrun ranks when > 1; each
    size adds its arguments (smoke adds --smoke); `judge` turns the tool's JSON rows into (value, goal met)."""

    name: str
    tool: str
    goal: str
    judge: Judge
    args: list[str] = field(default_factory=list)
    default: list[str] = field(default_factory=list)
    full: list[str] = field(default_factory=list)
    nproc: int = 1
    needs: tuple[str, ...] = ()  # files (relative to the repo) without which the row is "not available"


def _row(rows: list[dict], prefix: str) -> dict:
    """The first JSON row whose name starts with prefix."""
    found = [r for r in rows if r["name"].startswith(prefix)]
    if not found:
        raise KeyError(f"no row named {prefix!r}... in {[r['name'] for r in rows]}")
    return found[0]


def judge_loss_hook(rows: list[dict]) -> tuple[str, bool]:
    """RNTP loss hook (policy tokens at the end of each row) / plain next-token step, median CPU time."""
    hook, every = _row(rows, "RNTP loss hook (")["ratio_median_cpu"], rows[-1]["ratio_median_cpu"]
    return f"{hook:.3f}x plain (every token a policy token: {every:.3f}x)", hook <= 1.05


def judge_logprob_memory(rows: list[dict]) -> tuple[str, bool]:
    """Forward peak and memory kept for backward of the chunked log-probs / naive log_softmax."""
    ratio = _row(rows, "ours / naive logp")
    return (f"forward peak {ratio['forward peak']:.3f}x naive, kept for backward "
            f"{ratio.get('kept for backward', 0.0):.3f}x"), ratio["forward peak"] <= 1 / 3


def judge_weight_sync(rows: list[dict]) -> tuple[str, bool]:
    """Each channel's fastest source, as multiples of one memcpy of the model's bytes."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if " <- " in r["name"]:
            channel, source = r["name"].split(" <- ")
            best[channel] = min(best.get(channel, (float("inf"), "")), (r["x_memcpy"], source))
    text = ", ".join(f"{c} {x:.1f}x ({s})" for c, (x, s) in best.items())
    return f"{text} memcpy", min(x for x, _ in best.values()) <= 3


def judge_delta(rows: list[dict]) -> tuple[str, bool]:
    """Bytes and time of a sparse push / a dense push, per channel and fleet size."""
    text = ", ".join(f"{r['name']}: bytes {r['bytes_sparse_over_dense']:.3f}, time {r['time_sparse_over_dense']:.2f}"
                     for r in rows)
    return text, max(r["bytes_sparse_over_dense"] for r in rows) <= 0.1


def judge_engine(rows: list[dict]) -> tuple[str, bool]:
    """The in-process engine's tokens/s / HF generate's (both with a KV cache)."""
    ratio = _row(rows, "engine (KV cache)")["vs_hf"]
    return f"{ratio:.2f}x HF generate", ratio >= 1


def judge_data_supply(rows: list[dict]) -> tuple[str, bool]:
    """Episodes/s of the data path / episodes/s a training step consumes."""
    ratio = _row(rows, "data path / training consumption")["ratio"]
    return f"{ratio:,.0f}x consumption", ratio >= 50


def judge_data_scale(rows: list[dict]) -> tuple[str, bool]:
    """Read amplification at DP=64 and the slowest first episode after a resume."""
    amplification = _row(rows, "read amplification, DP=64")["read_amplification"]
    resume = max(r["seconds"] for r in rows if r["name"].startswith("first episode after resume"))
    return f"{amplification:.3f}x at DP=64; resume {resume:.3f} s", amplification <= 1.1 and resume < 2


def judge_rl_step(rows: list[dict]) -> tuple[str, bool]:
    """Step time and peak memory of the RL step with shared context / per-row (rows named "shared ..." and
    "per-row ...", with step_s and peak_mib)."""
    shared, per_row = _row(rows, "shared"), _row(rows, "per-row")
    speedup, memory = per_row["step_s"] / shared["step_s"], shared["peak_mib"] / per_row["peak_mib"]
    return f"{speedup:.2f}x faster, peak memory {memory:.2f}x per-row", speedup >= 3 and memory <= 1


ROWS = [
    Row("loss hook vs plain step", "bench_rl_loss.py", "RNTP step <= 1.05x the plain step (median CPU time)",
        judge_loss_hook, default=["--repeats", "5"], full=["--repeats", "9"]),
    Row("log-prob memory", "bench_logprobs_memory.py", "forward peak <= 1/3 of a naive log_softmax",
        judge_logprob_memory, default=["--rows", "2048", "--vocab", "32768", "--chunk", "256"],
        full=["--rows", "2048", "--vocab", "131072", "--chunk", "256"]),
    Row("weight sync per channel vs memcpy", "bench_weight_sync.py", "fastest channel <= 3x one memcpy",
        judge_weight_sync, default=["--layers", "4", "--hidden", "1024", "--repeats", "2"], full=["--repeats", "3"],
        nproc=4, needs=(SGLANG_PYTHON,)),
    Row("delta sync (2% of elements changed)", "bench_weight_sync.py", "bytes sent <= 0.1 of a full push",
        judge_delta, args=["--replicas", "1", "--delta", "0.02"], default=["--hidden", "1024", "--repeats", "1"],
        full=["--replicas", "1", "2", "--hidden", "1024", "--repeats", "3"], needs=(SGLANG_PYTHON,)),
    Row("engine vs HF generate", "bench_megatron_engine.py", ">= 1x HF generate tokens/s",
        judge_engine, default=["--prompts", "8", "--n", "8", "--new", "16", "--repeats", "5", "--loop-rows", "64"],
        full=["--prompts", "8", "--n", "8", "--new", "16", "--repeats", "15", "--loop-rows", "64,512"]),
    Row("data supply", "bench_data.py", "data path >= 50x what training consumes", judge_data_supply,
        default=["--copies", "2", "--episodes", "2000", "--steps", "3"]),
    Row("read amplification and resume", "bench_data.py", "<= 1.1x bytes read at DP=64; resume < 2 s",
        judge_data_scale, args=["--scale"]),
    Row("RL step, shared context vs per-row", "bench_rl_step.py", ">= 3x faster, peak memory no higher",
        judge_rl_step, needs=("tools/bench_rl_step.py",)),
]


def command(row: Row, size: str, json_path: Path) -> list[str]:
    """The tool's command line at `size` (smoke, default or full), writing its table to json_path."""
    extra = {"smoke": ["--smoke"], "default": row.default, "full": row.full}[size]
    script = [str(ROOT / "tools" / row.tool), *row.args, *extra, "--json", str(json_path)]
    if row.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(row.nproc), *script]
    return [sys.executable, *script]


def slug(name: str) -> str:
    """A row's file name stem: its name in lower case, runs of other characters as '_'."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def run_row(row: Row, size: str, out: Path, timeout_s: float) -> dict:
    """Run one row's tool and judge its table: {name, goal, value, result, seconds, command, load_after}."""
    json_path, log_path = out / f"{slug(row.name)}.json", out / f"{slug(row.name)}.log"
    cmd = command(row, size, json_path)
    shown = " ".join(["torchrun" if row.nproc > 1 else "python"] +
                     [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd[1:-2]
                      if c not in ("-m", "torch.distributed.run")])
    result = {"name": row.name, "goal": row.goal, "command": shown, "seconds": 0.0}
    missing = [n for n in row.needs if not (ROOT / n).exists()]
    if missing:
        return {**result, "value": f"{', '.join(missing)} missing", "result": "not available"}
    json_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
        failed = f"exit code {done.returncode}" if done.returncode else None
    except subprocess.TimeoutExpired:
        failed = f"timed out after {timeout_s:.0f} s"
    result["seconds"] = time.perf_counter() - start
    result["load_after"] = os.getloadavg()[0]
    if failed or not json_path.exists():
        return {**result, "value": f"{failed or 'no JSON written'}, see {log_path.name}", "result": "error"}
    try:
        value, met = row.judge(json.loads(json_path.read_text())["rows"])
    except (KeyError, ValueError, ZeroDivisionError) as e:
        return {**result, "value": f"table not understood: {e!r}", "result": "error"}
    return {**result, "value": value, "result": "PASS" if met else "FAIL"}


def machine() -> dict:
    """This machine in words: host, CPU model and count, memory, Python and torch."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import torch

    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def commit() -> str:
    """HEAD's hash, with "+dirty" when the working tree has uncommitted changes."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain") else "")


def summary_markdown(summary: dict) -> str:
    """The summary as a markdown table with its header lines."""
    m = summary["machine"]
    lines = [f"# Benchmarks, {summary['size']} size ({summary['date']})", "",
             f"commit {summary['commit']}; {m['host']}: {m['cores']} x {m['cpu']}, {m['memory_gib']} GiB"
             f"{', ' + m['gpu'] if m['gpu'] else ''}; Python {m['python']}, torch {m['torch']}; load average "
             f"{summary['load_before']:.1f} before, {summary['load_after']:.1f} after; {summary['seconds']:.0f} s", "",
             "| measurement | value | goal | result | s | command |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['name']} | {r['value']} | {r['goal']} | {r['result']} | {r['seconds']:.0f} | "
                     f"`{r['command']}` |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="every tool at its --smoke size (CI)")
    size.add_argument("--full", action="store_true", help="the sizes BENCHMARKS.md quotes")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="rows whose name starts with one of these")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a row may take")
    args = parser.parse_args(argv)
    chosen = "smoke" if args.smoke else "full" if args.full else "default"
    rows = [r for r in ROWS if not args.only or any(r.name.startswith(o) for o in args.only)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"size": chosen, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
               "machine": machine(), "load_before": os.getloadavg()[0], "rows": []}
    start = time.perf_counter()
    for row in rows:
        print(f"{row.name}: ...", flush=True)
        summary["rows"].append(run_row(row, chosen, out, args.timeout))
        r = summary["rows"][-1]
        print(f"{row.name}: {r['result']}: {r['value']} ({r['seconds']:.0f} s)", flush=True)
    summary.update(load_after=os.getloadavg()[0], seconds=time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    print("\n" + summary_markdown(summary))
    return 1 if any(r["result"] == "error" for r in summary["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
