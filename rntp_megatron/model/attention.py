"""Core attention for megatron-core's local layer spec: torch SDPA (flash on a GPU) for plain causal rows, and
the block-causal mask of shared-context rows (rl/shared_context.py): FlexAttention with a block mask on a GPU
(tiles with nothing allowed skipped), SDPA block by block on a CPU: each context causal (the flash kernel), each
branch against [its context, itself] causal aligned to the end (one dense [s, s] mask over a row's groups would
compute every pair the mask forbids).

A shared-context row holds groups [context | y_1 | ... | y_G] one after another, then padding. Query q may read
key k when both lie in the same group, k <= q, and k is in the group's context or in q's own branch:

    allowed(q, k) = seg[q] == seg[k]  and  k <= q  and  (branch[k] == 0  or  branch[k] == branch[q])

How the mask gets here: GPTModel.forward's `attention_mask` argument, which megatron-core hands untouched through
TransformerBlock, TransformerLayer and SelfAttention to `core_attention`. We pass a `SharedContextMask` there (the
ids, not an [s, s] tensor: each layer gets the same object, which builds its masks once and keeps them), so no
megatron code changes; `packed_seq_params` is THD metadata for Transformer Engine kernels, which cannot express a
shared prefix. `attention_mask=None` means plain causal rows. Under tensor parallelism each rank runs its heads;
under sequence parallelism the QKV projection has gathered the sequence, so the mask covers the whole row on every
rank; pipeline stages each receive the micro-batch's mask. Context parallelism is refused at validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule


@dataclass
class SharedContextMask:
    """segment_ids[b, s] (group of each position in its row, 0: padding), branch_ids[b, s] (0: the group's
    context, k >= 1: the row's k-th rollout branch); the masks are built on first use and kept for every layer."""

    segment_ids: torch.Tensor
    branch_ids: torch.Tensor
    _built: dict = field(default_factory=dict, repr=False)

    def blocks(self) -> list[tuple[int, slice, slice]]:
        """(row, keys before, queries) covering every non-padding position once: a group's context attends
        causally to itself (keys before: empty), each branch to its group's context and causally to itself.
        Branches follow their context in the row (rl/shared_context.py), each a run of one branch id."""
        if "blocks" not in self._built:
            out = []
            for r, (seg, br) in enumerate(zip(self.segment_ids.tolist(), self.branch_ids.tolist())):  # one host copy
                start, context = 0, slice(0, 0)
                for i in range(1, len(seg) + 1):
                    if i < len(seg) and (seg[i], br[i]) == (seg[start], br[start]):
                        continue
                    if seg[start] != 0:
                        if br[start] == 0:
                            context = slice(start, i)
                        out.append((r, slice(0, 0) if br[start] == 0 else context, slice(start, i)))
                    start = i
            self._built["blocks"] = out
        return self._built["blocks"]

    def block_mask(self) -> Any:
        """The same mask as a FlexAttention BlockMask (tiles with nothing allowed are skipped)."""
        if "block" not in self._built:
            from torch.nn.attention.flex_attention import create_block_mask

            seg, br = self.segment_ids, self.branch_ids

            def allowed(b, h, q, k):
                return (seg[b, q] == seg[b, k]) & (k <= q) & ((br[b, k] == 0) | (br[b, k] == br[b, q]))

            b, s = seg.shape
            self._built["block"] = create_block_mask(allowed, B=b, H=None, Q_LEN=s, KV_LEN=s, device=seg.device)
        return self._built["block"]


def _flex_attention() -> Optional[Any]:
    """torch's compiled flex_attention on a GPU, None where it is not available."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False)


class SDPAttention(MegatronModule):
    """Megatron's core-attention interface (query[sq, b, np, hn], key/value[sk, b, ng, hn] -> context[sq, b,
    np * hn]) on F.scaled_dot_product_attention, or FlexAttention for a SharedContextMask on a GPU."""

    _flex: Any = None  # compiled once per process (False where it does not import)

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(f"SDPAttention does not split the sequence: context_parallel_size="
                             f"{config.context_parallel_size} needs Transformer Engine's attention")
        if config.apply_query_key_layer_scaling or config.softmax_type != "vanilla" or config.window_size:
            raise ValueError("SDPAttention computes plain softmax(q k^T / sqrt(d)) attention: "
                             f"apply_query_key_layer_scaling={config.apply_query_key_layer_scaling}, softmax_type="
                             f"{config.softmax_type!r}, window_size={config.window_size} are not supported")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                attn_mask_type: Any = None, attention_bias: Any = None, packed_seq_params: Any = None
                ) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v per head; mask: causal (None), a SharedContextMask, or megatron's bool
        tensor (True = masked)."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes neither attention_bias nor packed_seq_params")
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        dropout = self.dropout if self.training else 0.0
        if isinstance(attention_mask, SharedContextMask) and q.is_cuda and SDPAttention._flex is None:
            SDPAttention._flex = _flex_attention() or False  # False: tried, not available
        if isinstance(attention_mask, SharedContextMask) and q.is_cuda and SDPAttention._flex:
            out = SDPAttention._flex(q, k, v, block_mask=attention_mask.block_mask(), scale=self.scale,
                                     enable_gqa=k.shape[1] != heads)
        elif isinstance(attention_mask, SharedContextMask):  # block by block, never [s, s] over groups
            out = torch.zeros_like(q)
            gqa = k.shape[1] != heads
            for r, before, queries in attention_mask.blocks():
                keys = torch.cat([k[r:r + 1, :, before], k[r:r + 1, :, queries]], 2)
                values = torch.cat([v[r:r + 1, :, before], v[r:r + 1, :, queries]], 2)
                n_before, n = before.stop - before.start, queries.stop - queries.start
                # causal aligned to the end: query j reads the keys before and its branch's keys up to j
                allowed = None if n_before == 0 else torch.ones(n, n_before + n, dtype=torch.bool,
                                                                device=q.device).tril(n_before)
                out[r:r + 1, :, queries] = F.scaled_dot_product_attention(
                    q[r:r + 1, :, queries], keys, values, attn_mask=allowed, dropout_p=dropout,
                    is_causal=allowed is None, scale=self.scale, enable_gqa=gqa)
        else:
            if attention_mask is not None:
                mask, causal = ~attention_mask, False
            elif sq == k.shape[2]:
                mask, causal = None, True
            else:  # a cached decode step: the new queries are the last sq of the sk positions
                mask = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - sq)
                causal = False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.scale, enable_gqa=k.shape[1] != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
