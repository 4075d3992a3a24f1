"""Rank discovery from torchrun and Slurm variables; rendezvous that no other process can take a port from."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from rntp_megatron.runtime import rank_info
from rntp_megatron.runtime.distributed import first_host


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"), ("gpu[003-005,9]", "gpu003"), ("gpu[12,14]", "gpu12"), ("a1,b2", "a1"),
    ("dgx-b200-[0001-0064]", "dgx-b200-0001"),
])
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables_win():
    info = rank_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7",
                      "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (3, 8, 1, "h", 7)


def test_slurm_variables():
    info = rank_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "gpu[010-011]", "MASTER_PORT": "6000"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (5, 16, 1, "gpu010", 6000)


def test_single_process_default():
    info = rank_info({})
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)


def test_single_process_needs_no_port():
    """A single-process run initialises even when MASTER_PORT is taken (side-by-side runs never collide)."""
    script = ("from rntp_megatron.config import ParallelConfig\n"
              "from rntp_megatron.runtime import init_distributed, destroy_distributed\n"
              "init_distributed(ParallelConfig()); destroy_distributed(); print('INIT OK')\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(taken.getsockname()[1])}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "INIT OK" in proc.stdout, proc.stderr[-3000:]


def _try_to_bind_master_port(rank: int, world_size: int) -> str:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))
        except OSError as e:
            return e.strerror
    return "bound"


def test_run_ranks_holds_its_port_while_the_ranks_run():
    """The rendezvous port is bound by run_ranks' own store before any rank starts, not merely picked free."""
    from rntp_megatron.runtime.spawn import run_ranks

    assert run_ranks(_try_to_bind_master_port, 2) == ["Address already in use"] * 2


def test_megatron_import_notices_become_one_line():
    """Building a model prints megatron's missing-kernel fallbacks once, as our one line, and none of its
    per-module warnings or the GPTModel deprecation (the class is chosen on purpose)."""
    script = ("from rntp_megatron.config import build_config\n"
              "from rntp_megatron.runtime import init_distributed\n"
              "from rntp_megatron.model.provider import build_model\n"
              "cfg = build_config({}, ['model.card=tiny'])\n"
              "init_distributed(cfg.parallel)\n"
              "build_model(cfg.model, cfg.parallel)\n")
    out = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert text.count("not installed") == 1, text
    assert "megatron-core: Transformer Engine and Apex not installed" in text
    assert "IS DEPRECATED" not in text and "UserWarning" not in text, text


def _group_timeouts(rank: int, world_size: int) -> list[float]:
    """Seconds each process group of this rank (the world's and every megatron group) waits for its peers."""
    import torch
    from torch.distributed import distributed_c10d as c10d

    from rntp_megatron.config import build_config
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({}, ["model.card=tiny", "parallel.tensor_model_parallel_size=2",
                            "parallel.distributed_timeout_minutes=3"])
    init_distributed(cfg.parallel)
    try:
        return [group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for group in c10d._world.pg_names]
    finally:
        destroy_distributed()


def test_distributed_timeout_reaches_every_group():
    """parallel.distributed_timeout_minutes is the timeout of the world group and of each megatron group."""
    from rntp_megatron.runtime.spawn import run_ranks

    for timeouts in run_ranks(_group_timeouts, 2, timeout_s=300):
        assert len(timeouts) > 5 and set(timeouts) == {180.0}, timeouts


class _DeviceChosen(Exception):
    """Raised by the fake set_device once init_distributed picked a device (nothing after it runs without a GPU)."""


def _one_visible_gpu(monkeypatch, visible: int) -> list[int]:
    """CUDA as a task sees it under --gpus-per-task=1 / --gpu-bind (`visible` devices): set_device of an index not
    visible fails as CUDA's does (invalid device ordinal); the indices asked for are recorded. A fake: no GPU here."""
    import torch

    chosen: list[int] = []

    def set_device(index: int) -> None:
        if not 0 <= index < visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} ({visible} visible)")
        chosen.append(index)
        raise _DeviceChosen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return chosen


@pytest.mark.parametrize("local_rank, visible, index", [(3, 1, 0), (3, 8, 3), (5, 4, 1), (0, 1, 0)])
def test_init_distributed_takes_a_visible_device(monkeypatch, local_rank, visible, index):
    """Local rank k takes visible device k mod count: rank 3 of a node with one GPU bound per task takes device 0."""
    from rntp_megatron.config import ParallelConfig
    from rntp_megatron.runtime import init_distributed

    chosen = _one_visible_gpu(monkeypatch, visible)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pytest.raises(_DeviceChosen):
        init_distributed(ParallelConfig(backend="gloo"))
    assert chosen == [index]
