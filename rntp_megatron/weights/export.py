"""Megatron shards -> full HF-named tensors, streamed in byte-bounded buckets on global rank 0.

    for bucket in stream_hf_weights(model, cfg.model):    # EVERY rank of the world runs this loop
        engine_or_writer.consume(bucket)                  # the body runs on global rank 0 only

Per pipeline stage, in stage order: each parameter's TP shards are gathered to the stage's TP rank 0
(`dist.gather` over the TP group), merged and converted by model/hf_mapping into HF tensors, and packed
into buckets; a stage other than the first sends each bucket as one flat byte buffer to stage 0 over the
pipeline group (`broadcast` of the metadata, then of the buffer). Data-parallel and context-parallel
replicas other than the first hold copies and take no part. The same stream feeds SGLang and HF checkpoints.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from rntp_megatron.config import ModelConfig
from rntp_megatron.model import hf_mapping
from rntp_megatron.weights.buckets import DEFAULT_BUCKET_BYTES, NamedTensors, bucketed, flatten, unflatten


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def global_named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's (name with global layer number, local shard) pairs; megatron numbers layers per stage."""
    gpt = unwrap(model)
    offset = gpt.decoder.layers[0].layer_number - 1 if hasattr(gpt, "decoder") and len(gpt.decoder.layers) else 0
    for name, param in gpt.named_parameters():
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            name = f"decoder.layers.{int(index) + offset}.{rest}"
        yield name, param


def _stage_hf_tensors(model: torch.nn.Module, cfg: ModelConfig, dtype: Optional[torch.dtype],
                      tp_group: dist.ProcessGroup) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, full tensor) of this stage, on its TP rank 0 (other TP ranks only join the gathers)."""
    tp_size = dist.get_world_size(tp_group)
    tp_rank = dist.get_rank(tp_group)
    tp_root = dist.get_global_rank(tp_group, 0)
    for name, param in global_named_parameters(model):
        shard = param.detach()
        if tp_size > 1 and hf_mapping.tp_partition_dim(name) is not None:
            shard = shard.contiguous()
            shards = [torch.empty_like(shard) for _ in range(tp_size)] if tp_rank == 0 else None
            dist.gather(shard, shards, dst=tp_root, group=tp_group)
            if tp_rank != 0:
                continue
            full = hf_mapping.merge_tp_shards(name, shards)
        elif tp_rank != 0:
            continue
        else:
            full = shard
        for hf_name, t in hf_mapping.to_hf(name, full, cfg):
            yield hf_name, (t.to(dtype) if dtype is not None else t).contiguous()


def stream_hf_weights(model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      dtype: Optional[torch.dtype] = None) -> Iterator[NamedTensors]:
    """Buckets [(hf_name, full tensor)] of <= bucket_bytes, yielded on global rank 0; all ranks must iterate."""
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
        return
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank, pp_size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    tp_rank = dist.get_rank(tp_group)
    on_dst = dist.get_rank() == 0
    if on_dst and (pp_rank, tp_rank) != (0, 0):
        raise RuntimeError(f"global rank 0 must be pipeline stage 0, TP rank 0; it is PP {pp_rank}, TP {tp_rank}")
    for stage in range(pp_size):
        src = dist.get_global_rank(pp_group, stage)
        if stage == pp_rank:
            for bucket in bucketed(_stage_hf_tensors(model, cfg, dtype, tp_group), bucket_bytes):
                if stage == 0:
                    yield bucket
                else:
                    flat, metas = flatten(bucket)
                    dist.broadcast_object_list([metas], src=src, group=pp_group)
                    dist.broadcast(flat, src=src, group=pp_group)
            if stage != 0 and tp_rank == 0:
                dist.broadcast_object_list([None], src=src, group=pp_group)  # end of this stage's buckets
        elif stage != 0 and tp_rank == 0:  # stage 0's tensors are already on the destination
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=src, group=pp_group)
                if box[0] is None:
                    break
                flat = torch.empty(sum(m.nbytes for m in box[0]), dtype=torch.uint8)
                dist.broadcast(flat, src=src, group=pp_group)
                if on_dst:
                    yield unflatten(flat, box[0])


def gather_hf_state_dict(model: torch.nn.Module, cfg: ModelConfig,
                         dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The whole model as {hf_name: full tensor} on global rank 0 ({} elsewhere); all ranks must call it."""
    return {name: t.clone() for bucket in stream_hf_weights(model, cfg, dtype=dtype) for name, t in bucket}
