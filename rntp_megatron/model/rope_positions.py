"""GPTModel whose rotary embedding follows the rows' position_ids when the rows are shared-context rows.

Megatron-core rotates the query and key at row index i by angle(i) for every row alike, ignoring position_ids.
In a shared-context row [context | y_1 | ... | y_G] each branch y_j continues from the context's length, so
its positions repeat; this model gathers the rotary table at position_ids for those rows (the attention_mask is
a SharedContextMask), and leaves plain rows (and inference) to megatron's own path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models.gpt import GPTModel

from rntp_megatron.model.attention import SharedContextMask


class PositionedGPTModel(GPTModel):
    """GPTModel with RoPE at position_ids[b, s] for SharedContextMask rows."""

    _positions: Optional[torch.Tensor] = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any, *args: Any,
                **kwargs: Any) -> Any:
        """GPTModel.forward; the positions are kept for _preprocess when the rows are shared-context rows."""
        self._positions = position_ids if isinstance(attention_mask, SharedContextMask) else None
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._positions = None

    def _preprocess(self, *args: Any, **kwargs: Any) -> tuple:
        """megatron's preprocessing; the rotary table freqs[s, 1, 1, d] becomes freqs[position_ids^T] [s, b, 1, d]."""
        out = super()._preprocess(*args, **kwargs)
        rotary = out[1]
        if self._positions is None or rotary is None:
            return out
        if self.config.apply_rope_fusion:
            raise ValueError("shared-context rows need per-row rotary positions: apply_rope_fusion=True (a fused "
                             "kernel that takes one [s, 1, 1, d] table) is not supported with them")
        return (out[0], rotary[self._positions.t()].squeeze(2), *out[2:])
