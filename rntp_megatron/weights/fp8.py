"""Blockwise FP8 weights for FP8 rollout engines (DeepSeek-V3 / Qwen3-FP8 layout): each 128x128 block of a
linear weight becomes float8 e4m3 values plus one float32 `weight_scale_inv` (w ~= q * scale_inv).

Used by `rntp convert to-hf --fp8` (an HF folder whose config.json carries QUANTIZATION_CONFIG, the form
transformers' FineGrainedFP8 and SGLang's fp8 loader read) and by the sync to an SGLang server started with
`--quantization fp8` (rollout.sglang.quantization: the server starts from such a folder, and every push sends
`weight` + `weight_scale_inv` for each linear layer). Quantization runs where the tensors are (GPU or CPU)."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from rntp_megatron.weights.buckets import NamedTensors, packed

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
BLOCK = 128
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": ["lm_head"]}


def quantize_blockwise(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """q[M, N] (float8_e4m3fn) and scale_inv[ceil(M/b), ceil(N/b)] (float32) with w ~= q * scale_inv per b x b block."""
    if w.dim() != 2:
        raise ValueError(f"blockwise FP8 takes 2-D weights, got shape {tuple(w.shape)}")
    m, n = w.shape
    rows, cols = -(-m // block), -(-n // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:m, :n] = w.float()
    blocks = padded.view(rows, block, cols, block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:m, :n].contiguous(), scale_inv


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 w[M, N] = q * scale_inv of each block (inverse of quantize_blockwise up to FP8 rounding)."""
    scale = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * scale


def is_fp8_linear(name: str) -> bool:
    """Linear layer weights inside decoder layers (projections); embeddings, lm_head and norms stay as they are."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def fp8_buckets(buckets: Iterable[NamedTensors], block: int = BLOCK) -> Iterator[NamedTensors]:
    """The same buckets with each linear weight replaced by its FP8 values and `<name>_scale_inv`, each bucket
    packed into one fresh buffer on its tensors' device (one shard to write, one CUDA IPC handle to send)."""
    for bucket in buckets:
        out: NamedTensors = []
        for name, t in bucket:
            if is_fp8_linear(name):
                q, s = quantize_blockwise(t, block)
                out += [(name, q), (name + "_scale_inv", s)]
            else:
                out.append((name, t))
        yield packed(out) if out else out
