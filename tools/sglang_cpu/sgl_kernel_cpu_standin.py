"""Pure-torch stand-in for the CPU build of sgl-kernel, installed as the `sgl_kernel` module of the SGLang
server virtualenv on CPU machines (tools/install_sglang.sh).

sglang 0.5.21 with `--device cpu` imports sgl_kernel at load time and calls two of its CPU ops for plain
decoding; PyPI only has CUDA builds of sgl-kernel. This module provides those two ops; every other name
resolves to a function that raises NotImplementedError when called (sglang imports many ops it never uses
on this path, e.g. AMX GEMMs and speculative-decoding kernels).
"""
import ctypes

import torch

__version__ = "0.0.0+rntp.cpu.standin"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_len: int,
) -> None:
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = the next end[i]-start[i] entries of out_cache_loc[N]."""
    lengths = (end_offset - start_offset).tolist()
    pieces = torch.split(out_cache_loc[: sum(lengths)], lengths)
    for row, start, end, piece in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), pieces):
        req_to_token[row, start:end] = piece.to(req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every KV buffer b (base address data_ptrs[b], row size strides[b] bytes): row tgt_loc[j] := row src_loc[j]."""
    # The buffers are only known by address (one per layer and K/V), so rows are moved as raw bytes.
    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for base, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        for tgt, src in pairs:
            ctypes.memmove(base + tgt * row_bytes, base + src * row_bytes, row_bytes)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def not_in_standin(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by the CPU stand-in (only assign_req_to_token_pool_cpu and "
            "copy_all_layer_kv_cache_cpu are); run SGLang on a GPU or with a real sgl-kernel CPU build"
        )

    not_in_standin.__name__ = name
    return not_in_standin
