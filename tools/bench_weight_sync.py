"""Weight sync benchmark: a ~1 GB bf16 model sharded TP2 x PP2 (4 gloo ranks) pushed into a real SGLang server
through each channel (tensor, distributed, disk), side by side with one plain memcpy of the same bytes; or, with
--replicas, the same push into fleets of several servers (rollout/sglang/fleet.py).

    .venv/bin/torchrun --nproc-per-node 4 tools/bench_weight_sync.py [--layers 10] [--repeats 2]
    .venv/bin/python tools/bench_weight_sync.py --replicas 1 2 4 [--hidden 1024]

Two sources of the HF buckets, every rank taking part: weights.export.stream_hf_weights (TP gather + merge +
PP send to rank 0) and weights.shared_mirror (each rank writes its shards in place into shared memory); rank 0
owns the server and pushes the buckets. Printed: seconds per sync (best of --repeats), GB/s, ratio to the
memcpy, and for each channel x source where its time goes (wait: for the source's next bucket; serialize /
flatten, broadcast, server: the load calls; write: the HF folder).

--replicas N...: one process (TP1, PP1) holds the model's HF buckets and starts max(N) servers (one thread each),
then pushes through each channel into fleets of the first N of them: seconds per sync (best of --repeats rounds
over every channel and size; in each, one untimed push forms the fleet's weight group) and the ratio to one
replica. Then the rollout throughput
of a fixed batch of greedy generations: 2 replicas of 1 thread each against 1 replica of 2 threads (the same
total cores). Each push's phases include "rest": its seconds outside the load calls and the bucket work, i.e. the
/begin_weight_update and /end_weight_update calls (made to all replicas at once) and the fleet's bookkeeping.

--replicas N... --delta F: the servers run with rollout.sglang.delta_sync (the served classes of
rollout/sglang/plugins); per channel (distributed, disk) and fleet size, after one untimed full push, the seconds
and bytes of a push where every element moved by one bf16 step (dense: every tensor goes whole) and of one where a
fraction F of them did (a small-lr step: deltas); best of --repeats rounds. No rollout throughput in this mode.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench_io import parse_args, write_json

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"layers": 2, "hidden": 512, "repeats": 1, "bucket_mb": 4, "rollout_tokens": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--python", default=str(ROOT / "sglang-venv" / "bin" / "python"))
    parser.add_argument("--channels", default="tensor,distributed,disk",
                        help="comma-separated; 'none': the sources and the memcpy only, no server")
    parser.add_argument("--replicas", type=int, nargs="+", help="fleet sizes: the replica sweep (one process)")
    parser.add_argument("--rollout-tokens", type=int, default=32,
                        help="replica sweep: new tokens per sample of the throughput part; 0 leaves that part out")
    parser.add_argument("--delta", type=float, help="replica sweep with delta sync: fraction of elements changed")
    args = parse_args(parser, SMOKE)
    args.channels = [] if args.channels == "none" else args.channels.split(",")
    if args.delta is not None:
        if not args.replicas or not 0 < args.delta < 1:
            parser.error("--delta F needs --replicas and 0 < F < 1")
        delta_sweep(args)
    elif args.replicas:
        if max(args.replicas) < 2 and args.rollout_tokens:
            parser.error("--replicas needs a fleet size of at least 2 (the throughput compares 2 replicas with 1) "
                         "or --rollout-tokens 0")
        replica_sweep(args)
    else:
        sharded_sync(args)


def _config(args: argparse.Namespace, tp: int, pp: int):
    """The benchmark's qwen2-style bf16 model (--layers, --hidden, vocab 32000, tied) at TP tp x PP pp."""
    from rntp_megatron.config import build_config

    h = args.hidden
    return build_config({
        "model": {"family": "qwen2", "num_layers": args.layers, "hidden_size": h, "ffn_hidden_size": h * 11 // 4,
                  "num_attention_heads": h // 128, "num_query_groups": 4, "vocab_size": 32000, "qkv_bias": True,
                  "tie_word_embeddings": True, "params_dtype": "bfloat16", "transformer_impl": "local",
                  "max_position_embeddings": 2048},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}})


def _server(args: argparse.Namespace, hf_folder: Path, run_dir: Path):
    """An owned SGLang server of the HF folder in bf16 (a 1 GB model needs more than the CPU default
    --mem-fraction-static 0.05; the last flag wins)."""
    from rntp_megatron.config import SGLangConfig
    from rntp_megatron.rollout.sglang.engine import SGLangEngine
    from rntp_megatron.runtime.spawn import free_port

    server = SGLangConfig(python=args.python, port=free_port(), startup_timeout_s=900,
                          extra_args=["--mem-fraction-static", "0.2"], delta_sync=args.delta is not None)
    return SGLangEngine(server, model_path=hf_folder, run_dir=run_dir, dtype="bfloat16",
                        bucket_bytes=args.bucket_mb << 20)


def sharded_sync(args: argparse.Namespace) -> None:
    """The TP2 x PP2 benchmark: each channel x source into one server (module docstring)."""
    from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import stream_hf_weights
    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint
    from rntp_megatron.weights.shared_mirror import shared_mirror

    cfg = _config(args, tp=2, pp=2)
    init_distributed(cfg.parallel, seed=1)
    rank = dist.get_rank()
    model = build_model(cfg.model, cfg.parallel)
    bucket_bytes = args.bucket_mb << 20
    work = Path(tempfile.mkdtemp(prefix="rntp-bench-sync-")) if rank == 0 else None

    mirror = shared_mirror(model, cfg.model, bucket_bytes)
    assert mirror is not None, "the shared-memory mirror needs the 4 ranks' CPU shards on one host with /dev/shm room"
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
    if rank == 0 and args.channels:
        tok = write_byte_tokenizer(work / "tok", eos_id=None)
        save_hf_checkpoint(stream(), work / "init", cfg.model, tokenizer_dir=tok)
        engine = _server(args, work / "init", work / "run")
        print(f"model {total / 1e9:.2f} GB bf16 (TP2 x PP2), server up in {engine.startup_s:.0f} s", flush=True)
    elif args.channels:
        list(stream())
    dist.barrier()

    rows = []
    version = 0
    for channel in args.channels:
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
                if rank == 0:  # broadcast_s overlaps server_s (the load calls receive it); disk's holds begin/end
                    parts["rest_s"] = took - sum(v for k, v in parts.items() if k != "broadcast_s")
                    if best is None or took < best[0]:
                        best = (took, parts)
            if rank == 0:
                rows.append((f"{channel} <- {source}", *best))
    if rank == 0:
        src = torch.randint(0, 255, (total,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        memcpy_s = min(_timed(lambda: dst.copy_(src)) for _ in range(3))
        rows = [(f"memcpy (1 copy, {total / 1e9:.2f} GB)", memcpy_s, {}),
                ("transfer stream alone (TP gather + merge + PP send)", source_s["transfer"], {}),
                ("shared mirror alone (each rank writes its shards)", source_s["mirror"], {})] + rows
        print("\n| channel | sync s | GB/s | x memcpy | where the time goes (s) |\n|---|---|---|---|---|")
        for label, took, parts in rows:
            detail = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in parts.items())
            print(f"| {label} | {took:.3f} | {total / took / 1e9:.2f} | {took / memcpy_s:.1f} | {detail} |")
        write_json(args.json, "bench_weight_sync", [
            {"name": label, "seconds": took, "gb_per_s": total / took / 1e9, "x_memcpy": took / memcpy_s, **parts}
            for label, took, parts in rows], args, gigabytes=total / 1e9, mode="sharded")
        if engine is not None:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)
    destroy_distributed()


def replica_sweep(args: argparse.Namespace) -> None:
    """Sync seconds per channel into fleets of args.replicas servers, as ratios to 1 replica; rollout tokens/s of
    2 one-thread replicas against 1 two-thread replica (module docstring)."""
    from rntp_megatron.rollout.sglang.fleet import SGLangFleet
    from rntp_megatron.runtime import destroy_distributed

    buckets, work, engines = _fleet_setup(args)
    sync_rows = _sync_rows(engines, buckets, args)
    _print_sync_table(sync_rows, args)
    for e in engines[2:]:  # an idle CPU server still polls (~20-40% of a core): only the measured ones stay up
        e.close()
    tokens_per_s = {}
    if args.rollout_tokens:
        with _server_threads(2):
            solo = _server(args, work / "init", work / "solo")
        tokens_per_s = _tokens_per_s({"1 replica x 2 threads": SGLangFleet([solo], owned=True),
                                      "2 replicas x 1 thread": SGLangFleet(engines[:2], owned=False)},
                                     args.repeats, new_tokens=args.rollout_tokens)
        print("\n| rollout (same 2 cores) | tokens/s |\n|---|---|")
        for label, rate in tokens_per_s.items():
            print(f"| {label} | {rate:.1f} |")
    smallest = min(args.replicas)
    write_json(args.json, "bench_weight_sync", [
        {"name": f"{channel} x {n}", "channel": channel, "replicas": n, "seconds": took,
         "ratio_to_smallest": took / sync_rows[channel, smallest][0], **parts}
        for (channel, n), (took, parts) in sync_rows.items()] + [
        {"name": f"rollout, {label}", "tokens_per_s": rate} for label, rate in tokens_per_s.items()],
        args, mode="replicas")
    for e in engines[:2]:
        e.close()
    shutil.rmtree(work, ignore_errors=True)
    destroy_distributed()


def delta_sweep(args: argparse.Namespace) -> None:
    """Seconds and bytes of a dense and of a sparse (args.delta) change pushed with delta sync into fleets of
    args.replicas servers (module docstring)."""
    from rntp_megatron.rollout.sglang.fleet import SGLangFleet
    from rntp_megatron.runtime import destroy_distributed

    buckets, work, engines = _fleet_setup(args)
    gen = torch.Generator().manual_seed(0)
    rows, version = {}, 0
    for _ in range(args.repeats):
        for channel in [c for c in args.channels if c != "tensor"]:  # delta_sync refuses tensor
            for n in args.replicas:
                fleet = SGLangFleet(engines[:n], owned=False)
                for e in engines[:n]:
                    e.cfg.weight_sync = channel
                version += 1
                fleet.update_weights_from_buckets(buckets, version)  # whole: forms the group, sets every base
                for change, fraction in (("dense", 1.0), ("sparse", args.delta)):
                    buckets = _moved(buckets, fraction, gen)
                    version += 1
                    t0 = time.perf_counter()
                    parts = fleet.update_weights_from_buckets(buckets, version)
                    took = time.perf_counter() - t0
                    stats = fleet.stats()
                    sent, parts["encode_s"] = stats["weights/sent_bytes"], stats["weights/delta_encode_s"]
                    print(f"{channel} x {n} {change}: {took:.3f} s, {sent / 1e9:.4f} GB", flush=True)
                    if (channel, n, change) not in rows or took < rows[channel, n, change][0]:
                        rows[channel, n, change] = (took, sent, parts)
                fleet.close()
    print(f"\n| channel | replicas | dense change s (GB sent) | {args.delta:g} of elements changed s (GB sent) | "
          "sparse / dense time | bytes | where the time goes (s): dense; sparse |\n|---|---|---|---|---|---|---|")
    table = []
    for channel, n, change in rows:
        if change == "dense":
            (dense_s, dense_b, dense_p), (sparse_s, sparse_b, sparse_p) = (rows[channel, n, "dense"],
                                                                           rows[channel, n, "sparse"])
            detail = "; ".join(", ".join(f"{k[:-2]} {v:.2f}" for k, v in p.items()) for p in (dense_p, sparse_p))
            print(f"| {channel} | {n} | {dense_s:.3f} ({dense_b / 1e9:.3f}) | {sparse_s:.3f} ({sparse_b / 1e9:.4f}) | "
                  f"{sparse_s / dense_s:.2f} | {sparse_b / dense_b:.3f} | {detail} |", flush=True)
            table.append({"name": f"{channel} x {n}", "channel": channel, "replicas": n, "dense_s": dense_s,
                          "dense_gb": dense_b / 1e9, "sparse_s": sparse_s, "sparse_gb": sparse_b / 1e9,
                          "time_sparse_over_dense": sparse_s / dense_s, "bytes_sparse_over_dense": sparse_b / dense_b})
    write_json(args.json, "bench_weight_sync", table, args, mode="delta", changed_fraction=args.delta)
    for e in engines:
        e.close()
    shutil.rmtree(work, ignore_errors=True)
    destroy_distributed()


def _fleet_setup(args: argparse.Namespace) -> tuple[list, Path, list]:
    """One TP1 process's HF buckets of the benchmark model, the work folder holding its HF export, and max(replicas)
    servers of it (one thread each), started one after the other: a CPU server sizes its cache by free memory."""
    from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import init_distributed
    from rntp_megatron.weights.export import stream_hf_weights
    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

    cfg = _config(args, tp=1, pp=1)
    init_distributed(cfg.parallel, seed=1)
    buckets = list(stream_hf_weights(build_model(cfg.model, cfg.parallel), cfg.model,
                                     bucket_bytes=args.bucket_mb << 20))
    total = sum(t.numel() * t.element_size() for b in buckets for _, t in b)
    work = Path(tempfile.mkdtemp(prefix="rntp-bench-fleet-"))
    save_hf_checkpoint(iter(buckets), work / "init", cfg.model,
                       tokenizer_dir=write_byte_tokenizer(work / "tok", eos_id=None))
    print(f"model {total / 1e9:.2f} GB bf16, {len(buckets)} buckets", flush=True)
    engines = []
    for i in range(max(args.replicas)):
        with _server_threads(1):
            engines.append(_server(args, work / "init", work / f"replica{i}"))
        print(f"replica {i} up in {engines[-1].startup_s:.0f} s", flush=True)
    return buckets, work, engines


def _moved(buckets: list, fraction: float, gen: torch.Generator) -> list:
    """Fresh buckets: each tensor with a random `fraction` of its elements moved one bf16 step (bits + 1)."""
    out = []
    for bucket in buckets:
        fresh = []
        for name, t in bucket:
            moved = t.clone()
            flat = moved.view(torch.int16).view(-1)
            flat[torch.rand(flat.numel(), generator=gen) < fraction] += 1
            fresh.append((name, moved))
        out.append(fresh)
    return out


def _sync_rows(engines: list, buckets: list, args: argparse.Namespace) -> dict[tuple[str, int], tuple]:
    """(channel, replicas) -> (best seconds of one push into a fleet of the first `replicas` engines, its phases)."""
    from rntp_megatron.rollout.sglang.fleet import SGLangFleet

    rows, version = {}, 0
    for _ in range(args.repeats):  # rounds over every (channel, fleet size): each sees the box's load of the moment
        for channel in args.channels:
            for n in args.replicas:
                fleet = SGLangFleet(engines[:n], owned=False)
                for e in engines[:n]:
                    e.cfg.weight_sync = channel
                fleet.update_weights_from_buckets(buckets, version + 1)  # forms the weight group: untimed
                version += 2
                t0 = time.perf_counter()
                parts = fleet.update_weights_from_buckets(buckets, version)
                took = time.perf_counter() - t0
                # broadcast_s overlaps server_s (the load calls receive it); disk's server_s holds its begin/end
                parts["rest_s"] = took - sum(v for k, v in parts.items() if k != "broadcast_s")
                assert all(e.server_weight_version() == version for e in engines[:n])
                fleet.close()  # leaves the weight group; the engines stay up (not owned)
                print(f"{channel} x {n}: {took:.3f} s", flush=True)
                if (channel, n) not in rows or took < rows[channel, n][0]:
                    rows[channel, n] = (took, parts)
    return rows


def _print_sync_table(rows: dict[tuple[str, int], tuple], args: argparse.Namespace) -> None:
    """Markdown: seconds per fleet size, ratios to the smallest, and the phases at each size."""
    sizes = sorted(args.replicas)
    print(f"\n| channel | {' | '.join(f'{n} replica(s) s' for n in sizes)} | "
          f"{' | '.join(f'{n} / {sizes[0]}' for n in sizes[1:])} | where the time goes (s), per fleet size |")
    print("|---" * (2 * len(sizes) + 1) + "|")
    for channel in args.channels:
        cells = [f"{rows[channel, n][0]:.3f}" if (channel, n) in rows else "refused" for n in sizes]
        ratios = [f"{rows[channel, n][0] / rows[channel, sizes[0]][0]:.2f}" if (channel, n) in rows else "-"
                  for n in sizes[1:]]
        detail = "; ".join(f"{n}: " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in rows[channel, n][1].items())
                           for n in sizes if (channel, n) in rows)
        print(f"| {channel} | {' | '.join(cells)} | {' | '.join(ratios)} | {detail} |", flush=True)


@contextlib.contextmanager
def _server_threads(n: int):
    """Servers started inside run n torch threads (OMP_NUM_THREADS of their environment)."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _tokens_per_s(fleets: dict, repeats: int, prompts: int = 8, group: int = 4, new_tokens: int = 32
                  ) -> dict[str, float]:
    """Generated tokens per second of each fleet for `prompts` random 32-token prompts x `group` greedy samples of
    new_tokens each: best of repeats after one untimed warm-up batch, the fleets taking turns (so that they share
    this box's varying load); the fleets are closed."""
    from rntp_megatron.rollout.engine import SamplingParams

    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(3, 250, (32,), generator=gen).tolist() for _ in range(prompts)]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, n=group)
    best = dict.fromkeys(fleets, 0.0)
    for attempt in range(repeats + 1):
        for label, fleet in fleets.items():
            t0 = time.perf_counter()
            tokens = sum(len(r.token_ids) for r in fleet.generate(batch, sampling))
            rate = tokens / (time.perf_counter() - t0)
            print(f"{label}: {rate:.1f} tokens/s", flush=True)
            if attempt:
                best[label] = max(best[label], rate)
    for fleet in fleets.values():
        fleet.close()
    return best


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
