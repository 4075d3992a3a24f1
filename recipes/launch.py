"""Launch a recipe with NeMo-Run and exit non-zero unless every task SUCCEEDED.

    python -m recipes.launch tiny_cpu --executor local --run-dir runs/tiny [--set rl.group_size=8 ...]
    python -m recipes.launch qwen3_8b_b200 --executor slurm --account A --partition P --nodes 1 \
        [--ssh-host login --ssh-user me --job-dir /lustre/me/nemo-run] [--container-image nvcr.io/...]

`run.run` can return normally while its task failed, so the experiment's status is what decides the exit code.
Without --ssh-host the Slurm commands run on this machine (LocalTunnel), as on a login node.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import nemo_run as run

from recipes import rntp_recipes

RECIPES = {"tiny_cpu": rntp_recipes.tiny_cpu, "qwen3_8b_b200": rntp_recipes.qwen3_8b_b200,
           "qwen3_30b_a3b_b200": rntp_recipes.qwen3_30b_a3b_b200,
           "llama3_1_70b_b200_fp8": rntp_recipes.llama3_1_70b_b200_fp8}
# GPUs a Slurm node of each recipe gives the job (--gpus-per-node overrides; 0 asks for none)
GPUS_PER_NODE = {"tiny_cpu": 0, "qwen3_8b_b200": 8, "qwen3_30b_a3b_b200": 8, "llama3_1_70b_b200_fp8": 8}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.launch", description=__doc__.splitlines()[0])
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--name", default=None, help="experiment name (default: rntp-<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default="runs/tiny_cpu", help="tiny_cpu only: logs and checkpoints")
    p.add_argument("--train-steps", type=int, default=3, help="tiny_cpu only")
    p.add_argument("--ntasks-per-node", type=int, default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="Slurm: GPUs per node (default: the recipe's, 8 on B200 nodes, none for tiny_cpu; 0: none)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--account", default="local")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--ssh-host", default=None)
    p.add_argument("--ssh-user", default=None)
    p.add_argument("--job-dir", default="", help="remote NeMo-Run job dir (SSH tunnel)")
    p.add_argument("--container-image", default=None)
    p.add_argument("--setup-lines", default=None, help="shell lines run before srun, e.g. 'source venv/bin/activate'")
    p.add_argument("--git-archive", action="store_true", help="ship the git HEAD instead of using the shared tree")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[run.Partial, run.Executor]:
    """The recipe and its executor from the command line."""
    if args.recipe == "tiny_cpu":
        task = rntp_recipes.tiny_cpu(args.run_dir, args.train_steps, args.overrides)
    else:
        task = RECIPES[args.recipe](args.overrides)
    if args.executor == "local":
        return task, rntp_recipes.local_executor(args.ntasks_per_node or 2)
    if args.ssh_host:
        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir="")  # "" keeps job files under NEMORUN_HOME (no copy)
    gpus = GPUS_PER_NODE[args.recipe] if args.gpus_per_node is None else args.gpus_per_node
    executor = rntp_recipes.slurm_executor(
        account=args.account, partition=args.partition, tunnel=tunnel, nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node or 8, gpus_per_node=gpus or None,
        cpus_per_task=args.cpus_per_task, time=args.time, container_image=args.container_image,
        setup_lines=args.setup_lines, packager=None if args.git_archive else run.Packager())
    return task, executor


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # NeMo-Run finds torchrun and python on PATH: take this interpreter's environment's.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    task, executor = build(args)
    with run.Experiment(args.name or f"rntp-{args.recipe}", executor=executor) as exp:
        exp.add(task, name="train")
        exp.run(detach=False, tail_logs=True)
    status = {name: str(info.get("status")) for name, info in (exp.status(return_dict=True) or {}).items()}
    print(f"[recipes.launch] experiment {exp._id}: task status {status}", flush=True)
    ok = bool(status) and all(s.endswith("SUCCEEDED") for s in status.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
