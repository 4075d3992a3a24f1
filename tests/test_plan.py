"""`rntp plan` for mixtures of experts: FLOPs from the parameters a token uses, memory from all of them."""

from __future__ import annotations

import pytest

from rntp_megatron.config import build_config
from rntp_megatron.flops import TokenTally, forward_flops, non_embedding_params
from rntp_megatron.plan import total_params


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
    one_token = TokenTally().add(1, past=1023)
    top8 = forward_flops(moe, one_token)
    all_experts = forward_flops(build_config({"model": {"card": "qwen3_30b_a3b", "moe_router_topk": 128}}).model,
                                one_token)
    expert = 3 * moe.hidden_size * moe.moe_ffn_hidden_size * moe.num_layers
    assert all_experts - top8 == pytest.approx(2 * 120 * expert)
