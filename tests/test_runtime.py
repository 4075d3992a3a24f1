"""Rank discovery from torchrun and Slurm variables."""

from __future__ import annotations

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
