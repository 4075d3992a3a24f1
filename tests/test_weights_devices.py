"""weights/buckets: where bucket buffers live (the GPU for NCCL groups, the CPU for gloo), checked on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rntp_megatron.weights.buckets import backend_device, flatten, group_device, packed, unflatten


@pytest.mark.parametrize("backend, kind", [("nccl", "cuda"), ("NCCL", "cuda"), ("cpu:gloo,cuda:nccl", "cuda"),
                                           ("gloo", "cpu"), ("mpi", "cpu")])
def test_backend_device_is_the_gpu_for_nccl_and_the_cpu_otherwise(backend, kind):
    assert backend_device(backend).type == kind


def test_group_device_of_a_gloo_group_is_the_cpu():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert group_device() == torch.device("cpu")
        assert group_device(dist.new_group([0], backend="gloo")) == torch.device("cpu")
    finally:
        dist.destroy_process_group()


def test_buffers_are_made_on_the_named_device_never_the_default_one():
    bucket = [("a", torch.arange(6, dtype=torch.float32).view(2, 3)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    with torch.device("meta"):  # a buffer made without naming its device would land here
        flat, metas = flatten(bucket)
        views = packed(bucket)
    assert flat.device.type == "cpu" and all(t.device.type == "cpu" for _, t in views)
    for (_, want), (_, got) in zip(bucket, unflatten(flat, metas)):
        assert torch.equal(want, got)
    moved, _ = flatten(views, device=torch.device("meta"))  # another device: a copy there, not the shared buffer
    assert moved.device.type == "meta" and moved.numel() == flat.numel()
    same, _ = flatten(views, device=torch.device("cpu"))  # the packed bucket's own buffer, no copy
    assert same.data_ptr() == views[0][1].data_ptr()
