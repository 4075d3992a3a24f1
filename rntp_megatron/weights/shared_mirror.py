"""The model's full HF tensors in one host's shared memory, written in place by every rank that holds a shard.

When the writers -- the model-parallel group (TP x PP) of data-parallel replica 0 for the dense parameters, and
the expert ranks (ETP x EP x PP) of expert-data-parallel replica 0 for the experts of a mixture-of-experts model --
run on one host, no shard has to travel between processes: each expert is written by the one EP rank that holds
it, and global rank 0 allocates the buckets' flat buffers once in shared memory (torch's
file_system strategy, so an SGLang server on this host maps them by name as well), the other ranks map the same
buffers, and at each sync every rank copies its own shards straight to their places in the HF tensors
(hf_mapping.shard_to_hf: q/k/v split, gate/up halves, TP blocks, vocabulary padding dropped). A sync is one
pass over the model's bytes shared by all ranks plus one (asynchronous) barrier per bucket, against
weights/export's TP transfer, merge, pack and PP transfer. It is the CPU form of what CUDA IPC handles do for
colocated GPUs.

    mirror = shared_mirror(model, cfg.model, bucket_bytes)    # collective, once; None off one host / on GPU
    for bucket in mirror.stream():                            # collective over the writers, every sync
        engine.consume(bucket)                                # global rank 0 only

A bucket's tensors are views of the mirror: they stay valid until the next stream() rewrites them, and the
next stream() waits (first barrier) until rank 0 asks for it, i.e. until its consumer of the last sync is done.
Every rank writes its pieces of all buckets without waiting for the others (a bucket's barrier is asynchronous),
and rank 0 yields bucket i once its barrier completes, so the consumer handles bucket i while later buckets
are still being written.
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing
from megatron.core import parallel_state
from multiprocessing.reduction import ForkingPickler

from rntp_megatron.config import ModelConfig
from rntp_megatron.model import hf_mapping
from rntp_megatron.weights.buckets import DEFAULT_BUCKET_BYTES, NamedTensors, TensorMeta, bucketed, layout, unflatten
from rntp_megatron.weights.export import global_named_parameters, is_expert


def _writes_dense() -> bool:
    """Whether this rank writes dense shards: it is in data-parallel replica 0."""
    return parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0


def _writes_experts(cfg: ModelConfig) -> bool:
    """Whether this rank writes expert shards: a mixture-of-experts model's expert-data-parallel replica 0."""
    return cfg.num_moe_experts is not None and parallel_state.get_expert_data_parallel_rank() == 0


def _split(name: str) -> tuple[int, int]:
    """(size, rank) of the tensor-parallel group that splits this parameter: expert TP for experts, else TP."""
    if is_expert(name):
        return (parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


class SharedHFMirror:
    """Shared-memory HF buckets of the model that each writer (dense: data-parallel replica 0; experts:
    expert-data-parallel replica 0) fills with its own shards; `group` holds exactly the writers."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, group: dist.ProcessGroup,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.cfg, self.group = model, cfg, group
        self.dense, self.experts = _writes_dense(), _writes_experts(cfg)
        self.active = self.dense or self.experts
        if not self.active:  # other replicas hold copies of the writers' shards
            return
        self.is_dst = dist.get_rank() == 0
        # a parameter is listed once: by TP rank 0 of its dense writers, by expert-TP rank 0 of its EP rank
        listed = [(name, tuple(p.shape), p.dtype) for name, p in global_named_parameters(model)
                  if (self.experts if is_expert(name) else self.dense) and _split(name)[1] == 0]
        mine = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank(),
                listed)
        ranks: list = [None] * dist.get_world_size(group)  # shared_mirror() made sure they share one host
        dist.all_gather_object(ranks, mine, group=group)
        hf_tensors = self._hf_meta(ranks)

        def sent_bytes(item: tuple[str, torch.Tensor]) -> int:  # a tensor's bytes as it goes out (cast to dtype)
            return item[1].numel() * (dtype or item[1].dtype).itemsize

        groups = bucketed(hf_tensors, bucket_bytes, size=sent_bytes)
        self.metas: list[list[TensorMeta]] = [layout(members, dtype) for members in groups]
        for m in (m for metas in self.metas for m in metas):  # a shard is written through a typed view
            if m.offset % m.dtype.itemsize:
                raise ValueError(f"{m.name} ({m.dtype}) would start at byte {m.offset} of its bucket, not aligned "
                                 "to its element size: give all parameters one dtype, or pass dtype")
        self.place = {m.name: (i, m) for i, metas in enumerate(self.metas) for m in metas}
        self.buffers = self._shared_buffers()

    def _hf_meta(self, ranks: list) -> NamedTensors:
        """Every HF tensor of the model as a meta tensor of its full shape, stage by stage (dense parameters, then
        experts by EP rank), in parameter order."""
        hf: NamedTensors = []
        for _, _, params in sorted(ranks, key=lambda r: (r[0], r[1])):
            for name, shape, dtype in sorted(params, key=lambda p: is_expert(p[0])):
                full = list(shape)
                dim = hf_mapping.tp_partition_dim(name)
                if dim is not None:
                    full[dim] *= _split(name)[0]
                hf += hf_mapping.to_hf(name, torch.empty(full, dtype=dtype, device="meta"), self.cfg)
        return hf

    def _shared_buffers(self) -> list[torch.Tensor]:
        """One uint8 buffer per bucket in shared memory: allocated on global rank 0, mapped by the others."""
        torch.multiprocessing.set_sharing_strategy("file_system")  # named segments: mappable by any process
        handles = [None]
        if self.is_dst:
            buffers = [torch.empty(sum(m.nbytes for m in metas), dtype=torch.uint8, device="cpu").share_memory_()
                       for metas in self.metas]
            handles = [bytes(ForkingPickler.dumps(buffers))]
        dist.broadcast_object_list(handles, src=0, group=self.group)
        return buffers if self.is_dst else pickle.loads(handles[0])

    def _writes(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per bucket, (place in the mirror, this rank's piece of a shard) pairs, from the parameters as they are
        now (built each sync, so a parameter whose storage was replaced is still read from where it lives)."""
        writes: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.metas]
        for name, param in global_named_parameters(self.model):
            if not (self.experts if is_expert(name) else self.dense):
                continue
            for piece in hf_mapping.shard_to_hf(name, param.detach(), self.cfg, *_split(name)):
                index, meta = self.place[piece.name]
                target = unflatten(self.buffers[index], [meta])[0][1]
                if piece.dim is not None:
                    target = target.narrow(piece.dim, piece.start, piece.piece.shape[piece.dim])
                writes[index].append((target, piece.piece))
        return writes

    def stream(self) -> Iterator[NamedTensors]:
        """The model's HF buckets (views of the mirror) on global rank 0; every rank must iterate."""
        if not self.active:
            return
        writes = self._writes()
        dist.barrier(group=self.group)  # rank 0's consumer is done with the previous sync's buckets
        written = []  # bucket i's barrier completes once every rank has written its pieces of bucket i
        for pieces in writes:
            for target, piece in pieces:
                target.copy_(piece)
            written.append(dist.barrier(group=self.group, async_op=True))  # a rank goes on with the next bucket
        for index, work in enumerate(written):
            work.wait()
            if self.is_dst:
                yield unflatten(self.buffers[index], self.metas[index])


def shared_mirror(model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  dtype: Optional[torch.dtype] = None) -> Optional[SharedHFMirror]:
    """A SharedHFMirror when the writers' shards are CPU tensors on one host whose /dev/shm can hold them, else
    None (GPU shards travel over NCCL / CUDA IPC instead; a full tmpfs would kill a writer with SIGBUS);
    a collective over every rank."""
    writer = _writes_dense() or _writes_experts(cfg)
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    mine = (writer, socket.gethostname(), next(model.parameters()).device.type,
            sum(p.numel() * p.element_size() for p in model.parameters()), shm.f_bavail * shm.f_frsize if shm else 0)
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)  # every rank decides from the same list
    writers = [r for r in ranks if r[0]]
    if len({(host, dev) for _, host, dev, _, _ in writers}) != 1 or writers[0][2] != "cpu":
        return None
    needed, free = sum(r[3] for r in writers), min(r[4] for r in writers)  # replicated norms counted per rank
    if needed > free:
        warnings.warn(f"weight sync without the shared-memory mirror: it needs up to {needed} bytes, /dev/shm has "
                      f"{free} free; shards go through the transfer stream instead")
        return None
    group = dist.new_group([rank for rank, r in enumerate(ranks) if r[0]], backend="gloo")  # every rank calls it
    return SharedHFMirror(model, cfg, group, bucket_bytes, dtype)
