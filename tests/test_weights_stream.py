"""weights/buckets, weights/export and weights/hf_checkpoint: packed buckets flatten without a copy, shards are
written straight from the flat buffer, and a TP2 x PP2 export moves each group of parameters with one send
per TP rank (not one transfer per parameter) while giving the same tensors as gathering each parameter alone."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.config import build_config
from rntp_megatron.runtime.spawn import run_ranks
from rntp_megatron.weights.buckets import flatten, nbytes, packed, unflatten


def test_packed_bucket_flattens_to_its_own_buffer_and_others_are_copied():
    named = [("a", torch.randn(3, 4)), ("t", torch.randn(4, 6).t()), ("b", torch.randn(5).bfloat16())]
    bucket = packed(named)
    for (n0, t0), (n1, t1) in zip(named, bucket):
        assert n0 == n1 and t1.dtype == t0.dtype and torch.equal(t0, t1) and t1.is_contiguous()
    flat, metas = flatten(bucket)
    assert flat.data_ptr() == bucket[0][1].data_ptr() and flat.numel() == sum(nbytes(t) for _, t in named)
    tail, _ = flatten(bucket[1:])  # a run of the buffer that starts inside it
    assert tail.data_ptr() == bucket[1][1].data_ptr()
    out_of_order, _ = flatten([bucket[1], bucket[0]])
    assert out_of_order.data_ptr() not in (t.data_ptr() for _, t in bucket)
    cast, cast_metas = flatten(bucket, torch.float64)  # a cast cannot reuse the buffer
    assert cast.numel() == 8 * sum(t.numel() for _, t in named)
    assert all(torch.equal(t.double(), u) for (_, t), (_, u) in zip(named, unflatten(cast, cast_metas)))


def test_written_shard_reads_back_with_safetensors_including_unaligned_offsets(tmp_path):
    from safetensors import safe_open

    from rntp_megatron.weights.hf_checkpoint import write_safetensors

    named = [("odd", torch.arange(3, dtype=torch.bfloat16)), ("f", torch.randn(2, 3)),
             ("i", torch.arange(4, dtype=torch.int64)), ("b", torch.tensor([True, False]))]
    flat, metas = flatten(named)
    assert metas[1].offset % 4 != 0  # the float32 tensor sits after 6 bytes: not aligned
    write_safetensors(tmp_path / "x.safetensors", flat, metas)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as st:
        assert list(st.keys()) == sorted(n for n, _ in named)
        for name, t in named:
            back = st.get_tensor(name)
            assert back.dtype == t.dtype and torch.equal(back, t), name
    with pytest.raises(ValueError, match="cover 64 bytes but the flat buffer has 63"):
        write_safetensors(tmp_path / "y.safetensors", flat[:-1], metas)


def _export_counts(rank: int, world_size: int, bucket_bytes: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rntp_megatron.model import hf_mapping
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights import export

    cfg = build_config({"model": {"card": "tiny_qwen2", "transformer_impl": "local"},
                        "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}})
    init_distributed(cfg.parallel, seed=3)
    try:
        model = build_model(cfg.model, cfg.parallel)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        # reference: every parameter gathered on its own (all ranks join every call)
        reference = {}
        for name, param in export.global_named_parameters(model):
            full = param.detach()
            if hf_mapping.tp_partition_dim(name) is not None:
                parts = [torch.empty_like(full) for _ in range(2)]
                dist.all_gather(parts, full.contiguous(), group=tp_group)
                full = hf_mapping.merge_tp_shards(name, parts)
            reference.update(hf_mapping.to_hf(name, full, cfg.model))
        local_params = len(list(export.global_named_parameters(model)))
        calls = {"send": 0, "irecv": 0}
        real = {name: getattr(dist, name) for name in calls}

        def counting(name):
            def call(*args, **kwargs):
                calls[name] += 1
                return real[name](*args, **kwargs)
            return call

        for name in calls:
            setattr(export.dist, name, counting(name))
        try:
            buckets = list(export.stream_hf_weights(model, cfg.model, bucket_bytes=bucket_bytes))
        finally:
            for name in calls:
                setattr(export.dist, name, real[name])
        gathered_reference = [None] * world_size
        dist.all_gather_object(gathered_reference, reference)  # rank 0 needs both stages' references
        full_reference = {k: v for part in gathered_reference for k, v in part.items()}
        report = {"tp_transfers": calls["send"] + calls["irecv"], "local_params": local_params}
        if rank == 0:
            got = {n: t for b in buckets for n, t in b}
            report["same_names"] = sorted(got) == sorted(full_reference)
            report["equal"] = all(torch.equal(got[n], full_reference[n]) for n in full_reference)
            report["sizes"] = [sum(nbytes(t) for _, t in b) for b in buckets]
            report["one_buffer"] = all(flatten(b)[0].data_ptr() == b[0][1].data_ptr() for b in buckets)
        else:
            report["buckets"] = len(buckets)
        return report
    finally:
        destroy_distributed()


@pytest.mark.distributed
def test_tp2_pp2_export_gathers_once_per_group_and_matches_per_parameter_gathers():
    reports = run_ranks(_export_counts, 4, (1 << 30,))  # everything of a stage fits one group
    assert reports[0]["same_names"] and reports[0]["equal"], reports[0]
    assert reports[0]["one_buffer"] and len(reports[0]["sizes"]) == 2, reports[0]  # one bucket per stage
    for r in reports:  # one TP transfer per rank and stage (send, or receive on TP rank 0), not one per parameter
        assert r["tp_transfers"] == 1 < r["local_params"], reports
    assert all(r["buckets"] == 0 for r in reports[1:])


def _mirror_syncs(rank: int, world_size: int) -> dict:
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import gather_hf_state_dict
    from rntp_megatron.weights.shared_mirror import shared_mirror

    # vocab 250 is padded to 256 over TP2: the last TP shard of the embedding is trimmed
    cfg = build_config({"model": {"card": "tiny_qwen2", "transformer_impl": "local", "vocab_size": 250},
                        "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}})
    init_distributed(cfg.parallel, seed=5)
    try:
        model = build_model(cfg.model, cfg.parallel)
        mirror = shared_mirror(model, cfg.model, bucket_bytes=64 * 1024)
        report: dict = {"syncs": []}
        for sync in range(2):
            reference = gather_hf_state_dict(model, cfg.model)  # weights/export's transfer-and-merge stream
            buckets = list(mirror.stream())
            if rank == 0:
                got = {n: t.clone() for b in buckets for n, t in b}
                report["syncs"].append({
                    "same_names": sorted(got) == sorted(reference),
                    "equal": all(torch.equal(got[n], reference[n]) for n in reference),
                    "shared": all(t.is_shared() for b in buckets for _, t in b),
                    "sizes": [sum(nbytes(t) for _, t in b) for b in buckets],
                    "buffers": [b[0][1].data_ptr() for b in buckets]})
            else:
                report["syncs"].append(len(buckets))
            with torch.no_grad():  # a training step's worth of change before the next sync
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        return report
    finally:
        destroy_distributed()


@pytest.mark.distributed
def test_shared_mirror_tp2_pp2_equals_the_transfer_stream_and_is_rewritten_in_place():
    reports = run_ranks(_mirror_syncs, 4, ())
    first, second = reports[0]["syncs"]
    for sync in (first, second):
        assert sync["same_names"] and sync["equal"] and sync["shared"], sync
        assert len(sync["sizes"]) > 2 and max(sync["sizes"]) <= 64 * 1024, sync["sizes"]
    assert second["buffers"] == first["buffers"]  # the same shared buffers, rewritten
    assert all(r["syncs"] == [0, 0] for r in reports[1:])  # only global rank 0 receives buckets


def _mirror_or_fallback(rank: int, world_size: int) -> dict:
    import os
    import warnings

    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights import shared_mirror as module

    cfg = build_config({"model": {"card": "tiny_qwen2", "transformer_impl": "local"}})
    init_distributed(cfg.parallel, seed=5)
    try:
        model = build_model(cfg.model, cfg.parallel)
        usable = module.shared_mirror(model, cfg.model) is not None
        real = os.statvfs

        class Full:  # a /dev/shm with 4 KiB free: a fault this machine cannot be made to show
            f_bavail, f_frsize = 1, 4096

        module.os.statvfs = lambda path: Full() if path == "/dev/shm" else real(path)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                full = module.shared_mirror(model, cfg.model)
        finally:
            module.os.statvfs = real
        return {"usable": usable, "full": full, "warned": [str(w.message) for w in caught]}
    finally:
        destroy_distributed()


@pytest.mark.distributed
def test_shared_mirror_falls_back_when_dev_shm_cannot_hold_the_model():
    [report] = run_ranks(_mirror_or_fallback, 1, ())
    assert report["usable"] and report["full"] is None, report
    assert any("/dev/shm has 4096 free" in w for w in report["warned"]), report["warned"]
