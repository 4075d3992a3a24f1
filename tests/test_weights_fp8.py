"""weights/fp8: blockwise (128x128) e4m3 quantization against a float64 reference."""

import pytest
import torch

from rntp_megatron.weights.fp8 import E4M3_MAX, dequantize_blockwise, fp8_buckets, quantize_blockwise


def test_blockwise_fp8_matches_float_reference_within_e4m3_rounding():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 300)[:, None]  # blocks of very different ranges
    q, scale_inv = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale_inv.shape == (3, 2)
    for i in range(3):  # reference: each block's scale is its amax / 448
        for j in range(2):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            assert scale_inv[i, j].item() == pytest.approx(block.abs().max().item() / E4M3_MAX, rel=1e-6)
    deq = dequantize_blockwise(q, scale_inv).double()
    scale = scale_inv.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale for subnormals
    err = (deq - w.double()).abs()
    assert (err <= w.double().abs() * 2.0 ** -4 + scale * 2.0 ** -9 + 1e-12).all()
    assert (err / (w.double().abs() + 1e-30))[w.abs() > scale.float() * 1.0].median() < 0.05


def test_exactly_representable_blocks_round_trip_and_zero_blocks_stay_zero():
    w = torch.zeros(128, 256)
    w[:, :128] = torch.tensor([1.0, -2.0, 0.5, 448.0]).repeat(32 * 128).view(128, 128)
    q, scale_inv = quantize_blockwise(w)
    assert scale_inv.tolist() == [[1.0, 1.0]]  # amax 448 -> scale 1; the zero block keeps scale 1
    assert torch.equal(dequantize_blockwise(q, scale_inv), w)
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(4))


def test_fp8_buckets_convert_only_linear_weights():
    bucket = [("model.layers.0.self_attn.q_proj.weight", torch.randn(64, 64)),
              ("model.layers.0.input_layernorm.weight", torch.ones(64)),
              ("model.embed_tokens.weight", torch.randn(10, 64))]
    [out] = list(fp8_buckets([bucket]))
    names = [n for n, _ in out]
    assert names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale_inv",
                     "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"]
    assert out[0][1].dtype == torch.float8_e4m3fn and out[2][1].dtype == torch.float32
