"""Where this process's tensors live: the one answer every module asks.

On a GPU node the model sits on `cuda:<local rank>` (init_distributed sets it), and everything handed to the
model, the loss, the optimizer or a collective of an NCCL group must be there too. Host-side bookkeeping
(data, reward scoring, rollout token lists) is built with an explicit `device="cpu"` and moved here once, in
the step; tests/test_device_discipline.py fails on a tensor made without an explicit device.
"""

from __future__ import annotations

import torch


def device() -> torch.device:
    """The model's device: cuda:<current device> where CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
