"""Byte-bounded buckets of named tensors, and their flat byte form (one buffer per bucket for one transfer).

The flat form is the tensors' raw bytes back to back in list order, with no padding: the layout SGLang's
`load_format: "flattened_bucket"` reads, so the same buffer serves a pipeline-stage send and an engine push.
A bucket whose tensors already are such views of one buffer (what `packed` and the weight stream make)
flattens without a copy.

Buffers live on the device of the group that moves them (`backend_device`): the GPU for NCCL, the CPU for gloo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

NamedTensors = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024
Item = TypeVar("Item")


def backend_device(backend: str) -> torch.device:
    """Where a collective of this backend takes its tensors: the current CUDA device for NCCL (also a mixed
    'cpu:gloo,cuda:nccl' group, whose GPU path is the fast one), the CPU for gloo."""
    if "nccl" not in backend.lower():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cuda")


def group_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """backend_device of a process group (the default group when None)."""
    return backend_device(str(dist.get_backend(group)))


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def bucketed(items: Iterable[Item], bucket_bytes: int,
             size: Callable[[Item], int] = lambda item: nbytes(item[1])) -> Iterator[list[Item]]:
    """Consecutive groups of items whose size(item) sum to at most bucket_bytes (a larger item travels alone);
    items are (name, tensor) pairs sized by the tensor's bytes unless `size` says otherwise."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[Item] = []
    total = 0
    for item in items:
        if bucket and total + size(item) > bucket_bytes:
            yield bucket
            bucket, total = [], 0
        bucket.append(item)
        total += size(item)
    if bucket:
        yield bucket


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside a flat bucket buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def layout(bucket: NamedTensors, dtype: Optional[torch.dtype] = None) -> list[TensorMeta]:
    """Each tensor's place in the flat buffer (bytes back to back in list order), as `dtype` when given."""
    metas, offset = [], 0
    for name, t in bucket:
        out_dtype = dtype or t.dtype
        size = t.numel() * out_dtype.itemsize
        metas.append(TensorMeta(name, out_dtype, tuple(t.shape), offset, size))
        offset += size
    return metas


def flatten(bucket: NamedTensors, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
            ) -> tuple[torch.Tensor, list[TensorMeta]]:
    """One uint8 buffer[sum of bytes] on `device` (default: the first tensor's) holding every tensor's bytes in
    order (cast to dtype when given), and each tensor's place in it. One copy per tensor (it also makes strided
    views contiguous, casts and moves), none at all when the tensors already lie back to back in one buffer of the
    right dtype on that device."""
    metas = layout(bucket, dtype)
    device = _device(bucket, device)
    ready = _shared_buffer(bucket, metas, device)
    return (ready if ready is not None else _copied(bucket, metas, device)), metas


def packed(bucket: NamedTensors, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
           ) -> NamedTensors:
    """The bucket copied into one fresh flat buffer on `device` (default: the first tensor's; cast to dtype when
    given), as views of it; always a copy, so the result never aliases the tensors it came from (e.g. a model's
    parameters)."""
    metas = layout(bucket, dtype)
    return unflatten(_copied(bucket, metas, _device(bucket, device)), metas)


def _device(bucket: NamedTensors, device: Optional[torch.device]) -> torch.device:
    """device, else the bucket's first tensor's device (the CPU for an empty bucket)."""
    if device is not None:
        return torch.device(device)
    return bucket[0][1].device if bucket else torch.device("cpu")


def _copied(bucket: NamedTensors, metas: list[TensorMeta], device: torch.device) -> torch.Tensor:
    """A fresh uint8 buffer on device holding the bucket's tensors at metas' offsets, cast to metas' dtypes."""
    flat = torch.empty(sum(m.nbytes for m in metas), dtype=torch.uint8, device=device)
    for (_, t), m in zip(bucket, metas):
        target = _typed_view(flat, m)
        if target is not None:
            target.copy_(t)
        else:  # an offset not aligned to the dtype's size: go through bytes
            flat[m.offset: m.offset + m.nbytes].copy_(t.to(m.dtype).contiguous().reshape(-1).view(torch.uint8))
    return flat


def unflatten(flat: torch.Tensor, metas: list[TensorMeta]) -> NamedTensors:
    """The bucket's tensors as views into the flat uint8 buffer (inverse of flatten; no copy when aligned)."""
    out = []
    for m in metas:
        view = _typed_view(flat, m)
        if view is None:  # a byte view can only widen to a dtype at an offset aligned to its size
            view = flat[m.offset: m.offset + m.nbytes].clone().view(m.dtype).reshape(m.shape)
        out.append((m.name, view))
    return out


def _typed_view(flat: torch.Tensor, m: TensorMeta) -> Optional[torch.Tensor]:
    """flat's bytes of m as a tensor of m.dtype and m.shape, or None when m.offset is not aligned to the dtype."""
    if (flat.storage_offset() + m.offset) % m.dtype.itemsize:
        return None
    return flat[m.offset: m.offset + m.nbytes].view(m.dtype).reshape(m.shape)


def _shared_buffer(bucket: NamedTensors, metas: list[TensorMeta], device: torch.device) -> Optional[torch.Tensor]:
    """The uint8 buffer on device that the bucket's tensors tile exactly (contiguous, in order, dtypes as in
    metas), else None."""
    if not bucket:
        return None
    storage = bucket[0][1].untyped_storage()
    start = bucket[0][1].storage_offset() * bucket[0][1].element_size()
    for (_, t), m in zip(bucket, metas):
        if (t.dtype != m.dtype or not _same_device(t.device, device) or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() * t.element_size() != start + m.offset):
            return None
    whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    return whole[start: start + sum(m.nbytes for m in metas)]


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a is b, where a device without an index ('cuda') means the current one of its type."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
