"""Where this process's tensors live: the one answer every module asks.

On a GPU node the model sits on `cuda:<local rank mod visible devices>` (init_distributed sets it), and everything
handed to the model, the loss, the optimizer or a collective of an NCCL group must be there too. Host-side bookkeeping
(data, reward scoring, rollout token lists) is built with an explicit `device="cpu"` and moved here once, in
the step; tests/test_device_discipline.py fails on a tensor made without an explicit device.
"""

from __future__ import annotations

import torch


def select_local_device(local_rank: int) -> int:
    """Make cuda:(local_rank mod visible devices) current and return its index.

    Under `--gpus-per-task=1` or `--gpu-bind` each task sees only its own GPU (CUDA_VISIBLE_DEVICES of one
    entry), so local rank 3 must take device 0; with all of a node's GPUs visible, rank k takes device k."""
    visible = torch.cuda.device_count()
    if visible == 0:
        raise RuntimeError(f"local rank {local_rank}: CUDA is available but no device is visible "
                           "(CUDA_VISIBLE_DEVICES)")
    index = local_rank % visible
    torch.cuda.set_device(index)
    return index


def device() -> torch.device:
    """The model's device: cuda:<current device> where CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
