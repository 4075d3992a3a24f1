"""The process: rank discovery (torchrun or Slurm), torch.distributed, megatron parallel_state, seeds."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from rntp_megatron.config import LOOPBACK, ParallelConfig, data_parallel_size
from rntp_megatron.notices import missing_kernels_notice
from rntp_megatron.runtime import cpu_compat
from rntp_megatron.runtime.device import select_local_device
from rntp_megatron.runtime.netif import trainer_ifname_env


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST {nodelist!r}")
    prefix, bracket = head.group(1), head.group(3)
    if bracket is None:
        return prefix
    return prefix + bracket.split(",")[0].split("-")[0]


def rank_info(env: Optional[Mapping[str, str]] = None) -> RankInfo:
    """Ranks from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), else Slurm's
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST), else a single process."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                        env.get("MASTER_ADDR", LOOPBACK), port)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", LOOPBACK))
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                        addr, port)
    return RankInfo(0, 1, 0, env.get("MASTER_ADDR", LOOPBACK), port)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and, where present, megatron's CUDA RNG tracker per TP rank)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # On CPU the tracker's states are the CPU generator's (cpu_compat), and inference_rng_tracker avoids
    # the default tracker's CUDA-only state forking.
    on_cpu = not torch.cuda.is_available()
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=on_cpu, force_reset_rng=on_cpu)


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> RankInfo:
    """torch.distributed (gloo on CPU, nccl on GPU) and megatron parallel_state with TP/PP/CP/EP; DP is the rest.
    Every group (the world's and megatron's) waits parallel.distributed_timeout_minutes for a peer."""
    from datetime import timedelta

    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d as c10d

    info = rank_info()
    timeout = timedelta(minutes=parallel.distributed_timeout_minutes)
    cpu_compat.install()
    if not dist.is_initialized():
        backend = parallel.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            select_local_device(info.local_rank)
        # One process needs no rendezvous: an in-memory store, so single-process runs started side by side
        # never race for a TCP port.
        rendezvous = ({"store": dist.HashStore()} if info.world_size == 1 else
                      {"init_method": f"tcp://{info.master_addr}:{info.master_port}"})
        if info.world_size > 1:  # a host named as loopback must not offer that address to ranks on other hosts
            os.environ.update(trainer_ifname_env(info.master_addr, os.environ))
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=timeout, **rendezvous)
    world = dist.get_world_size()
    data_parallel_size(parallel, world)  # raises a ConfigError naming the sizes
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            distributed_timeout_minutes=parallel.distributed_timeout_minutes,
        )
        # megatron-core 0.19 makes its expert-data-parallel gloo group without the timeout (torch's 30 minutes)
        for group in list(c10d._world.pg_names):
            c10d._set_pg_timeout(timeout, group)
    set_seed(seed)
    notice = missing_kernels_notice(on_gpu=torch.cuda.is_available())
    if notice and dist.get_rank() == 0:
        print(notice, flush=True)
    return info


def destroy_distributed() -> None:
    """Tear down parallel_state and the process group (tests and clean exits)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
