"""Weight sync between hosts vs on one host, on the namespace cluster (tools/slurm_cluster.sh start, 2+ nodes).

Same config, same distributed channel, one after the other:
  one host:  `srun -N1 -w node1 rntp train` with a server the trainer starts beside it (rollout.sglang.host loopback)
  two hosts: `sbatch -N 2 slurm/train.sbatch` with RNTP_SGLANG_NODES=1 (trainer on node1, replica on node2), started
             from the one-host run's exported initial weights
Prints the per-step `time/weight_sync_s` (trainer side: the whole push, HTTP calls included) and the job times.

  python tools/bench_many_hosts.py [--out DIR] [--steps N] [--set section.key=value ...] [--smoke] [--json PATH]

--smoke: 2 steps (CI, tests/test_slurm_cluster.py, on the cluster its module starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_io import parse_args, write_json  # tools/, beside this script

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tools" / "slurm_cluster.sh"
RECIPE = REPO / "recipes" / "configs" / "demo_rl.yaml"
SHRINK = ["schedule.global_batch_size=16", "schedule.micro_batch_size=8", "rl.group_size=4",
          "rollout.max_new_tokens=12", "logging.progress=false", "logging.plot=false", "checkpoint.save_interval=100"]
CPU_FLAGS = ("--device cpu --attention-backend torch_native --disable-cuda-graph --mem-fraction-static 0.3 "
             "--max-total-tokens 4096 --dtype float32 --skip-server-warmup")


def login(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """argv on the cluster's login node."""
    return subprocess.run([str(CLUSTER), "login", *argv], text=True, capture_output=True, **kw)


def syncs(log_dir: Path) -> list[float]:
    """weight_sync_s of each logged step."""
    return [json.loads(line)["time/weight_sync_s"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_many_hosts"))
    parser.add_argument("--steps", type=int, default=4, help="train steps of each run (the first forms the group)")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parse_args(parser, smoke={"steps": 2})
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: the median after the first push needs at least 2 steps")
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    sglang_python = str(REPO / "sglang-venv" / "bin" / "python")
    overrides = [*SHRINK, f"schedule.train_steps={args.steps}", *args.sets]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SGLANG_USE_CPU_ENGINE": "1"}

    one = out / "one_host"
    sets = [*overrides, f"logging.dir={one}", f"checkpoint.dir={one / 'ckpt'}", "rollout.engine=sglang",
            "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
            f"rollout.sglang.python={sglang_python}",
            'rollout.sglang.extra_args=[--mem-fraction-static,"0.3"]']
    t0 = time.monotonic()
    run = login(["srun", "-N", "1", "-w", "node1", "-n", "1", "-t", "20", sys.executable, "-m", "rntp_megatron.cli",
                 "train", "--config", str(RECIPE), *[a for s in sets for a in ("--set", s)]], cwd=out, env=env)
    one_s = time.monotonic() - t0
    if run.returncode != 0:
        sys.exit(f"one-host run failed:\n{run.stderr[-3000:]}")
    [initial] = list(one.rglob("initial"))  # the HF folder the trainer exported for its server

    two = out / "two_hosts"
    env2 = {**env, "RNTP_PYTHON": sys.executable, "RNTP_SGLANG_NODES": "1", "RNTP_SGLANG_MODEL": str(initial),
            "RNTP_SGLANG_PYTHON": sglang_python, "RNTP_SGLANG_ARGS": CPU_FLAGS, "RNTP_RUN_DIR": str(two)}
    t0 = time.monotonic()
    job = login(["sbatch", "--wait", "-N", "2", "--ntasks-per-node=1", "-t", "20", "-J", "bench-hosts",
                 str(REPO / "slurm" / "train.sbatch"), str(RECIPE), *[a for s in overrides for a in ("--set", s)]],
                cwd=out, env=env2)
    two_s = time.monotonic() - t0
    if job.returncode != 0:
        sys.exit(f"two-host job failed ({job.stdout} {job.stderr}); see {out}/bench-hosts-*.out")

    rows = [{"name": name, "job_s": secs, "sync_s": s, "sync_median_after_first_s": statistics.median(s[1:])}
            for name, secs, s in (("one host (server beside trainer)", one_s, syncs(one)),
                                  ("two hosts (node1 -> node2)", two_s, syncs(two / "logs")))]
    ratio = rows[1]["sync_median_after_first_s"] / rows[0]["sync_median_after_first_s"]
    print(f"{'run':<34}{'job s':>8}{'sync s per step (first: group formed)':>44}{'median after first':>22}")
    for r in rows:
        print(f"{r['name']:<34}{r['job_s']:>8.0f}{' '.join(f'{x:.3f}' for x in r['sync_s']):>44}"
              f"{r['sync_median_after_first_s']:>22.3f}")
    print(f"ratio two hosts / one host (median after first): {ratio:.2f}")
    write_json(args.json, "bench_many_hosts", [{k: v for k, v in r.items() if k != "sync_s"} for r in rows]
               + [{"name": "ratio two hosts / one host", "ratio": ratio}], args)


if __name__ == "__main__":
    main()
