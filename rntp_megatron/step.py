"""One optimizer step through Megatron's pipeline schedules, for any loss hook."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from rntp_megatron.model.moe import moe_metrics, reset_moe_metrics
from rntp_megatron.runtime import device


def reduce_logged(losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum each logged [value_sum, count] pair over micro-batches and DP ranks -> value_sum / count.

    Only the last pipeline stage has losses; the result is broadcast to every stage of the pipeline.
    """
    result: list = [{}]
    if parallel_state.is_pipeline_last_stage():
        names = sorted(losses[0]) if losses else []
        totals = (torch.stack([sum(d[n].double() for d in losses) for n in names]) if names
                  else torch.zeros(0, 2, device=device()))
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        result = [{n: (t[0] / t[1].clamp(min=1)).item() for n, t in zip(names, totals)}]
    dist.broadcast_object_list(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return result[0]


def forward_backward(chunks: list[DistributedDataParallel], forward_step: Callable,
                     microbatches: Iterable[dict[str, torch.Tensor]], num_microbatches: int, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Run the schedule (1F1B under PP, plain accumulation otherwise) over this rank's micro-batches."""
    schedule = get_forward_backward_func()
    return schedule(forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks,
                    num_microbatches=num_microbatches, seq_length=seq_length,
                    micro_batch_size=micro_batch_size, forward_only=forward_only)


def train_step(chunks: list[DistributedDataParallel], optimizer: MegatronOptimizer, forward_step: Callable,
               microbatches: list, seq_length: int, micro_batch_size: int) -> dict[str, float]:
    """zero grads -> forward/backward over the micro-batches -> optimizer step; returns reduced metrics."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reset_moe_metrics()
    losses = forward_backward(chunks, forward_step, microbatches, len(microbatches), seq_length, micro_batch_size)
    ok, grad_norm, _ = optimizer.step()
    metrics = reduce_logged(losses)
    metrics.update(moe_metrics(chunks[0].config, len(microbatches)))
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["update_ok"] = float(bool(ok))
    return metrics
