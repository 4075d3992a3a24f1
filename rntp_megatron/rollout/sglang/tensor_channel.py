"""The "tensor" weight channel (same machine): each bucket is pickled the way SGLang's MultiprocessingSerializer
pickles (torch's ForkingPickler), once per server TP rank, and POST /update_weights_from_tensor maps it. The path
follows the tensors' device (`sharing_path`): CUDA tensors stay on the GPU and travel as CUDA IPC handles (copy:
trainer GPU -> server params); CPU tensors go through shared memory (torch's file_system strategy; copies: trainer
-> shm, shm -> server params)."""

from __future__ import annotations

import base64
import io
import time
import urllib.parse
from typing import Callable, Iterable, Sequence

from rntp_megatron.rollout.sglang.client import SGLangServerError
from rntp_megatron.rollout.sglang.receivers import Receiver, all_calling, updating
from rntp_megatron.runtime.netif import is_this_host
from rntp_megatron.weights.buckets import NamedTensors


def push_tensor(receivers: Sequence[Receiver], buckets: Iterable[NamedTensors], version: int,
                sent: Callable[[NamedTensors], None]) -> dict[str, float]:
    """Tensors via POST /update_weights_from_tensor (CUDA IPC handles or shared memory, tensor_payloads), one
    call per bucket as it arrives (`sent` told of each), then an empty call that flushes the cache and sets the
    version (no lookahead: a bucket never waits for the next); seconds spent serializing and in the servers."""
    elsewhere = [r.client.url for r in receivers if not on_this_host(r.client.url)]
    if elsewhere:  # the shared-memory names (CUDA IPC handles) mean nothing on another machine
        raise SGLangServerError(f"rollout.sglang.weight_sync: 'tensor' shares this host's memory, but the servers "
                                f"at {elsewhere} are not on this host; fix: rollout.sglang.weight_sync: disk, or "
                                "rollout.placement: separate with weight_sync: distributed")
    timing = {"serialize_s": 0.0, "server_s": 0.0}
    with updating(receivers):
        for bucket in buckets:
            _send_bucket(receivers, bucket, version, False, timing)
            sent(bucket)
        finish_push(receivers, version, timing)
    return timing


def finish_push(receivers: Sequence[Receiver], version: int, timing: dict[str, float]) -> None:
    """The last call of a push: an empty bucket with which every receiver flushes its prefix cache (KV of the old
    weights) and tags later rollouts `version`. It holds no tensor, so any channel can send it from any host (the
    distributed channel ends with it rather than reading a bucket ahead to know which one is last)."""
    _send_bucket(receivers, [], version, True, timing)


def _send_bucket(receivers: Sequence[Receiver], bucket: NamedTensors, version: int, last: bool,
                 timing: dict[str, float]) -> None:
    """One bucket to every receiver at once (each maps the same tensors), pickled anew for each TP rank of each
    (tensor_payloads: one pickle per unpickling process); last: the servers then flush and take `version`. The
    seconds spent serializing and in the servers are added to timing."""
    t0 = time.perf_counter()
    payloads = [{"serialized_named_tensors": tensor_payloads(bucket, r.server_ranks()["tp"]), "flush_cache": last,
                 "weight_version": str(version) if last else None} for r in receivers]
    t1 = time.perf_counter()
    with all_calling(receivers, "/update_weights_from_tensor", *payloads):
        pass
    timing["serialize_s"] = timing.get("serialize_s", 0.0) + t1 - t0
    timing["server_s"] = timing.get("server_s", 0.0) + time.perf_counter() - t1


def sharing_path(bucket: NamedTensors) -> str:
    """How a bucket's tensors reach a server on this machine: "cuda_ipc" (CUDA tensors: a handle to the GPU
    memory, which stays where it is) or "shared_memory" (CPU tensors: a named shared-memory file)."""
    devices = {t.device.type for _, t in bucket} or {"cpu"}
    if len(devices) > 1:
        raise ValueError(f"a weight bucket mixes devices {sorted(devices)}; pack it on one (weights/buckets.packed)")
    (device,) = devices
    if device not in ("cuda", "cpu"):
        raise ValueError(f"tensors on {device!r} cannot be shared with a server process (only cuda or cpu)")
    return "cuda_ipc" if device == "cuda" else "shared_memory"


def tensor_payloads(bucket: NamedTensors, ranks: int) -> list[str]:
    """`serialized_named_tensors` for /update_weights_from_tensor: the bucket pickled by torch's ForkingPickler and
    base64-encoded (SGLang's MultiprocessingSerializer.serialize(..., output_str=True)), once per server TP rank.

    A pickle must be unpickled by exactly one process. A CUDA IPC handle is opened once per receiver; a CPU tensor
    (file_system strategy) pickles as the name of its shared-memory file plus one reference taken on that file's
    count (`_shared_incref`), which the unpickling process gives back (`_shared_decref`) after mapping it, and each
    mapping gives its own back when freed; at zero the file is unlinked. One pickle unpickled by two servers gives
    back two references for one taken: after a push the count of a tensor that lives on (SharedHFMirror's buffers,
    rewritten in place each sync) reaches zero, the file is unlinked while the trainer still maps it, and the next
    push's pickle names a file that no longer exists (the server fails to open it). So every receiving process
    (each server of a fleet, each TP rank of a server) gets a pickle of its own."""
    import torch.multiprocessing as tmp  # registers torch's reducers with ForkingPickler
    from multiprocessing.reduction import ForkingPickler

    if sharing_path(bucket) == "shared_memory":
        tmp.set_sharing_strategy("file_system")  # fds cannot cross HTTP; named shm files can
    items = [(n, t.detach().contiguous()) for n, t in bucket]

    def serialized() -> str:
        buf = io.BytesIO()  # a tensor already in shared memory (SharedHFMirror) pickles as its name alone
        ForkingPickler(buf).dump(items)
        return base64.b64encode(buf.getvalue()).decode()

    return [serialized() for _ in range(ranks)]


def on_this_host(url: str) -> bool:
    """Whether a server URL names an address of this machine."""
    return is_this_host(urllib.parse.urlsplit(url).hostname or "")
