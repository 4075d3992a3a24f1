"""The lossless weight delta of one tensor against the last one sent: the changed elements, bit for bit.

A tensor `<name>` of n elements, k of which differ in their bits from the last sent copy, travels as one of
- `<name>` itself (full: n elements),
- `<name>.delta_index` (int32[k], int64 past 2^31 elements, ascending flat indices) + `<name>.delta_value` ([k]),
- `<name>.delta_mask` (uint8[ceil(n / 8)], bit i of byte j set when element 8j + i changed) + `<name>.delta_value`,
whichever has the fewest bytes (for bf16: index 6k, mask n/8 + 2k, full 2n bytes; the index wins below k = n/32,
the mask above, up to k = 15n/16), and full above a density cap. Values are written, not added, so applying a
delta twice gives the same tensor (a push retried after a partial failure stays exact). Only torch is imported:
the SGLang server (rntp_delta_models) and the trainer (weights/delta.py) both use this file.
"""

from __future__ import annotations

from typing import Optional

import torch

INDEX, MASK, VALUE = ".delta_index", ".delta_mask", ".delta_value"
PARTS = (INDEX, MASK, VALUE)
# GET /get_weights_by_name?name=MARKER answers [FORMAT] on a server that serves these classes
MARKER = "rntp_delta_models.format"
FORMAT = 1
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def changed(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """bool[n]: which flat elements of new differ in their bits from old (same shape and dtype; NaNs and -0.0
    compare by their bits)."""
    bits = _BITS[new.element_size()]
    return new.reshape(-1).view(bits) != old.reshape(-1).view(bits)


def encode(name: str, new: torch.Tensor, old: torch.Tensor, max_density: float
           ) -> Optional[list[tuple[str, torch.Tensor]]]:
    """The delta entries that turn old into new (same shape, dtype, device), or None when new should go whole:
    more than max_density of its elements changed, or the delta is not fewer bytes than the tensor."""
    mask = changed(new, old)
    n, k, size = mask.numel(), int(torch.count_nonzero(mask)), new.element_size()  # (a bool sum() is ~20x slower)
    if k > max_density * n:
        return None
    index_dtype = torch.int32 if n < 2 ** 31 else torch.int64
    index_bytes, mask_bytes = k * index_dtype.itemsize, (n + 7) // 8
    if min(index_bytes, mask_bytes) + k * size >= n * size:
        return None
    index = mask.nonzero().reshape(-1)
    values = new.reshape(-1).index_select(0, index)
    if index_bytes <= mask_bytes:
        return [(name + INDEX, index.to(index_dtype)), (name + VALUE, values)]
    return [(name + MASK, pack_bits(mask)), (name + VALUE, values)]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """uint8[ceil(n / 8)] of bool[n]: bit i of byte j is element 8j + i."""
    padded = torch.zeros(-(-mask.numel() // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask
    return (padded.view(-1, 8) << _SHIFTS.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bool[n] of pack_bits' bytes."""
    return ((packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1).view(-1)[:n].bool()


def split(name: str) -> tuple[str, Optional[str]]:
    """(tensor name, delta part) of an entry name; part None for a full tensor."""
    for part in PARTS:
        if name.endswith(part):
            return name[: -len(part)], part
    return name, None


def complete(parts: dict[str, torch.Tensor]) -> bool:
    """Whether a tensor's delta parts received so far make a whole delta (values and their index or mask)."""
    return VALUE in parts and (INDEX in parts or MASK in parts)


def apply(base: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """base (contiguous) with the delta's values written at its positions, in place; returns base."""
    value = parts[VALUE].to(base.device)
    if value.dtype != base.dtype:
        raise ValueError(f"a delta of {value.dtype} values for a {base.dtype} tensor: the trainer must send the full "
                         "tensor first")
    flat = base.view(-1)
    if INDEX in parts:
        flat[parts[INDEX].to(base.device, torch.int64)] = value
    else:
        flat[unpack_bits(parts[MASK].to(base.device), flat.numel())] = value
    return base
