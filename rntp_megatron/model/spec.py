"""Layer specs: Transformer Engine (with FP8) when TE imports, megatron-core's local modules otherwise; the MLP is
megatron-core's MoE layer when the config has experts (SequentialMLP experts locally, grouped GEMM with TE)."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from rntp_megatron.config import ModelConfig
from rntp_megatron.model.attention import SDPAttention


def transformer_engine_available() -> bool:
    """Whether Transformer Engine imports (it needs a GPU and its driver)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or OSError/RuntimeError without a CUDA driver
        return False
    return True


def use_transformer_engine(model: ModelConfig) -> bool:
    """The implementation the model card asks for, with a clear error when FP8 or TE cannot be had."""
    have_te = transformer_engine_available()
    if model.transformer_impl == "transformer_engine" and not have_te:
        raise RuntimeError("model.transformer_impl='transformer_engine' but Transformer Engine does not import "
                           "(install the 'gpu' extra on a machine with an NVIDIA GPU)")
    if model.fp8 is not None and not have_te:
        raise RuntimeError(f"model.fp8={model.fp8!r} needs Transformer Engine, which does not import here "
                           "(it needs an NVIDIA GPU: install the 'gpu' extra, or set model.fp8: null)")
    return model.transformer_impl == "transformer_engine" or (model.transformer_impl == "auto" and have_te)


class SequenceParallelRMSNorm:
    """torch RMSNorm whose params are marked `sequence_parallel`, so finalize_model_grads all-reduces their
    grads over TP (megatron's WrappedTorchNorm refuses sequence parallelism; TE's norm is not there on CPU)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> torch.nn.Module:
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def layer_spec(model: ModelConfig, config: TransformerConfig) -> ModuleSpec | TransformerBlockSubmodules:
    """The GPT layer spec for this model card (TE or local; RMSNorm, SwiGLU, optional qk-norm).

    Local spec under sequence parallelism: every norm of the block, the final one included, is
    SequenceParallelRMSNorm, so the block's submodules are spelled out for this pipeline stage.
    """
    experts = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm)
    if use_transformer_engine(model):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm, **experts)
    spec = get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm", **experts)
    # torch SDPA (flash on a GPU) in place of megatron's materialised softmax; takes shared-context masks
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if not config.sequence_parallel:
        return spec
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if model.qk_layernorm:  # per-head norms: finalize_model_grads sums their grads over TP (by name and flag)
        spec.submodules.self_attention.submodules.q_layernorm = SequenceParallelRMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = SequenceParallelRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)
