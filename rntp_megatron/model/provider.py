"""GPTModel provider: a Megatron-Core GPTModel for a model card (llama, qwen2, qwen3, qwen3_moe) on this rank's
stage."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from rntp_megatron.config import ModelConfig, ParallelConfig, padded_vocab_size
from rntp_megatron.model.moe import moe_config
from rntp_megatron.model.rope_positions import PositionedGPTModel
from rntp_megatron.model.spec import layer_spec, use_transformer_engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def importable(module: str) -> bool:
    """Whether `module` can be imported here (found on the path; not imported)."""
    return importlib.util.find_spec(module) is not None


def fusions(on_gpu: bool, dtype: torch.dtype) -> dict[str, object]:
    """The TransformerConfig fusion flags megatron-core can run here without Transformer Engine or Apex.

    On a GPU: the bias-SwiGLU, bias-dropout-add and vocab-parallel cross-entropy fusions are megatron-core's
    own functions under torch.compile (`megatron.core.jit.jit_fuser`; inductor needs triton), the last for
    bfloat16 models only (its backward casts the logits' gradient to bfloat16 whatever the dtype); the masked
    softmax fusion only where its CUDA extensions import (they come with Apex or a Megatron build, never with
    megatron-core alone; otherwise it would fail at the first attention). Always off: RoPE fusion (TE's
    kernel; megatron-core refuses the flag without it), the persistent layer norm (Apex's FastLayerNorm) and
    gradient-accumulation fusion (Apex's or TE's fused_weight_gradient_mlp_cuda). On CPU all off: torch.compile
    would build C++ for each new shape there, and the CPU paths of the project stay eager.
    """
    compiled = on_gpu and importable("triton")
    softmax_kernels = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")
    return dict(
        bias_activation_fusion=compiled,
        bias_dropout_fusion=compiled,
        cross_entropy_loss_fusion=compiled and dtype == torch.bfloat16,
        cross_entropy_fusion_impl="native",
        masked_softmax_fusion=on_gpu and all(map(importable, softmax_kernels)),
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def transformer_config(model: ModelConfig, parallel: ParallelConfig, **overrides: object) -> TransformerConfig:
    """TransformerConfig for the card: RMSNorm, SwiGLU, GQA, no linear biases (qkv bias for qwen2), MoE layers
    when the card has experts."""
    dtype = DTYPES[model.params_dtype]
    on_gpu = torch.cuda.is_available()
    use_te = use_transformer_engine(model)
    fp8 = {}
    if model.fp8 is not None:
        fp8 = dict(fp8="hybrid" if model.fp8 == "delayed" else "e4m3", fp8_recipe=model.fp8)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not on_gpu,
        **fusions(on_gpu, dtype),
        **fp8,
        **moe_config(model, on_gpu, use_te),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(model: ModelConfig, parallel: ParallelConfig, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, **config_overrides: object) -> PositionedGPTModel:
    """This rank's GPTModel stage; pre/post process default to this rank's place in the pipeline."""
    config = transformer_config(model, parallel, **config_overrides)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    gpt = PositionedGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, config),
        vocab_size=padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by,
                                     parallel.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
    )
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def model_card_dict(model: ModelConfig) -> dict:
    """The card's fields as a plain dict (for checkpoints and HF export)."""
    return dataclasses.asdict(model)
