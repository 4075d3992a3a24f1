"""Megatron DDP wrapping and the Megatron optimizer for a list of model chunks."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import MegatronModule

from rntp_megatron.config import ParallelConfig, ScheduleConfig


def wrap_ddp(model: MegatronModule, parallel: ParallelConfig) -> DistributedDataParallel:
    """Megatron DDP around one model chunk: fp32 grad buffers (float64 ones for float64 params, as the exactness
    tests use), grads reduced over DP (and, through finalize_model_grads, sequence-parallel/qk-norm grads over TP
    and embeddings over PP).

    Losses are per-token sums (`calculate_per_token_loss`): finalize_model_grads divides by the global token
    count, so the result is independent of how the batch is split over micro-batches, DP ranks and stages.
    """
    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.params_dtype != torch.float64,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(chunks: list[DistributedDataParallel], schedule: ScheduleConfig,
                    parallel: ParallelConfig) -> MegatronOptimizer:
    """Adam(W) over the DDP-wrapped chunks (distributed optimizer when asked), clipping at schedule.clip_grad."""
    dtype = chunks[0].config.params_dtype
    config = OptimizerConfig(
        optimizer="adam",
        lr=schedule.lr,
        min_lr=schedule.min_lr,
        weight_decay=schedule.weight_decay,
        adam_beta1=schedule.adam_beta1,
        adam_beta2=schedule.adam_beta2,
        adam_eps=schedule.adam_eps,
        clip_grad=schedule.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, chunks)
