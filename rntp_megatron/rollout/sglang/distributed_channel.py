"""The "distributed" weight channel: each bucket is one flat byte buffer, on the weight group's device
(weights/buckets.backend_device), broadcast over the weight-update group (group.py) while
POST /update_weights_from_distributed (load_format flattened_bucket) receives it on every server; this process is
rank 0, so one send feeds all. A bucket is asked of the stream only after the one before was taken, and an empty
last call sets the version and flushes the cache (no read-ahead to find the last bucket): beyond the model, the
bucket in flight is the only one this channel holds."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from rntp_megatron.rollout.sglang.group import WeightGroup, weight_group_backend
from rntp_megatron.rollout.sglang.receivers import Receiver, all_calling, updating
from rntp_megatron.rollout.sglang.tensor_channel import finish_push
from rntp_megatron.weights.buckets import NamedTensors, backend_device, flatten


def push_distributed(group: WeightGroup, receivers: Sequence[Receiver], buckets: Iterable[NamedTensors], version: int,
                     sent: Callable[[NamedTensors], None]) -> dict[str, float]:
    """Each bucket as one flat byte buffer broadcast over `group` (formed with the receivers first if it is not),
    `sent` told of each after the servers took it, then the version set; seconds per phase."""
    if not group.formed:
        group.form(receivers)
    device = backend_device(weight_group_backend())
    timing = {"flatten_s": 0.0, "broadcast_s": 0.0, "server_s": 0.0}
    with updating(receivers):
        for bucket in buckets:
            _broadcast(group, receivers, bucket, device, timing)
            sent(bucket)
        finish_push(receivers, version, timing)
    return timing


def _broadcast(group: WeightGroup, receivers: Sequence[Receiver], bucket: NamedTensors, device: torch.device,
               timing: dict[str, float]) -> None:
    """One bucket, flattened (no copy when it already is one buffer on `device`), to every receiver; its flat
    buffer dies on return, before the next bucket is made."""
    t0 = time.perf_counter()
    flat, metas = flatten(bucket, device=device)
    timing["flatten_s"] += time.perf_counter() - t0
    payload = {"names": [m.name for m in metas], "dtypes": [str(m.dtype).replace("torch.", "") for m in metas],
               "shapes": [list(m.shape) for m in metas], "group_name": group.name,
               "load_format": "flattened_bucket", "flush_cache": False, "weight_version": None}
    t1 = time.perf_counter()
    with all_calling(receivers, "/update_weights_from_distributed", payload):
        dist.broadcast(flat, src=0, group=group.process_group)  # this process is rank 0: one send feeds all
        timing["broadcast_s"] += time.perf_counter() - t1
    timing["server_s"] += time.perf_counter() - t1
