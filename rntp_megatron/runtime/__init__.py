"""The process: distributed init (torchrun or Slurm), megatron parallel_state, seeds, CPU compatibility."""

from rntp_megatron.runtime.device import device
from rntp_megatron.runtime.distributed import (
    RankInfo,
    destroy_distributed,
    init_distributed,
    rank_info,
    set_seed,
)

__all__ = ["RankInfo", "destroy_distributed", "device", "init_distributed", "rank_info", "set_seed"]
