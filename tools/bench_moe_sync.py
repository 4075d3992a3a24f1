"""MoE weight sync benchmark: the transfer stream (weights.export.stream_hf_weights) of a ~1 GB bf16 Qwen3-MoE
model at EP2 (each of 2 gloo ranks holds half the experts, which travel to rank 0 bucket by bucket) side by side
with a dense Qwen3 model of the same bytes at TP2 (half of each matrix travels), each also through the shared-memory
mirror (weights.shared_mirror: every rank writes its own shards, experts included, in place), and a plain copy.

    .venv/bin/torchrun --nproc-per-node 2 tools/bench_moe_sync.py [--layers 8] [--repeats 2]

Printed (rank 0): GB of HF tensors per sync, seconds (best of --repeats), GB/s and the ratio to the copy.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from bench_io import parse_args, write_json


def _sync_seconds(stream: Callable[[], Iterable], repeats: int) -> tuple[float, int]:
    """Best wall time of one full sync on rank 0 (every rank iterates) and the bytes it yielded."""
    best, total = float("inf"), 0
    for _ in range(repeats):
        dist.barrier()
        start, total = time.perf_counter(), 0
        for bucket in stream():
            total += sum(t.numel() * t.element_size() for _, t in bucket)
        dist.barrier()
        best = min(best, time.perf_counter() - start)
    return best, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=512)
    args = parse_args(parser, smoke={"layers": 1, "hidden": 512, "experts": 4, "repeats": 1, "bucket_mb": 4})

    from megatron.core import parallel_state

    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import stream_hf_weights
    from rntp_megatron.weights.shared_mirror import shared_mirror

    h, e = args.hidden, args.experts
    common = {"num_layers": args.layers, "hidden_size": h, "num_attention_heads": h // 128, "num_query_groups": 4,
              "kv_channels": 128, "qk_layernorm": True, "vocab_size": 32000, "params_dtype": "bfloat16",
              "transformer_impl": "local", "max_position_embeddings": 2048}
    layouts = {  # the same bytes: E experts of width h against one MLP of width E * h
        "MoE EP2": ({"family": "qwen3_moe", "ffn_hidden_size": h, "num_moe_experts": e, "moe_router_topk": 2,
                     "moe_ffn_hidden_size": h}, {"expert_model_parallel_size": 2}),
        "dense TP2": ({"family": "qwen3", "ffn_hidden_size": e * h}, {"tensor_model_parallel_size": 2}),
    }
    rows = []
    for name, (model_fields, parallel) in layouts.items():
        cfg = build_config({"model": {**common, **model_fields}, "parallel": parallel})
        init_distributed(cfg.parallel, seed=1)
        model = build_model(cfg.model, cfg.parallel)
        bucket_bytes = args.bucket_mb << 20
        seconds, nbytes = _sync_seconds(lambda: stream_hf_weights(model, cfg.model, bucket_bytes), args.repeats)
        rows.append((name, nbytes, seconds))
        mirror = shared_mirror(model, cfg.model, bucket_bytes)
        if mirror is not None:
            seconds, _ = _sync_seconds(mirror.stream, args.repeats)
            rows.append((f"{name} mirror", nbytes, seconds))
        del model, mirror
        parallel_state.destroy_model_parallel()  # the process group stays for the next layout
    if dist.get_rank() == 0:
        src = torch.empty(rows[0][1], dtype=torch.uint8)
        start = time.perf_counter()
        src.clone()
        copy = time.perf_counter() - start
        print(f"{'layout':<17} {'GB':>6} {'seconds':>8} {'GB/s':>6} {'x copy':>7}")
        rows.append(("memcpy", rows[0][1], copy))
        for name, nbytes, seconds in rows:
            print(f"{name:<17} {nbytes / 1e9:>6.2f} {seconds:>8.3f} {nbytes / 1e9 / seconds:>6.2f} {seconds / copy:>7.1f}")
        write_json(args.json, "bench_moe_sync", [
            {"name": name, "gigabytes": nbytes / 1e9, "seconds": seconds, "gb_per_s": nbytes / 1e9 / seconds,
             "x_copy": seconds / copy} for name, nbytes, seconds in rows], args)
    destroy_distributed()


if __name__ == "__main__":
    main()
