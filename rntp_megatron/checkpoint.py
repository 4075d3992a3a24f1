"""Checkpoints: Megatron dist_checkpointing of model, optimizer and extra models (EMA baseline), plus the
trainer state (step, consumed tokens, data cursors, RNG states, weight version).

Layout of `checkpoint.dir`:

    iter_0000040/            one complete checkpoint (megatron's sharded files + trainer_state/ + complete.json)
    latest                   the name of the newest complete checkpoint, replaced atomically

A checkpoint is written into `.tmp_iter_...`, marked complete, renamed into place, and only then named by
`latest`: a crash or SIGKILL at any moment leaves `latest` pointing at a whole checkpoint. Model and
optimizer are sharded by megatron, so a checkpoint saved at one TP/PP layout loads at another.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.optimizer import MegatronOptimizer

LATEST = "latest"
COMPLETE = "complete.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message says which and why."""


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The complete checkpoint `latest` names, None when there is none; an error when it is broken."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or has no {COMPLETE} "
                              f"(contents of {root}: {sorted(p.name for p in root.iterdir())})")
    return path


def checkpoint_step(path: str | Path) -> int:
    """The step a complete checkpoint folder was saved at (its complete.json)."""
    return int(json.loads((Path(path) / COMPLETE).read_text())["step"])


def resolve_checkpoint(path: str | Path, option: str = "checkpoint") -> Path:
    """The complete iter_* folder that `path` means: a checkpoints folder (its `latest`), the `latest` pointer
    file itself, or an iter_* folder. Rank 0 prints which step `option` resolved to; errors say what to pass."""
    given = path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{option}: {path} does not exist; fix: {option}: a checkpoints folder, its "
                              f"`{LATEST}` file, or an iter_* folder")
    if path.is_file() and path.name == LATEST:
        path = path.parent
    if (path / COMPLETE).exists():
        found = path
    else:
        found = latest_checkpoint(path) if path.is_dir() else None
        if found is None:
            entries = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else []
            raise CheckpointError(
                f"{option}: {path} is neither a complete checkpoint (no {COMPLETE}) nor a checkpoint directory "
                f"with a `{LATEST}` file (it holds {entries}); fix: {option}: a checkpoints folder, its `{LATEST}` "
                "file, or an iter_* folder with complete.json")
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(f"{option}: {given} -> {found} (step {checkpoint_step(found)})", flush=True)
    return found


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states (and on a GPU the device's and megatron's tracker
    states), in types torch.load(weights_only=True) reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state().cpu()
        state["cuda_tracker"] = {k: v.cpu() for k, v in get_cuda_rng_tracker().get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["cuda_tracker"])


OPTIMIZER_LAYOUT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP: checkpoints carry the model's own names (no `module.` prefix)."""
    return getattr(chunk, "module", chunk)


def _sharded_state(chunks: list[torch.nn.Module], optimizer: Optional[MegatronOptimizer],
                   extra: dict[str, torch.nn.Module], is_loading: bool) -> dict[str, Any]:
    models = [_unwrapped(c) for c in chunks]
    model_sd = models[0].sharded_state_dict() if len(models) == 1 else {
        f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        # megatron's default layout for the distributed optimizer (fully_sharded_model_space) uses flattened
        # ranges, which its own checkpoint validation refuses; dp_reshardable is what Megatron-LM saves
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_LAYOUT)
    for name, module in extra.items():
        state[name] = module.sharded_state_dict(prefix=f"{name}.")
    return state


def _prestart_writer_queue() -> None:
    """Create megatron's checkpoint-writer result queue from a forked Manager.

    megatron's torch_dist writer makes it lazily with a *spawned* Manager, which starts a fresh interpreter that
    re-imports the launching script: 10-30 s per process here, and scripts without a __main__ guard break. A
    forked Manager only serves the queue and starts in milliseconds; it dies with this process (_die_with_parent).
    Skipped if megatron renames the cache.
    """
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        manager = SyncManager(ctx=torch.multiprocessing.get_context("fork"))
        manager.start(_die_with_parent, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def _die_with_parent(parent: int) -> None:
    """(In the forked Manager) SIGKILL this process when `parent` ends. A fork holds the rank's sockets and output:
    left behind by a killed rank, it would keep its peers waiting in a collective (the connection never closes)
    and Slurm waiting 60 s for the task's output."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, chunks: list[torch.nn.Module], optimizer: MegatronOptimizer,
                    trainer_state: dict[str, Any], rank_state: dict[str, Any], keep_last: int = 2,
                    extra: Optional[dict[str, torch.nn.Module]] = None) -> Path:
    """Collective: every rank calls it. trainer_state is global (rank 0's is kept); rank_state is per rank."""
    root = Path(root)
    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = iteration_dir(root, step), root / f".tmp_iter_{step:07d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        tmp.mkdir(parents=True)  # empty: megatron warns "overwriting old incomplete checkpoint" otherwise
    dist.barrier()
    _prestart_writer_queue()
    dist_checkpointing.save(_sharded_state(chunks, optimizer, extra or {}, is_loading=False), str(tmp))
    (tmp / "trainer_state").mkdir(exist_ok=True)
    torch.save(rank_state, tmp / "trainer_state" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "trainer_state" / "global.json").write_text(json.dumps(trainer_state, sort_keys=True))
        _write_atomically(tmp / COMPLETE, json.dumps({"step": step, "world_size": world}))
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomically(root / LATEST, final.name)
        kept = sorted(p for p in root.glob("iter_*") if p.is_dir())
        for old in kept[:-max(keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _allocate_distributed_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Give a distributed optimizer that has not stepped yet its state tensors, which the load fills in place.

    Without Transformer Engine or Apex (CPU) megatron's DistributedOptimizer.state_dict reads the step from
    the torch optimizer's state and fails on an empty one; megatron fills it the same way for its FSDP loads
    (a step on zero gradients; the load then overwrites states, master weights and step)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def load_checkpoint(path: str | Path, chunks: list[torch.nn.Module], optimizer: Optional[MegatronOptimizer],
                    extra: Optional[dict[str, torch.nn.Module]] = None) -> tuple[dict[str, Any], Optional[dict]]:
    """Load model (+ optimizer, + extra models) at this run's layout; returns (trainer_state, this rank's
    rank_state or None when the checkpoint was written by a different world size)."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE})")
    extra = extra or {}
    if optimizer is not None:
        _allocate_distributed_optimizer_state(optimizer)
    try:
        loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer, extra, is_loading=True), str(path))
    except (Exception, CheckpointException) as e:  # megatron and torch raise many kinds (torch's is a BaseException)
        raise CheckpointError(f"cannot load {path} at this layout (world size {dist.get_world_size()}): {e}") from e
    if len(chunks) == 1:
        _unwrapped(chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(chunks):
            _unwrapped(c).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        with torch.no_grad():  # float32 runs: the distributed optimizer's main params are views of the weights
            optimizer.load_state_dict(loaded["optimizer"])
    for name, module in extra.items():
        module.load_state_dict({k.removeprefix(f"{name}."): v for k, v in loaded[name].items()})
    meta = json.loads((path / COMPLETE).read_text())
    trainer_state = json.loads((path / "trainer_state" / "global.json").read_text())
    rank_file = path / "trainer_state" / f"rank_{dist.get_rank():05d}.pt"
    same_world = meta["world_size"] == dist.get_world_size()
    rank_state = torch.load(rank_file, weights_only=True) if same_world and rank_file.exists() else None
    return trainer_state, rank_state


def load_rank_states(path: str | Path) -> list[dict[str, Any]]:
    """Every rank's rank_state of a checkpoint, in rank order (e.g. all data cursors, to resume at another
    layout)."""
    files = sorted((Path(path) / "trainer_state").glob("rank_*.pt"))
    return [torch.load(f, weights_only=True) for f in files]
