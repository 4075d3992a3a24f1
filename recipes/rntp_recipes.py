"""NeMo-Run recipes for RNTP: the run config tree as nested `run.Config`s inside a `run.Partial` of the trainer.

    import nemo_run as run
    from recipes.rntp_recipes import qwen3_8b_b200, slurm_executor

    recipe = qwen3_8b_b200()
    recipe.cfg.rl.group_size = 16                     # edit any field before launching
    executor = slurm_executor(account="my_account", partition="batch", nodes=1, gpus_per_node=8,
                              tunnel=run.SSHTunnel(host="login", user="me", job_dir="/lustre/me/nemo-run"))
    with run.Experiment("rntp-qwen3-8b", executor=executor) as exp:
        exp.add(recipe, name="train")
        exp.run(detach=True)

Every rank of the launched job runs `train(cfg)`: torchrun (LocalExecutor) or srun (SlurmExecutor) start one
process per rank, and the trainer reads its rank from their environment (runtime.rank_info).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import nemo_run as run

from rntp_megatron.config import RunConfig, build_config, load_config, validate

CONFIGS = Path(__file__).parent / "configs"
REPO = Path(__file__).resolve().parent.parent


def as_run_config(value: Any) -> Any:
    """A config dataclass tree as nested run.Config (lists and plain values unchanged), editable field by field."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return run.Config(type(value), **{f.name: as_run_config(getattr(value, f.name))
                                          for f in dataclasses.fields(value)})
    if isinstance(value, list):
        return [as_run_config(v) for v in value]
    return value


def train(cfg: RunConfig) -> None:
    """The task every rank runs: re-validate the (possibly edited) config tree and run the trainer; a non-zero
    trainer exit (75: checkpointed on SIGTERM/SIGUSR1) becomes this process's exit code."""
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    validate(cfg)
    code = Trainer(cfg).run()
    destroy_distributed()
    if code:
        raise SystemExit(code)


def recipe(cfg: RunConfig) -> run.Partial:
    """run.Partial(train, cfg=<the config tree as run.Config>)."""
    return run.Partial(train, cfg=as_run_config(cfg))


def tiny_cpu(run_dir: str, train_steps: int = 3, overrides: list[str] = ()) -> run.Partial:
    """RNTP on the tiny CPU model (card `tiny`, byte tokenizer, synthetic corpus, in-process Megatron rollouts)."""
    cfg = build_config({
        "model": {"card": "tiny", "vocab_size": 262},  # byte tokenizer: 256 bytes + tags + eos + pad
        "data": {"context_len": 64, "min_context": 8},
        "rollout": {"engine": "megatron", "max_new_tokens": 12, "temperature": 1.0},
        "reward": {"name": "prob"},
        "rl": {"objective": "rntp", "group_size": 4},
        "schedule": {"train_steps": train_steps, "global_batch_size": 8, "micro_batch_size": 4, "seq_length": 96,
                     "lr": 3e-3},
        "checkpoint": {"dir": f"{run_dir}/checkpoints", "save_interval": 1},
        "logging": {"dir": run_dir, "progress": False, "plot": False},
    }, list(overrides))
    return recipe(cfg)


def qwen3_8b_b200(overrides: list[str] = ()) -> run.Partial:
    """Qwen3-8B on one node of 8 x B200 (TP2 x DP4, MXFP8); configs/qwen3_8b_b200.yaml."""
    return recipe(load_config(CONFIGS / "qwen3_8b_b200.yaml", list(overrides)))


def llama3_1_70b_b200_fp8(overrides: list[str] = ()) -> run.Partial:
    """Llama-3.1-70B on 8 nodes of 8 x B200 (TP8 x PP2 x DP4, MXFP8); configs/llama3_1_70b_b200_fp8.yaml."""
    return recipe(load_config(CONFIGS / "llama3_1_70b_b200_fp8.yaml", list(overrides)))


def qwen3_30b_a3b_b200(overrides: list[str] = ()) -> run.Partial:
    """Qwen3-30B-A3B (MoE) on one node of 8 x B200 (EP8, bf16); configs/qwen3_30b_a3b_b200.yaml."""
    return recipe(load_config(CONFIGS / "qwen3_30b_a3b_b200.yaml", list(overrides)))


def _env(extra: Optional[dict[str, str]]) -> dict[str, str]:
    # the task imports `recipes` and `rntp_megatron` from the repository
    return {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra or {})}


def local_executor(ntasks_per_node: int = 2, env_vars: Optional[dict[str, str]] = None) -> run.LocalExecutor:
    """This machine, `ntasks_per_node` ranks started by torchrun."""
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher="torchrun", env_vars=_env(env_vars))


def slurm_executor(account: str, partition: str, tunnel: run.Tunnel, nodes: int = 1, ntasks_per_node: int = 8,
                   gpus_per_node: Optional[int] = 8, cpus_per_task: Optional[int] = None, time: str = "04:00:00",
                   container_image: Optional[str] = None, container_mounts: Optional[list[str]] = None,
                   setup_lines: Optional[str] = None, env_vars: Optional[dict[str, str]] = None,
                   packager: Optional[run.Packager] = None) -> run.SlurmExecutor:
    """Slurm, one srun task per rank (`nodes * ntasks_per_node`), USR1 120 s before the time limit (the trainer
    checkpoints on it), optional pyxis container. A code tree on a shared file system needs
    `packager=run.Packager()` (NeMo-Run's default packs the git repository instead)."""
    return run.SlurmExecutor(
        account=account, partition=partition, tunnel=tunnel, nodes=nodes, ntasks_per_node=ntasks_per_node,
        gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, time=time, signal="USR1@120",
        container_image=container_image, container_mounts=container_mounts or [], setup_lines=setup_lines,
        env_vars=_env(env_vars), packager=packager or run.GitArchivePackager(),
    )
