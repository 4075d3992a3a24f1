"""The one Megatron-Core <-> Hugging Face mapping: parameter names, tensor layouts and config.json.

Megatron-Core GPTModel (local or Transformer Engine spec) against HF LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM and Qwen3MoeForCausalLM. Layouts that differ:
- linear_qkv holds q, k and v interleaved per query group, [g0: q (heads/groups * head_dim rows), k, v, g1: ...];
  each TP rank holds whole groups, so the TP shards concatenate (dim 0) into the full interleaved tensor.
- linear_fc1 holds [gate; up] per TP shard, so TP shards are merged halves-first, not by plain concatenation.
- the vocabulary is padded to a multiple of make_vocab_size_divisible_by * TP; HF tensors have the true vocab.
- tied embeddings: output_layer.weight (a copy on the last pipeline stage) has no HF tensor.
- the TE spec fuses the pre-attention / pre-MLP norms into linear_qkv / linear_fc1 (`layer_norm_weight`).
- experts: names here carry the global expert number, `mlp.experts.E.linear_fc{1,2}.weight` (weights/export's
  global_named_parameters makes them from an EP rank's local experts, SequentialMLP or grouped); fc1 is
  [gate; up] as in the dense MLP; `mlp.router.weight` is HF's `mlp.gate.weight`.
Everything here works on full (TP-merged) tensors with global layer numbers, except shard_to_hf, which places
one TP shard inside the full HF tensors; weights/ does the collectives.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple, Optional

import torch

from rntp_megatron.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}

# layer-local megatron suffix -> HF suffix under model.layers.N (qkv and fc1 are split separately)
_LAYER_NAMES = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.router.weight": "mlp.gate.weight",
}
_TOP_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
# TP partition dim of each kind of parameter; norms (and anything not listed) are replicated.
_COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "word_embeddings.weight",
                    "output_layer.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(linear_fc[12])\.weight$")  # layer-local, global expert number
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class MappingError(ValueError):
    """A parameter name or shape the mapping does not know; the message names it."""


def head_dim(cfg: ModelConfig) -> int:
    """Per-head width: kv_channels when the card sets it (qwen3), else hidden_size / num_attention_heads."""
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def strip_wrappers(name: str) -> str:
    """A parameter name without the `module.` prefixes that DDP / Float16Module wrappers add."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


# ---------------------------------------------------------------------------------------------------
# Tensor parallelism: how this rank's shard relates to the full tensor.


def tp_partition_dim(name: str) -> Optional[int]:
    """0 for column-parallel params (qkv, fc1, vocab), 1 for row-parallel (proj, fc2), None if replicated."""
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def merge_tp_shards(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full tensor from the TP shards [tp x shard] (fc1: gates of all shards, then ups; else concat on the TP dim)."""
    dim = tp_partition_dim(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def split_tp_shard(name: str, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP rank tp_rank's shard of the full tensor (inverse of merge_tp_shards)."""
    dim = tp_partition_dim(name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % tp_size:
        raise MappingError(f"{name}: dim {dim} of shape {tuple(full.shape)} does not split over TP={tp_size}")
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


# ---------------------------------------------------------------------------------------------------
# Names and layouts of full tensors.


def _split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q[heads*d, ...], k[groups*d, ...], v[groups*d, ...] from megatron's interleaved
    qkv[groups*(heads/groups+2)*d, ...]."""
    groups, d = cfg.num_query_groups, head_dim(cfg)
    per_group = cfg.num_attention_heads // groups
    expected = groups * (per_group + 2) * d
    if qkv.shape[0] != expected:
        raise MappingError(f"linear_qkv has {qkv.shape[0]} rows, expected groups*(heads/groups+2)*head_dim = "
                           f"{groups}*({per_group}+2)*{d} = {expected}")
    grouped = qkv.reshape(groups, per_group + 2, d, *qkv.shape[1:])
    q = grouped[:, :per_group].reshape(groups * per_group * d, *qkv.shape[1:])
    k = grouped[:, per_group].reshape(groups * d, *qkv.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * d, *qkv.shape[1:])
    return q, k, v


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Megatron's interleaved qkv[groups*(heads/groups+2)*d, ...] from HF q, k, v (inverse of _split_qkv)."""
    groups, d = cfg.num_query_groups, head_dim(cfg)
    per_group = cfg.num_attention_heads // groups
    rest = q.shape[1:]
    grouped = torch.cat([q.reshape(groups, per_group, d, *rest), k.reshape(groups, 1, d, *rest),
                         v.reshape(groups, 1, d, *rest)], dim=1)
    return grouped.reshape(groups * (per_group + 2) * d, *rest)


def _mlp_prefix(prefix: str, rest: str) -> tuple[str, str]:
    """(HF prefix of the MLP, layer-local name as a dense MLP's): an expert's fc1/fc2 map like the dense ones."""
    expert = _EXPERT_RE.match(rest)
    if expert:
        return f"{prefix}mlp.experts.{expert.group(1)}.", f"mlp.{expert.group(2)}.weight"
    return f"{prefix}mlp.", rest


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one full megatron tensor with a global layer number; [] for a tied output layer."""
    name = strip_wrappers(name)
    if name in _TOP_NAMES:
        if name == "output_layer.weight" and cfg.tie_word_embeddings:
            return []
        if name in _VOCAB_PARAMS:
            tensor = tensor[: cfg.vocab_size]  # drop the TP vocabulary padding
        return [(_TOP_NAMES[name], tensor)]
    m = _LAYER_RE.match(name)
    if m is None:
        raise MappingError(f"no HF name for megatron parameter {name!r}")
    prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = _split_qkv(tensor, cfg)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    mlp, rest = _mlp_prefix(prefix, rest)
    if rest == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        return [(f"{mlp}gate_proj.weight", gate), (f"{mlp}up_proj.weight", up)]
    if rest == "mlp.linear_fc2.weight":
        return [(f"{mlp}down_proj.weight", tensor)]
    if rest in _LAYER_NAMES:
        return [(prefix + _LAYER_NAMES[rest], tensor)]
    raise MappingError(f"no HF name for megatron parameter {name!r}")


class HFPiece(NamedTuple):
    """Part of one HF tensor held by a TP shard: hf[name].narrow(dim, start, piece.shape[dim]) == piece
    (dim None: piece is the whole tensor)."""

    name: str
    dim: Optional[int]
    start: int
    piece: torch.Tensor


def shard_to_hf(name: str, shard: torch.Tensor, cfg: ModelConfig, tp_size: int, tp_rank: int) -> list[HFPiece]:
    """Where TP rank tp_rank's shard of megatron `name` (global layer number) lands in the full HF tensors, so
    each rank can write its part in place with no merge; a replicated parameter is reported by TP rank 0 only.
    A partitioned shard is itself the full tensor of a model with 1/tp of the query groups and heads, so
    to_hf maps it, and its HF parts are the tp_rank-th blocks along the partition dim (the vocab trimmed)."""
    name = strip_wrappers(name)
    dim = tp_partition_dim(name)
    if dim is None or tp_size == 1:
        return [HFPiece(n, None, 0, t) for n, t in to_hf(name, shard, cfg)] if tp_rank == 0 else []
    if name in _VOCAB_PARAMS:  # rows [start, start + rows) of the padded vocab: to_hf trims them at the true one
        start = tp_rank * shard.shape[0]
        local = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size - start, 0))
        return [HFPiece(n, 0, start, t) for n, t in to_hf(name, shard, local) if t.shape[0]]
    if cfg.num_query_groups % tp_size:
        raise MappingError(f"num_query_groups={cfg.num_query_groups} does not split over TP={tp_size}")
    local = dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp_size,
                                num_query_groups=cfg.num_query_groups // tp_size, kv_channels=head_dim(cfg))
    return [HFPiece(n, dim, tp_rank * t.shape[dim], t) for n, t in to_hf(name, shard, local)]


def megatron_names(cfg: ModelConfig, fused_norms: bool) -> list[str]:
    """Every full megatron parameter name of the model (all stages), in HF export order."""
    norm_in, norm_mlp = (("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
                         if fused_norms else ("input_layernorm.weight", "pre_mlp_layernorm.weight"))
    layer = [norm_in, "self_attention.linear_qkv.weight"]
    layer += ["self_attention.linear_qkv.bias"] if cfg.qkv_bias else []
    layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"] if cfg.qk_layernorm else []
    layer += ["self_attention.linear_proj.weight", norm_mlp]
    if cfg.num_moe_experts is None:
        layer += ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    else:
        layer += ["mlp.router.weight"] + [f"mlp.experts.{e}.linear_fc{k}.weight"
                                          for e in range(cfg.num_moe_experts) for k in (1, 2)]
    names = ["embedding.word_embeddings.weight"]
    names += [f"decoder.layers.{i}.{s}" for i in range(cfg.num_layers) for s in layer]
    names += ["decoder.final_layernorm.weight"] + ([] if cfg.tie_word_embeddings else ["output_layer.weight"])
    return names


def from_hf(name: str, hf: Mapping[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> torch.Tensor:
    """The full megatron tensor `name` (global layer number) built from HF tensors; vocab padded with zeros."""
    name = strip_wrappers(name)
    if name in _TOP_NAMES:
        key = _TOP_NAMES[name]
        if name == "output_layer.weight" and cfg.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        t = _get(hf, key)
        if name in _VOCAB_PARAMS:
            if t.shape[0] != cfg.vocab_size:
                raise MappingError(f"{key} has {t.shape[0]} rows but model.vocab_size is {cfg.vocab_size}")
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
        return t
    m = _LAYER_RE.match(name)
    if m is None:
        raise MappingError(f"no HF source for megatron parameter {name!r}")
    prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return _merge_qkv(*(_get(hf, f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv"), cfg)
    mlp, rest = _mlp_prefix(prefix, rest)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([_get(hf, f"{mlp}gate_proj.weight"), _get(hf, f"{mlp}up_proj.weight")])
    if rest == "mlp.linear_fc2.weight":
        return _get(hf, f"{mlp}down_proj.weight")
    if rest in _LAYER_NAMES:
        return _get(hf, prefix + _LAYER_NAMES[rest])
    raise MappingError(f"no HF source for megatron parameter {name!r}")


def _get(hf: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in hf:
        raise MappingError(f"HF weights lack {key!r} (have {len(hf)} tensors, e.g. {sorted(hf)[:3]})")
    return hf[key]


# ---------------------------------------------------------------------------------------------------
# config.json


def hf_config(cfg: ModelConfig, torch_dtype: Optional[str] = None, **token_ids: int) -> dict[str, Any]:
    """The HF config.json dict for the card (LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM)."""
    if cfg.family not in ARCHITECTURES:
        raise MappingError(f"model.family {cfg.family!r} has no HF architecture (known: {sorted(ARCHITECTURES)})")
    d = head_dim(cfg)
    if cfg.family == "qwen2" and d * cfg.num_attention_heads != cfg.hidden_size:
        raise MappingError(f"qwen2 has no explicit head_dim: kv_channels={cfg.kv_channels} must equal "
                           f"hidden_size/num_attention_heads = {cfg.hidden_size // cfg.num_attention_heads}")
    if cfg.family not in ("qwen3", "qwen3_moe") and cfg.qk_layernorm:
        raise MappingError(f"model.qk_layernorm is only mapped for qwen3, not {cfg.family!r}")
    if cfg.family == "qwen2" and not cfg.qkv_bias:
        raise MappingError("qwen2 always has q/k/v biases: set model.qkv_bias: true")
    if (cfg.family == "qwen3_moe") != (cfg.num_moe_experts is not None):
        raise MappingError(f"model.num_moe_experts={cfg.num_moe_experts} does not fit family {cfg.family!r}")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": torch_dtype or cfg.params_dtype,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if cfg.family != "qwen2":
        out.update(head_dim=d, attention_bias=cfg.qkv_bias)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if cfg.family == "qwen3_moe":  # every layer sparse, no shared expert
        out.update(num_experts=cfg.num_moe_experts, num_experts_per_tok=cfg.moe_router_topk,
                   moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
                   norm_topk_prob=cfg.moe_norm_topk_prob, router_aux_loss_coef=cfg.moe_aux_loss_coeff,
                   decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                   use_sliding_window=False, sliding_window=None)
    if cfg.rope_scaling_factor is not None:
        # megatron-core's llama3 frequency scaling uses these fixed constants (rotary_pos_embedding.py)
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    out.update(token_ids)
    return out


def model_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields (a dict for build_config's `model` section) from an HF config.json dict."""
    arch = (hf.get("architectures") or [None])[0]
    family = {v: k for k, v in ARCHITECTURES.items()}.get(arch) or hf.get("model_type")
    if family not in ARCHITECTURES:
        raise MappingError(f"HF config: architecture {arch!r} / model_type {hf.get('model_type')!r} is not one of "
                           f"{sorted(ARCHITECTURES.values())}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise MappingError(f"HF config: rope scaling {scaling!r} is not supported (only llama3)")
    heads = hf["num_attention_heads"]
    d = hf.get("head_dim") or hf["hidden_size"] // heads
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
    moe = {}
    if family == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise MappingError(f"HF config: dense layers among the MoE ones (mlp_only_layers="
                               f"{hf.get('mlp_only_layers')}, decoder_sparse_step={hf.get('decoder_sparse_step')}) "
                               "are not supported")
        moe = {"num_moe_experts": hf.get("num_experts") or hf["num_local_experts"],
               "moe_router_topk": hf["num_experts_per_tok"], "moe_ffn_hidden_size": hf["moe_intermediate_size"],
               "moe_norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
               "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0))}
    return {**moe,
        "family": family,
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": d if (family in ("qwen3", "qwen3_moe") or d * heads != hf["hidden_size"]) else None,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "rotary_base": float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        "rope_scaling_factor": float(scaling["factor"]) if scaling else None,
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "qkv_bias": family == "qwen2" or bool(hf.get("attention_bias", False)),
        "qk_layernorm": family in ("qwen3", "qwen3_moe"),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "params_dtype": dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
    }
