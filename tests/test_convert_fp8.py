"""`rntp convert to-hf --fp8`: blockwise FP8 linear weights + weight_scale_inv and the quantization_config that
SGLang and transformers read. Dequantized weights are within e4m3 rounding of the Megatron model's, the rest is
exact, and transformers loads the folder (on CPU it dequantizes) with logits close to the model's."""

from __future__ import annotations

import json

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks

TOKENS = [[1, 5, 9, 200, 3, 77, 31, 4], [8, 8, 2, 250, 0, 19, 6, 100]]
# 128-aligned linear layers (SGLang's block-quantized loader needs them; transformers reads the block from the grid)
MODEL = {"card": "tiny", "hidden_size": 128, "ffn_hidden_size": 256, "num_attention_heads": 4,
         "num_query_groups": 2, "transformer_impl": "local", "init_method_std": 0.05}


def _save(rank: int, world_size: int, root: str) -> tuple[dict, list]:
    """A random model saved as a checkpoint; its HF tensors and float32 logits of TOKENS."""
    from rntp_megatron.checkpoint import save_checkpoint
    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import gather_hf_state_dict

    cfg = build_config({"model": MODEL})
    init_distributed(cfg.parallel, seed=5)
    try:
        model = build_model(cfg.model, cfg.parallel).eval()
        fields = {k: v for k, v in vars(cfg.model).items() if k != "card"}
        save_checkpoint(root, 1, [model], None, trainer_state={"step": 1, "model": fields}, rank_state={})
        tokens = torch.tensor(TOKENS)
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        return {k: v.clone() for k, v in gather_hf_state_dict(model, cfg.model).items()}, logits.tolist()
    finally:
        destroy_distributed()


def _rntp(rank: int, world_size: int, argv: list[str]) -> int:
    from rntp_megatron.cli import main

    return main(argv)


@pytest.mark.slow
def test_convert_fp8_dequantizes_to_the_model_and_loads_in_transformers(tmp_path):
    import transformers

    from rntp_megatron.weights.fp8 import E4M3_MAX, dequantize_blockwise, is_fp8_linear
    from rntp_megatron.weights.hf_checkpoint import SafetensorsFolder

    [(original, logits)] = run_ranks(_save, 1, (str(tmp_path / "ckpt"),))
    out = tmp_path / "hf_fp8"
    [rc] = run_ranks(_rntp, 1, (["convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out),
                                 "--fp8"],))
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    assert config["torch_dtype"] == "float32"
    folder = SafetensorsFolder(out)
    linear = [n for n in original if is_fp8_linear(n)]
    assert len(linear) == 2 * 7 and set(folder) == set(original) | {n + "_scale_inv" for n in linear}
    for name, want in original.items():
        got = folder[name]
        if name not in linear:
            assert got.dtype == want.dtype and torch.equal(got, want), name
            continue
        scale = folder[name + "_scale_inv"]
        assert got.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert scale.shape == (-(-want.shape[0] // 128), -(-want.shape[1] // 128))
        err = (dequantize_blockwise(got, scale) - want).abs()
        # e4m3: 3 mantissa bits, relative rounding <= 2^-4; below the normal range, absolute <= 2^-9 * scale
        assert (err <= want.abs() * 2.0 ** -4 + scale.max() * 2.0 ** -9).all(), name
        assert scale.max().item() == pytest.approx(want.abs().max().item() / E4M3_MAX, rel=1e-6)
    # transformers reads the quantization_config (FineGrainedFP8; on CPU it dequantizes, to bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    loaded = model.state_dict()
    for name in linear:  # the same blocks and scales as ours, up to bfloat16 rounding
        ours = dequantize_blockwise(folder[name], folder[name + "_scale_inv"])
        assert torch.allclose(loaded[name].float(), ours, rtol=2.0 ** -8, atol=0), name
    with torch.no_grad():
        hf = model(torch.tensor(TOKENS)).logits.float()
    want = torch.tensor(logits)[..., :hf.shape[-1]]
    rel = ((hf - want).norm() / want.norm()).item()
    assert 1e-4 < rel < 0.1, f"FP8 logits differ from the model's by {rel:.4f} (relative L2)"
