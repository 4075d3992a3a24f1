"""`rntp plan` for mixtures of experts: FLOPs from the parameters a token uses, memory from all of them."""

from __future__ import annotations

import pytest

from rntp_megatron.config import build_config
from rntp_megatron.plan import forward_flops_per_token, non_embedding_params, total_params


@pytest.mark.parametrize("card, active, total", [("qwen3_30b_a3b", 3.3e9, 30.5e9), ("qwen3_235b_a22b", 22e9, 235e9)])
def test_moe_cards_have_the_published_active_and_total_sizes(card, active, total):
    m = build_config({"model": {"card": card}}).model
    embeddings = 2 * m.vocab_size * m.hidden_size
    assert non_embedding_params(m) + embeddings == pytest.approx(active, rel=0.06)
    assert total_params(m) == pytest.approx(total, rel=0.02)


def test_moe_flops_follow_active_parameters():
    dense = build_config({"model": {"card": "qwen3_8b"}}).model
    assert non_embedding_params(dense) == non_embedding_params(dense, active=False)
    moe = build_config({"model": {"card": "qwen3_30b_a3b"}}).model
    top8 = forward_flops_per_token(moe, 1024)
    all_experts = forward_flops_per_token(build_config({"model": {"card": "qwen3_30b_a3b",
                                                                  "moe_router_topk": 128}}).model, 1024)
    expert = 3 * moe.hidden_size * moe.moe_ffn_hidden_size * moe.num_layers
    assert all_experts - top8 == pytest.approx(2 * 120 * expert)
