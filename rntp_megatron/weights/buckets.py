"""Byte-bounded buckets of named tensors, and their flat byte form (one buffer per bucket for one transfer).

The flat form is the tensors' raw bytes back to back in list order, with no padding: the layout SGLang's
`load_format: "flattened_bucket"` reads, so the same buffer serves a pipeline-stage send and an engine push.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

NamedTensors = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def bucketed(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Consecutive groups of (name, tensor) of at most bucket_bytes each (a larger tensor travels alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: NamedTensors = []
    size = 0
    for name, t in named:
        if bucket and size + nbytes(t) > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes(t)
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


def flatten(bucket: NamedTensors) -> tuple[torch.Tensor, list[TensorMeta]]:
    """One uint8 buffer[sum of bytes] holding every tensor's bytes in order, and each tensor's place in it."""
    metas, offset = [], 0
    for name, t in bucket:
        metas.append(TensorMeta(name, t.dtype, tuple(t.shape), offset, nbytes(t)))
        offset += nbytes(t)
    flat = torch.empty(offset, dtype=torch.uint8)
    for (_, t), m in zip(bucket, metas):
        flat[m.offset: m.offset + m.nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    return flat, metas


def unflatten(flat: torch.Tensor, metas: list[TensorMeta]) -> NamedTensors:
    """The bucket's tensors as views into the flat uint8 buffer (inverse of flatten; no copy when aligned)."""
    out = []
    for m in metas:
        raw = flat[m.offset: m.offset + m.nbytes]
        if m.offset % torch.empty((), dtype=m.dtype).element_size():
            raw = raw.clone()  # a byte view can only widen to a dtype at an offset aligned to its size
        out.append((m.name, raw.view(m.dtype).reshape(m.shape)))
    return out
