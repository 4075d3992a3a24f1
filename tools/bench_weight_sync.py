"""Weight sync benchmark: a ~1 GB bf16 model sharded TP2 x PP2 (4 gloo ranks) pushed into a real SGLang server
through each channel (tensor, distributed, disk), side by side with one plain memcpy of the same bytes.

    .venv/bin/torchrun --nproc-per-node 4 tools/bench_weight_sync.py [--layers 10] [--repeats 2]

Two sources of the HF buckets, every rank taking part: weights.export.stream_hf_weights (TP gather + merge +
PP send to rank 0) and weights.shared_mirror (each rank writes its shards in place into shared memory); rank 0
owns the server and pushes the buckets. Printed: seconds per sync (best of --repeats), GB/s, ratio to the
memcpy, and for each channel x source where its time goes (wait: for the source's next bucket; serialize /
flatten, broadcast, server: the load calls; write: the HF folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--python", default=str(ROOT / "sglang-venv" / "bin" / "python"))
    parser.add_argument("--channels", default="tensor,distributed,disk")
    args = parser.parse_args()

    from rntp_megatron.config import SGLangConfig, build_config
    from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rollout.sglang_engine import SGLangEngine
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.runtime.spawn import free_port
    from rntp_megatron.weights.export import stream_hf_weights
    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint
    from rntp_megatron.weights.shared_mirror import SharedHFMirror

    h = args.hidden
    cfg = build_config({
        "model": {"family": "qwen2", "num_layers": args.layers, "hidden_size": h, "ffn_hidden_size": h * 11 // 4,
                  "num_attention_heads": h // 128, "num_query_groups": 4, "vocab_size": 32000, "qkv_bias": True,
                  "tie_word_embeddings": True, "params_dtype": "bfloat16", "transformer_impl": "local",
                  "max_position_embeddings": 2048},
        "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}})
    init_distributed(cfg.parallel, seed=1)
    rank = dist.get_rank()
    model = build_model(cfg.model, cfg.parallel)
    bucket_bytes = args.bucket_mb << 20
    work = Path(tempfile.mkdtemp(prefix="rntp-bench-sync-")) if rank == 0 else None

    mirror = SharedHFMirror(model, cfg.model, bucket_bytes=bucket_bytes)
    sources = {"transfer": lambda: stream_hf_weights(model, cfg.model, bucket_bytes=bucket_bytes),
               "mirror": mirror.stream}
    stream = sources["transfer"]

    # Each source alone (the consumer does nothing; best of --repeats, like the channels), and the total bytes.
    source_s = {}
    for source, make in sources.items():
        source_s[source] = float("inf")
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            total = sum(t.numel() * t.element_size() for b in make() for _, t in b)
            dist.barrier()
            source_s[source] = min(source_s[source], time.perf_counter() - t0)
    engine = None
    if rank == 0:
        tok = write_byte_tokenizer(work / "tok", eos_id=None)
        save_hf_checkpoint(stream(), work / "init", cfg.model, tokenizer_dir=tok)
        # a 1 GB model needs more than the CPU default --mem-fraction-static 0.05 (the last flag wins)
        server = SGLangConfig(python=args.python, port=free_port(), startup_timeout_s=900,
                              extra_args=["--mem-fraction-static", "0.2"])
        engine = SGLangEngine(server,
                              model_path=work / "init", run_dir=work / "run", dtype="bfloat16",
                              bucket_bytes=bucket_bytes)
        print(f"model {total / 1e9:.2f} GB bf16 (TP2 x PP2), server up in {engine.startup_s:.0f} s", flush=True)
    else:
        list(stream())
    dist.barrier()

    rows = []
    version = 0
    for channel in args.channels.split(","):
        for source, make in sources.items():
            best = None
            for _ in range(args.repeats):
                version += 1
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    engine.cfg.weight_sync = channel
                    waited = {"wait_s": 0.0}
                    parts = engine.update_weights_from_buckets(_waits(make(), waited), version,
                                                               keep_host_copy=False)
                    parts = {**waited, **parts}
                else:
                    list(make())
                dist.barrier()
                took = time.perf_counter() - t0
                if rank == 0 and (best is None or took < best[0]):
                    best = (took, parts)
            if rank == 0:
                rows.append((f"{channel} <- {source}", *best))
    if rank == 0:
        src = torch.randint(0, 255, (total,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        memcpy_s = min(_timed(lambda: dst.copy_(src)) for _ in range(3))
        print("\n| channel | sync s | GB/s | x memcpy | where the time goes (s) |\n|---|---|---|---|---|")
        print(f"| memcpy (1 copy, {total / 1e9:.2f} GB) | {memcpy_s:.3f} | {total / memcpy_s / 1e9:.2f} | 1.0 | |")
        for source, label in (("transfer", "transfer stream alone (TP gather + merge + PP send)"),
                              ("mirror", "shared mirror alone (each rank writes its shards)")):
            took = source_s[source]
            print(f"| {label} | {took:.3f} | {total / took / 1e9:.2f} | {took / memcpy_s:.1f} | |")
        for channel, took, parts in rows:
            detail = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in parts.items())
            print(f"| {channel} | {took:.3f} | {total / took / 1e9:.2f} | {took / memcpy_s:.1f} | {detail} |")
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
    destroy_distributed()


def _waits(buckets, waited: dict[str, float]):
    """The buckets, adding to waited["wait_s"] the time the consumer spends waiting for each one."""
    items = iter(buckets)
    while True:
        t0 = time.perf_counter()
        bucket = next(items, None)
        waited["wait_s"] += time.perf_counter() - t0
        if bucket is None:
            return
        yield bucket


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
