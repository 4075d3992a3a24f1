"""model/attention.SDPAttention on shared-context rows, in float64: every position's output equals causal
attention over [context | its own branch] alone; plain rows equal megatron's own DotProductAttention."""

from __future__ import annotations

import torch

from rntp_megatron.model.attention import SDPAttention, SharedContextMask


def _config(heads: int = 4, groups: int = 2, dim: int = 8):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=dim, attention_dropout=0.0,
                             params_dtype=torch.float64, use_cpu_initialization=True)


def _qkv(s: int, b: int = 1, heads: int = 4, groups: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, dim, generator=g, dtype=torch.float64),
            torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64),
            torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64))


def test_shared_context_rows_attend_to_context_and_own_branch_only():
    attn = SDPAttention(_config(), 1, None, "self")
    # one row: group A = context 5 + branches of 3 and 2, group B = context 4 + branch 3, then 2 padding
    seg = torch.tensor([[1] * 10 + [2] * 7 + [0] * 2])
    br = torch.tensor([[0] * 5 + [1] * 3 + [2] * 2 + [0] * 4 + [3] * 3 + [0] * 2])
    q, k, v = _qkv(seg.shape[1])
    out = attn(q, k, v, SharedContextMask(seg, br))
    for ctx, branch in ((range(0, 5), range(5, 8)), (range(0, 5), range(8, 10)), (range(10, 14), range(14, 17))):
        idx = torch.tensor(list(ctx) + list(branch))
        alone = attn(q[idx], k[idx], v[idx], None)  # plain causal over [context | branch]
        assert torch.allclose(out[idx], alone, rtol=1e-12, atol=1e-12)
    assert out.shape == (19, 1, 32) and out[17:].abs().sum() == 0  # padding: no output


def _plain_rows(rank: int, world: int) -> float:
    """max |SDPAttention - DotProductAttention| on causal rows (megatron's needs its parallel state)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from rntp_megatron.config import ParallelConfig
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=1)
    q, k, v = _qkv(12, b=2)
    ours = SDPAttention(_config(), 1, AttnMaskType.causal, "self")(q, k, v, None)
    theirs = DotProductAttention(_config(), 1, AttnMaskType.causal, "self")(q, k, v, None)
    parallel_state.destroy_model_parallel()
    destroy_distributed()
    return (ours - theirs).abs().max().item()


def test_plain_rows_match_megatron_dot_product_attention():
    from rntp_megatron.runtime.spawn import run_ranks

    assert run_ranks(_plain_rows, 1)[0] < 1e-12
