"""Megatron shards -> full HF-named tensors, streamed in byte-bounded buckets on global rank 0.

    for bucket in stream_hf_weights(model, cfg.model):    # EVERY rank of the world runs this loop
        engine_or_writer.consume(bucket)                  # the body runs on global rank 0 only

Per pipeline stage, in stage order, the stage's parameters go in groups of at most bucket_bytes (full,
TP-merged bytes). For each group every TP rank packs its TP shards into one contiguous buffer and sends it
once to the stage's TP rank 0 (a gather made of point-to-point transfers), which merges and converts
them through model/hf_mapping into HF tensors and packs those into one flat buffer per bucket. A stage other
than the first sends each bucket's flat buffer to stage 0 in one broadcast over the pipeline group (after
its layout). So a sync costs one TP transfer per rank and group and one PP transfer per bucket, not one
per parameter. Data-parallel and context-parallel replicas other than the first hold copies and take no part.
Experts (mixture of experts) live on one EP rank each: after the stage's dense buckets, each EP rank of
expert-data-parallel replica 0 gathers its experts over expert TP and sends their buckets, one at a time, to
EP rank 0 (the stage's first rank), which passes them on like its own.

Each yielded bucket's tensors are views of one fresh buffer that the consumer owns (buckets.flatten returns
that buffer without a copy). The same stream feeds SGLang and HF checkpoints.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from rntp_megatron.config import ModelConfig
from rntp_megatron.model import hf_mapping
from rntp_megatron.weights.buckets import (DEFAULT_BUCKET_BYTES, NamedTensors, bucketed, flatten, group_device,
                                           nbytes, packed, unflatten)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


# An EP rank's local expert j: SequentialMLP's `local_experts.j.linear_fcK.weight`, TEGroupedMLP's
# `linear_fcK.weightj`.
_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight"
                              r"|(linear_fc[12])\.weight(\d+))$")


def global_named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's (name with global layer number, local shard) pairs; megatron numbers layers per stage, and an
    EP rank's local expert j is global expert ep_rank * experts_per_rank + j, named `mlp.experts.E.linear_fcK.weight`
    (model/hf_mapping's form) whichever expert module holds it."""
    gpt = unwrap(model)
    offset = gpt.decoder.layers[0].layer_number - 1 if hasattr(gpt, "decoder") and len(gpt.decoder.layers) else 0
    experts = getattr(getattr(gpt, "config", None), "num_moe_experts", None)
    per_rank = experts // gpt.config.expert_model_parallel_size if experts else 0
    first_expert = parallel_state.get_expert_model_parallel_rank() * per_rank if per_rank else 0
    for name, param in gpt.named_parameters():
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            local = _LOCAL_EXPERT_RE.match(rest)
            if local:
                j, fc = (local.group(1), local.group(2)) if local.group(1) else (local.group(4), local.group(3))
                rest = f"mlp.experts.{first_expert + int(j)}.{fc}.weight"
            name = f"decoder.layers.{int(index) + offset}.{rest}"
        yield name, param


def is_expert(name: str) -> bool:
    """Whether a (global) parameter name is an expert's: it lives on one EP rank, not on every DP rank."""
    return ".mlp.experts." in name


def _gathered_shards(group: NamedTensors, tp_group: dist.ProcessGroup) -> Optional[dict[str, list[torch.Tensor]]]:
    """{name: its tp shards} for the group's TP-partitioned parameters, on TP rank 0 (None on the others):
    each rank packs its shards into one buffer[B] and sends it once; TP rank 0 receives them into [tp-1, B]."""
    tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    partitioned = [(name, p.detach()) for name, p in group if hf_mapping.tp_partition_dim(name) is not None]
    if not partitioned:
        return {} if tp_rank == 0 else None
    local, metas = flatten(partitioned)
    if tp_rank != 0:
        dist.send(local, dst=dist.get_global_rank(tp_group, 0), group=tp_group)
        return None
    others = torch.empty(tp_size - 1, local.numel(), dtype=torch.uint8, device=group_device(tp_group))
    # Point-to-point, not dist.gather: gloo's gather moved 0.15 GB/s here against 1.7 GB/s for send/recv.
    receives = [dist.irecv(others[r - 1], src=dist.get_global_rank(tp_group, r), group=tp_group)
                for r in range(1, tp_size)]
    for work in receives:
        work.wait()
    per_rank = [unflatten(buffer, metas) for buffer in (local, *others)]
    return {name: [shards[i][1] for shards in per_rank] for i, (name, _) in enumerate(partitioned)}


def _hf_buckets(params: NamedTensors, cfg: ModelConfig, dtype: Optional[torch.dtype], bucket_bytes: int,
                tp_group: dist.ProcessGroup) -> Iterator[NamedTensors]:
    """HF buckets (views of one flat buffer each) of these parameters on the group's TP rank 0; other TP ranks only
    join the gathers. Parameters are grouped by full size, so a group's HF tensors make one bucket unless one
    parameter alone exceeds bucket_bytes (its HF tensors are then bucketed apart, a larger one alone)."""
    tp_size = dist.get_world_size(tp_group)

    def full_bytes(item: tuple[str, torch.Tensor]) -> int:
        return nbytes(item[1]) * (tp_size if hf_mapping.tp_partition_dim(item[0]) is not None else 1)

    for group in bucketed(params, bucket_bytes, size=full_bytes):
        shards = _gathered_shards(group, tp_group) if tp_size > 1 else {}
        if shards is None:
            continue
        hf = []
        for name, param in group:
            full = hf_mapping.merge_tp_shards(name, shards[name]) if name in shards else param.detach()
            hf += hf_mapping.to_hf(name, full, cfg)
        for bucket in bucketed(hf, bucket_bytes):
            yield packed(bucket, dtype)


def _expert_buckets(params: NamedTensors, cfg: ModelConfig, dtype: Optional[torch.dtype], bucket_bytes: int
                    ) -> Iterator[NamedTensors]:
    """This stage's expert HF buckets on EP rank 0 (of expert-TP rank 0 and expert-DP rank 0): its own experts',
    then each other EP rank's, sent bucket by bucket (layout, then one flat buffer), so no rank ever holds more
    than its own experts and one bucket of another's."""
    etp_group = parallel_state.get_expert_tensor_parallel_group()
    local = _hf_buckets(params, cfg, dtype, bucket_bytes, etp_group)
    if dist.get_rank(etp_group) != 0:
        for _ in local:  # only joins the expert-TP gathers
            pass
        return
    ep_group = parallel_state.get_expert_model_parallel_group()
    ep_rank, ep_size = dist.get_rank(ep_group), dist.get_world_size(ep_group)
    where = group_device(ep_group)  # transfers on the group's device (the GPU under NCCL)
    if ep_rank != 0:
        dst = dist.get_global_rank(ep_group, 0)
        for bucket in local:
            flat, metas = flatten(bucket)  # the bucket's own buffer: no copy
            dist.send_object_list([metas], dst=dst, group=ep_group)
            dist.send(flat.to(where), dst=dst, group=ep_group)
        dist.send_object_list([None], dst=dst, group=ep_group)  # end of this rank's experts
        return
    yield from local
    for src in (dist.get_global_rank(ep_group, r) for r in range(1, ep_size)):
        while True:
            box = [None]
            dist.recv_object_list(box, src=src, group=ep_group)
            if box[0] is None:
                break
            flat = torch.empty(sum(m.nbytes for m in box[0]), dtype=torch.uint8, device=where)
            dist.recv(flat, src=src, group=ep_group)
            yield unflatten(flat.cpu(), box[0])


def _stage_buckets(model: torch.nn.Module, cfg: ModelConfig, dtype: Optional[torch.dtype], bucket_bytes: int,
                   dense: bool, experts: bool) -> Iterator[NamedTensors]:
    """This stage's HF buckets on its first rank (TP, DP and EP rank 0): the dense parameters from data-parallel
    replica 0 (dense), then the experts from expert-data-parallel replica 0 (experts); other ranks take part."""
    params = list(global_named_parameters(model))
    if dense:
        yield from _hf_buckets([p for p in params if not is_expert(p[0])], cfg, dtype, bucket_bytes,
                               parallel_state.get_tensor_model_parallel_group())
    if experts:
        yield from _expert_buckets([p for p in params if is_expert(p[0])], cfg, dtype, bucket_bytes)


def stream_hf_weights(model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      dtype: Optional[torch.dtype] = None) -> Iterator[NamedTensors]:
    """Buckets [(hf_name, full tensor)] of <= bucket_bytes, yielded on global rank 0; all ranks must iterate."""
    dense = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    experts = cfg.num_moe_experts is not None and parallel_state.get_expert_data_parallel_rank() == 0
    if not dense and not experts:
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank, pp_size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    on_dst = dist.get_rank() == 0
    first = dense and tp_rank == 0  # the stage's first rank: its buckets gather there
    if on_dst and (pp_rank, tp_rank) != (0, 0):
        raise RuntimeError(f"global rank 0 must be pipeline stage 0, TP rank 0; it is PP {pp_rank}, TP {tp_rank}")
    for stage in range(pp_size):
        src = dist.get_global_rank(pp_group, stage)
        if stage == pp_rank:
            for bucket in _stage_buckets(model, cfg, dtype, bucket_bytes, dense, experts):
                if stage == 0:
                    yield bucket
                else:
                    flat, metas = flatten(bucket)  # the bucket's own buffer: no copy
                    dist.broadcast_object_list([metas], src=src, group=pp_group)
                    dist.broadcast(flat, src=src, group=pp_group)
            if stage != 0 and first:
                dist.broadcast_object_list([None], src=src, group=pp_group)  # end of this stage's buckets
        elif stage != 0 and first:  # stage 0's tensors are already on the destination
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=src, group=pp_group)
                if box[0] is None:
                    break
                size = sum(m.nbytes for m in box[0])
                flat = torch.empty(size, dtype=torch.uint8, device=group_device(pp_group))
                dist.broadcast(flat, src=src, group=pp_group)
                if on_dst:
                    yield unflatten(flat, box[0])


def gather_hf_state_dict(model: torch.nn.Module, cfg: ModelConfig,
                         dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The whole model as {hf_name: full tensor} on global rank 0 ({} elsewhere); all ranks must call it.
    The tensors are views of the stream's fresh bucket buffers, so they share no memory with the model."""
    return {name: t for bucket in stream_hf_weights(model, cfg, dtype=dtype) for name, t in bucket}
