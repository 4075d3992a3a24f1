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


FUSED = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")  # megatron-core's own


def test_fusions_are_on_for_a_gpu_without_te_and_off_on_cpu(monkeypatch):
    from rntp_megatron.model import provider

    cfg = build_config({"model": {"card": "qwen3_8b"}})
    cpu = transformer_config(cfg.model, cfg.parallel)
    assert not any(getattr(cpu, k) for k in (*FUSED, "masked_softmax_fusion", "apply_rope_fusion"))
    # a CUDA machine with triton (torch's own) and neither TE nor Apex (nor their softmax kernels)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(provider, "importable", lambda module: module == "triton")
    monkeypatch.setattr(provider, "use_transformer_engine", lambda model: False)
    gpu = transformer_config(cfg.model, cfg.parallel)
    assert all(getattr(gpu, k) for k in FUSED) and gpu.cross_entropy_fusion_impl == "native"  # a bfloat16 card
    fp32 = build_config({"model": {"card": "qwen3_8b", "params_dtype": "float32"}}).model
    assert not transformer_config(fp32, cfg.parallel).cross_entropy_loss_fusion  # its backward is bfloat16
    assert not gpu.masked_softmax_fusion and not gpu.apply_rope_fusion and not gpu.gradient_accumulation_fusion
    monkeypatch.setattr(provider, "importable", lambda module: True)  # an Apex build's softmax kernels
    assert transformer_config(cfg.model, cfg.parallel).masked_softmax_fusion


FUSED_CPU_RUN = """
import json, sys
import torch
from rntp_megatron.config import build_config
from rntp_megatron.model.provider import build_model, fusions
from rntp_megatron.runtime import init_distributed

cfg = build_config({"model": {"card": "tiny"}})
init_distributed(cfg.parallel, seed=1)
# what a GPU without TE or Apex gets for this float32 card (no softmax kernels here)
on = {k: v for k, v in fusions(True, torch.float32).items() if k != "masked_softmax_fusion"}
fused, plain = build_model(cfg.model, cfg.parallel, **on), build_model(cfg.model, cfg.parallel)
plain.load_state_dict(fused.state_dict())
tokens = torch.randint(0, 256, (2, 12))
out = {}
for name, model in (("fused", fused), ("plain", plain)):
    loss = model(tokens[:, :-1], torch.arange(11).expand(2, 11), None, labels=tokens[:, 1:]).mean()
    loss.backward()
    out[name] = [loss.item()] + [p.grad.abs().sum().item() for p in model.parameters()]
out["config"] = {k: getattr(fused.config, k) for k in on}
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("apex", "transformer_engine"))
print(json.dumps(out))
"""


def test_a_model_with_the_gpu_fusions_runs_without_apex_or_te(tmp_path):
    """The GPU fusions' code paths (megatron-core's fused autograd functions, run eagerly: TORCHDYNAMO_DISABLE)
    build and train a step on CPU equal to the unfused model's, importing neither Apex nor TE."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FUSED_CPU_RUN], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["config"]["bias_activation_fusion"] and out["config"]["bias_dropout_fusion"], out["config"]
    assert out["imported"] == []
    assert out["fused"] == pytest.approx(out["plain"], rel=1e-6)
