"""Mixture of experts on Megatron-Core's MoE layer: the TransformerConfig fields of a card, and its router metric.

Qwen3-MoE routes each token to the top k of E experts by softmax(router logits), renormalising the k weights to
sum to 1 when norm_topk_prob is set (all released checkpoints). softmax over the k largest logits equals those
renormalised probabilities, and that is Megatron's default top-k (moe_router_pre_softmax=False); without
norm_topk_prob the weights are the full softmax's (pre_softmax=True). No shared expert. The load-balancing loss
is Switch's, E * sum_e f_e * P_e per layer, weighted by model.moe_aux_loss_coeff.

On the CPU the experts are SequentialMLP (one local MLP per expert) and tokens go to them through the all-gather
dispatcher, over gloo; with CUDA the dispatcher is all-to-all, and with Transformer Engine the experts are
one grouped GEMM (TEGroupedMLP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from rntp_megatron.config import ModelConfig

AUX_METRIC = "load_balancing_loss"  # the name Megatron's router records it under


def moe_config(model: ModelConfig, on_gpu: bool, use_te: bool) -> dict[str, Any]:
    """TransformerConfig keyword arguments of the card's MoE layers ({} for a dense model)."""
    if model.num_moe_experts is None:
        return {}
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not model.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_grouped_gemm=on_gpu and use_te,
        moe_shared_expert_intermediate_size=None,
    )


def reset_moe_metrics() -> None:
    """Zero Megatron's MoE metric tracker (forward-only passes in train mode with grads on record into it too)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    get_moe_metrics_tracker().clear()


def moe_metrics(config: TransformerConfig, num_microbatches: int) -> dict[str, float]:
    """{'moe_load_balancing_loss': mean over layers and micro-batches of the aux loss (before its coefficient)}
    after a forward/backward; {} for a dense model or a zero coefficient. A collective over PP and DP (Megatron's
    tracker sums layers over the pipeline, averages over data-parallel ranks); it clears the tracker."""
    if config.num_moe_experts is None or not config.moe_aux_loss_coeff:
        return {}
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    totals: dict[str, torch.Tensor] = {}
    get_moe_metrics_tracker().report(loss_scale=1.0 / num_microbatches, iteration=0, force_initialize=True,
                                     track_names=[AUX_METRIC], num_layers=config.num_layers,
                                     total_loss_dict=totals)
    return {f"moe_{AUX_METRIC}": float(totals[AUX_METRIC])} if AUX_METRIC in totals else {}


def expert_parallel_max(value: int, device: torch.device) -> int:
    """max(value) over this rank's EP group (value itself at EP1). Forwards of an expert-parallel model are
    collectives of the EP group whose all-gather token dispatcher needs equal token counts from every rank, so
    ranks with batches of their own pad them to one agreed length (right padding leaves causal log-probs alone)."""
    if not parallel_state.model_parallel_is_initialized():  # one process without groups (tools, unit tests)
        return value
    group = parallel_state.get_expert_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return value
    box = torch.tensor([value], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return int(box.item())
