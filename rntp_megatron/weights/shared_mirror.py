"""The model's full HF tensors in one host's shared memory, written in place by every model-parallel rank.

When every rank of the model-parallel group (TP x PP of data-parallel replica 0) runs on one host, no shard has
to travel between processes: global rank 0 allocates the buckets' flat buffers once in shared memory (torch's
file_system strategy, so an SGLang server on this host maps them by name as well), the other ranks map the same
buffers, and at each sync every rank copies its own shards straight to their places in the HF tensors
(hf_mapping.shard_to_hf: q/k/v split, gate/up halves, TP blocks, vocabulary padding dropped). A sync is one
pass over the model's bytes shared by all ranks plus one (asynchronous) barrier per bucket, against
weights/export's TP transfer, merge, pack and PP transfer. It is the CPU form of what CUDA IPC handles do for
colocated GPUs.

    mirror = shared_mirror(model, cfg.model, bucket_bytes)    # collective, once; None off one host / on GPU
    for bucket in mirror.stream():                            # collective, every sync
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
from rntp_megatron.weights.export import global_named_parameters


class SharedHFMirror:
    """Shared-memory HF buckets of the model that each model-parallel rank fills with its own shards."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.cfg = model, cfg
        self.active = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
        if not self.active:  # other data-parallel replicas hold copies of replica 0's shards
            return
        self.group = parallel_state.get_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.is_dst = dist.get_rank() == 0
        mine = (parallel_state.get_pipeline_model_parallel_rank(), self.tp_rank, socket.gethostname(),
                [(name, tuple(p.shape), p.dtype) for name, p in global_named_parameters(model)])
        ranks: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(ranks, mine, group=self.group)
        hosts = sorted({host for _, _, host, _ in ranks})
        if len(hosts) > 1:
            raise ValueError(f"SharedHFMirror needs the model-parallel group on one host; its ranks run on {hosts}")
        hf_tensors = self._hf_meta(ranks)

        def sent_bytes(item: tuple[str, torch.Tensor]) -> int:  # a tensor's bytes as it goes out (cast to dtype)
            return item[1].numel() * (dtype or item[1].dtype).itemsize

        groups = bucketed(hf_tensors, bucket_bytes, size=sent_bytes)
        self.metas: list[list[TensorMeta]] = [layout(group, dtype) for group in groups]
        for m in (m for metas in self.metas for m in metas):  # a shard is written through a typed view
            if m.offset % m.dtype.itemsize:
                raise ValueError(f"{m.name} ({m.dtype}) would start at byte {m.offset} of its bucket, not aligned "
                                 "to its element size: give all parameters one dtype, or pass dtype")
        self.place = {m.name: (i, m) for i, metas in enumerate(self.metas) for m in metas}
        self.buffers = self._shared_buffers()

    def _hf_meta(self, ranks: list) -> NamedTensors:
        """Every HF tensor of the model as a meta tensor of its full shape, stage by stage in parameter order."""
        hf: NamedTensors = []
        for _, tp_rank, _, params in sorted(ranks, key=lambda r: (r[0], r[1])):
            if tp_rank != 0:  # TP rank 0 of each stage lists the stage's parameters
                continue
            for name, shape, dtype in params:
                full = list(shape)
                dim = hf_mapping.tp_partition_dim(name)
                if dim is not None:
                    full[dim] *= self.tp_size
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
            for piece in hf_mapping.shard_to_hf(name, param.detach(), self.cfg, self.tp_size, self.tp_rank):
                index, meta = self.place[piece.name]
                target = unflatten(self.buffers[index], [meta])[0][1]
                if piece.dim is not None:
                    target = target.narrow(piece.dim, piece.start, piece.piece.shape[piece.dim])
                writes[index].append((target, piece.piece))
        return writes

    def stream(self) -> Iterator[NamedTensors]:
        """The model's HF buckets (views of the mirror) on global rank 0; every model-parallel rank must iterate."""
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
    """A SharedHFMirror when the model-parallel group's shards are CPU tensors on one host whose /dev/shm can hold
    them, else None (GPU shards travel over NCCL / CUDA IPC instead; a full tmpfs would kill a writer with
    SIGBUS); a collective over the model-parallel group of every replica."""
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        # Experts of EP ranks > 0 live outside data-parallel replica 0, whose model-parallel group the mirror
        # spans: expert-parallel models sync through the transfer stream (weights/export), which gathers them.
        return None
    group = parallel_state.get_model_parallel_group()
    device = next(model.parameters()).device.type
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    mine = (socket.gethostname(), device, sum(p.numel() * p.element_size() for p in model.parameters()),
            shm.f_bavail * shm.f_frsize if shm else 0)
    ranks: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, mine, group=group)  # every rank decides from the same list
    if len({(host, dev) for host, dev, _, _ in ranks}) != 1 or device != "cpu":
        return None
    needed, free = sum(r[2] for r in ranks), min(r[3] for r in ranks)  # replicated norms counted per rank: a bound
    if needed > free:
        warnings.warn(f"weight sync without the shared-memory mirror: it needs up to {needed} bytes, /dev/shm has "
                      f"{free} free; shards go through the transfer stream instead")
        return None
    return SharedHFMirror(model, cfg, bucket_bytes, dtype)
