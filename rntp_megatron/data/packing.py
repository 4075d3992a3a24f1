"""Sequence packing: variable-length sequences into fixed-length training rows.

Sequences are placed first-fit in decreasing length order. Each row carries position ids that restart at
every sequence, segment ids (1, 2, ... per sequence, 0 for padding) and the cu_seqlens of Megatron's THD
format; `attention_mask` builds the block-diagonal causal mask in Megatron's convention (True = masked)
so that a packed forward equals the forwards of its sequences one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    """tokens, position_ids, segment_ids: [rows, row_length]; placement[i] = (row, start) of sequence i;
    cu_seqlens[r]: segment boundaries of row r, [0, len_1, len_1 + len_2, ..., used]."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    placement: list[tuple[int, int]]
    cu_seqlens: list[list[int]]

    def unpack(self, values: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
        """Per-sequence slices values[row, start:start+len] of a [rows, row_length, ...] tensor."""
        return [values[r, s: s + n] for (r, s), n in zip(self.placement, lengths)]


def pack_sequences(seqs: Sequence[Sequence[int]], row_length: int, pad_id: int) -> PackedBatch:
    """Pack seqs (lengths l_i <= row_length) first-fit decreasing into rows of row_length tokens."""
    too_long = [(i, len(s)) for i, s in enumerate(seqs) if len(s) > row_length or len(s) == 0]
    if too_long:
        raise ValueError(f"sequences (index, length) {too_long[:5]} do not fit rows of {row_length} tokens "
                         f"(or are empty)")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    free: list[int] = []  # tokens left in each row
    placement: list[tuple[int, int]] = [(0, 0)] * len(seqs)
    for i in order:
        row = next((r for r, f in enumerate(free) if f >= len(seqs[i])), None)
        if row is None:
            free.append(row_length)
            row = len(free) - 1
        placement[i] = (row, row_length - free[row])
        free[row] -= len(seqs[i])
    rows = len(free)
    tokens = torch.full((rows, row_length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, row_length), dtype=torch.long)
    segment_ids = torch.zeros((rows, row_length), dtype=torch.long)
    cu_seqlens: list[list[int]] = [[0] for _ in range(rows)]
    for i in sorted(range(len(seqs)), key=lambda i: placement[i]):
        (r, s), n = placement[i], len(seqs[i])
        tokens[r, s: s + n] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
        position_ids[r, s: s + n] = torch.arange(n)
        segment_ids[r, s: s + n] = len(cu_seqlens[r])
        cu_seqlens[r].append(s + n)
    return PackedBatch(tokens, position_ids, segment_ids, placement, cu_seqlens)


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [rows, 1, L, L] from segment_ids[rows, L]; True where attention is NOT
    allowed (other segment, future token, padding)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool).tril()
    allowed = same & causal & (segment_ids[:, None, :] > 0)
    # A padding query attends to itself only, so its softmax row stays finite.
    allowed |= torch.eye(segment_ids.shape[1], dtype=torch.bool)
    return ~allowed[:, None]
