"""Mixture-of-experts config: validation names the field, the MoE TransformerConfig follows the card, and the HF
config.json of a Qwen3-MoE card round-trips."""

from __future__ import annotations

import json

import pytest

from rntp_megatron.config import ConfigError, build_config, validate
from rntp_megatron.model import hf_mapping


@pytest.mark.parametrize("model, parallel, message", [
    ({"card": "tiny"}, {"expert_model_parallel_size": 2}, r"parallel.expert_model_parallel_size: EP=2 needs a "
                                                           r"mixture-of-experts model"),
    ({"card": "tiny", "num_moe_experts": 4}, {}, r"model.num_moe_experts: experts are mapped for family 'qwen3_moe'"),
    ({"card": "tiny_qwen3_moe", "num_moe_experts": None}, {}, r"model.num_moe_experts: family 'qwen3_moe' needs"),
    ({"card": "tiny_qwen3_moe", "moe_router_topk": 9}, {}, r"model.moe_router_topk: 9 must be in 1..num_moe_experts"),
    ({"card": "tiny_qwen3_moe"}, {"expert_model_parallel_size": 3}, r"EP=3 must divide model.num_moe_experts=8"),
    ({"card": "tiny_qwen3_moe"}, {"tensor_model_parallel_size": 2}, r"parallel.sequence_parallel: .*MoE layer"),
])
def test_moe_config_errors_name_the_field(model, parallel, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model": model, "parallel": parallel})


def test_expert_parallel_size_must_divide_data_parallel_size():
    cfg = build_config({"model": {"card": "tiny_qwen3_moe"}, "parallel": {"expert_model_parallel_size": 4}})
    validate(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"EP=4 must divide the data-parallel size 2"):
        validate(cfg, world_size=2)


def test_transformer_config_routes_like_qwen3():
    from rntp_megatron.model.provider import transformer_config

    cfg = build_config({"model": {"card": "qwen3_30b_a3b"}, "parallel": {"expert_model_parallel_size": 8}})
    tc = transformer_config(cfg.model, cfg.parallel)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (128, 8, 768)
    assert tc.moe_router_score_function == "softmax" and not tc.moe_router_pre_softmax  # = norm_topk_prob
    assert tc.moe_aux_loss_coeff == 0.001 and tc.moe_shared_expert_intermediate_size is None
    assert tc.moe_token_dispatcher_type == "allgather"  # on this CPU machine


@pytest.mark.parametrize("card", ["tiny_qwen3_moe", "qwen3_30b_a3b", "qwen3_235b_a22b"])
def test_hf_config_round_trip(card):
    cfg = build_config({"model": {"card": card, "transformer_impl": "local"}}).model
    hf = json.loads(json.dumps(hf_mapping.hf_config(cfg)))
    assert hf["architectures"] == ["Qwen3MoeForCausalLM"] and hf["num_experts"] == cfg.num_moe_experts
    back = build_config({"model": {**hf_mapping.model_fields_from_hf(hf), "transformer_impl": "local"}}).model
    for field in ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                  "vocab_size", "qk_layernorm", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                  "moe_norm_topk_prob", "moe_aux_loss_coeff"):
        assert getattr(back, field) == getattr(cfg, field), field
    with pytest.raises(hf_mapping.MappingError, match="dense layers among the MoE ones"):
        hf_mapping.model_fields_from_hf({**hf, "mlp_only_layers": [0]})
