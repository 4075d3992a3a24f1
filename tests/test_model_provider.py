"""The GPTModel provider: model cards of the three families, vocab padding, FP8 without TE."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.config import build_config
from rntp_megatron.model.provider import padded_vocab_size, transformer_config
from rntp_megatron.model.spec import transformer_engine_available
from rntp_megatron.runtime.spawn import run_ranks


@pytest.mark.parametrize("vocab, tp, padded", [(256, 1, 256), (257, 1, 384), (151936, 8, 152576), (128256, 4, 128512)])
def test_padded_vocab_size(vocab, tp, padded):
    assert padded_vocab_size(vocab, 128, tp) == padded and padded % (128 * tp) == 0


@pytest.mark.parametrize("card", ["qwen3_8b", "llama3_1_70b"])
def test_real_cards_give_valid_transformer_configs(card):
    cfg = build_config({"model": {"card": card}, "parallel": {"tensor_model_parallel_size": 8}})
    tc = transformer_config(cfg.model, cfg.parallel)
    assert tc.num_query_groups == 8 and tc.gated_linear_unit and tc.normalization == "RMSNorm"
    assert tc.kv_channels == 128 and tc.params_dtype == torch.bfloat16


@pytest.mark.skipif(transformer_engine_available(), reason="checks the error raised where TE cannot import")
def test_fp8_without_transformer_engine_is_a_clear_error():
    from rntp_megatron.model.spec import use_transformer_engine

    cfg = build_config({"model": {"card": "tiny", "fp8": "mxfp8"}})
    with pytest.raises(RuntimeError, match="model.fp8='mxfp8' needs Transformer Engine"):
        use_transformer_engine(cfg.model)


def build_cards(rank: int, world: int) -> dict:
    """Parameter names and shapes of each tiny family card, and a forward's logits shape."""
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    out = {}
    for card in ("tiny", "tiny_qwen2", "tiny_qwen3"):
        cfg = build_config({"model": {"card": card}})
        init_distributed(cfg.parallel)
        model = build_model(cfg.model, cfg.parallel)
        tokens = torch.randint(0, 256, (2, 8))
        logits = model(tokens, torch.arange(8).expand(2, 8), None)
        out[card] = ({n: tuple(p.shape) for n, p in model.named_parameters()}, tuple(logits.shape))
        destroy_distributed()
    return out


def test_family_features_are_built():
    (cards,) = run_ranks(build_cards, 1)
    llama, shape = cards["tiny"]
    assert shape == (2, 8, 256)
    assert "output_layer.weight" in llama and not any("bias" in n or "layernorm.weight" in n and "q_" in n for n in llama)
    qwen2, _ = cards["tiny_qwen2"]
    assert qwen2["decoder.layers.0.self_attention.linear_qkv.bias"] == ((4 + 2 * 2) * 16,)
    assert "output_layer.weight" not in qwen2  # tied embeddings
    qwen3, _ = cards["tiny_qwen3"]
    assert qwen3["decoder.layers.0.self_attention.q_layernorm.weight"] == (32,)  # kv_channels=32, not 64/4
    assert qwen3["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 32, 64)
