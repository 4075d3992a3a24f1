"""Benchmark of the RNTP data path, side by side in one run (ratios; these machines are noisy).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_data.py [--copies 4] [--episodes 4000] [--steps 5]

1. prepare-data throughput (tokens/s) at 1 and 2 workers on a corpus of pydoc prose (JSONL, `copies` times).
2. The episode path from the prepared .bin/.idx: EpisodeStream (uniform sites) + packing into training rows,
   in episodes/s and tokens/s.
3. What a training step of the demo model consumes: the tiny GPTModel (megatron-core, TP1 on CPU) doing
   forward + backward + AdamW on packed rows of those episodes, in episodes/s.
The target: the data path at least 50x faster than training consumes it.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_data.py --scale [--big-gb 10]

The data path at scale instead: 4. read amplification (bytes read by all ranks / corpus bytes) at DP 1, 8 and
64 on a multi-file JSONL corpus; 5. episodes/s of one rank of 8; 6. time to the first episode after resuming
a cursor at 1%, 50% and 99% of a `big-gb` JSONL file (sparse: real lines only in the units resumed into, so
it takes no disk; the reader never looks before its unit); 7. a step whose data path is slowed on purpose
(sleeps per document) beside a step of `train` seconds, with episodes built inline and ahead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import parse_args, write_json  # noqa: E402

SMOKE = {"copies": 1, "episodes": 200, "steps": 1, "batch": 8, "bpe_vocab": 300, "big_gb": 0.1,
         "amplification_files": 2, "overlap_steps": 3}


def data_config(data: dict):
    """The DataConfig of `data`: the data path alone, so no rollout row has to fit a schedule (objective ntp)."""
    from rntp_megatron.config import build_config

    return build_config({"data": data, "rl": {"objective": "ntp"}}).data


def write_corpus(path: Path, copies: int) -> int:
    """pydoc topics as JSONL, `copies` times; returns the number of bytes of text."""
    from pydoc_data.topics import topics

    size = 0
    with open(path, "w") as f:
        for c in range(copies):
            for key in sorted(topics):
                f.write(json.dumps({"text": topics[key], "id": f"{c}:{key}"}) + "\n")
                size += len(topics[key].encode())
    return size


def bench_episodes(prefix: str, n: int, data: dict, batch: int) -> tuple[float, int, list]:
    """Seconds to produce n episodes from the .bin/.idx and pack them into rows `batch` episodes at a time (as
    the trainer does); tokens; the episodes."""
    from rntp_megatron.data.packing import pack_sequences
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cfg = data_config({"sources": [{"kind": "megatron", "path": prefix}], **data})
    start = time.perf_counter()
    stream = EpisodeStream(cfg, tok)
    episodes = stream.take(n)
    seqs = [e.prompt_ids + e.continuation_ids for e in episodes]
    for i in range(0, len(seqs), batch):
        pack_sequences(seqs[i:i + batch], cfg.context_len + 16, tok.pad_id)
    return time.perf_counter() - start, sum(len(s) for s in seqs), episodes


def bench_training(episodes: list, steps: int, batch: int, row_length: int) -> float:
    """Episodes/s consumed by forward+backward+AdamW of the tiny GPTModel on packed rows of `batch` episodes."""
    import torch

    from rntp_megatron.config import build_config
    from rntp_megatron.data.packing import attention_mask, pack_sequences
    from rntp_megatron.data.tokenizer import ByteTokenizer
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    tok = ByteTokenizer()
    cfg = build_config({"model": {"card": "tiny", "vocab_size": tok.vocab_size}})
    init_distributed(cfg.parallel, seed=1)
    try:
        model = build_model(cfg.model, cfg.parallel)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for step in range(steps + 1):  # the first step warms up
            group = episodes[step * batch:(step + 1) * batch]
            seqs = [e.prompt_ids + e.continuation_ids for e in group]
            packed = pack_sequences(seqs, row_length, tok.pad_id)
            labels = torch.roll(packed.tokens, -1, dims=1)
            start = time.perf_counter()
            loss = model(packed.tokens, packed.position_ids, attention_mask(packed.segment_ids), labels=labels)
            loss.float().mean().backward()
            opt.step()
            opt.zero_grad()
            if step:
                times.append(time.perf_counter() - start)
        return batch * len(times) / sum(times)
    finally:
        destroy_distributed()


def bench_amplification(tmp: Path, rows: list, files: int = 16, episodes: int = 4000) -> None:
    """Bytes read over all DP ranks / corpus bytes, and episodes/s of one rank of 8."""
    from rntp_megatron.config import SourceConfig
    from rntp_megatron.data.sources import SkipCounts, bytes_read, open_source
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.data.tokenizer import ByteTokenizer
    from pydoc_data.topics import topics

    root = tmp / "multi"
    root.mkdir()
    texts = [topics[k] for k in sorted(topics)]
    for f in range(files):
        with open(root / f"{f:02d}.jsonl", "w") as out:
            for c in range(4):
                out.writelines(json.dumps({"text": t, "id": f"{f}:{c}:{i}"}) + "\n" for i, t in enumerate(texts))
    size = sum(p.stat().st_size for p in root.iterdir())
    src = SourceConfig(kind="jsonl", path=str(root))
    shard = 1 << 18
    for dp in (1, 8, 64):
        before = bytes_read()
        docs = 0
        for rank in range(dp):
            source = open_source(src, 4 << 20, SkipCounts(), shard)
            docs += sum(1 for u in range(rank, source.num_units, dp) for _ in source.read(u, {}))
        amplification = (bytes_read() - before) / size
        rows.append((f"read amplification, DP={dp}", f"{amplification:.3f}x",
                     f"{size / 1e6:.0f} MB in {source.num_units} units of {shard >> 10} KiB; {docs} docs", "",
                     {"read_amplification": amplification, "dp": dp, "documents": docs}))
    cfg = data_config({"sources": [{"kind": "jsonl", "path": str(root)}], "context_len": 256, "min_context": 16,
                       "answer_horizon": 4, "sites_per_chunk": 4, "shard_bytes": shard, "prefetch_documents": 0})
    stream = EpisodeStream(cfg, ByteTokenizer(), 3, 8)
    start = time.perf_counter()
    rate = len(stream.take(episodes)) / (time.perf_counter() - start)
    rows.append(("episodes/s of one rank (3 of 8)", f"{rate:,.0f} episodes/s", "byte tokenizer, inline", "",
                 {"episodes_per_s": rate}))


def bench_resume(tmp: Path, gigabytes: float, rows: list) -> None:
    """Seconds to the first episode after loading a cursor at 1%, 50%, 99% of a `gigabytes` JSONL file."""
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.data.tokenizer import ByteTokenizer
    from pydoc_data.topics import topics

    path, shard = tmp / "big.jsonl", 16 << 20
    size = int(gigabytes * (1 << 30))
    units = size // shard
    lines = b"".join(json.dumps({"text": topics[k]}).encode() + b"\n" for k in sorted(topics))
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: only the units resumed into hold lines
        for frac in (0.01, 0.5, 0.99):
            u = max(1, int(units * frac))  # unit 0 has no line before it to cut
            f.seek(u * shard - 1)
            f.write(b"\n" + (lines * (shard // len(lines)))[: shard - 1])
    cfg = data_config({"sources": [{"kind": "jsonl", "path": str(path)}], "context_len": 256, "min_context": 16,
                       "answer_horizon": 4, "shard_bytes": shard})
    state = EpisodeStream(cfg, ByteTokenizer(), 0, 8).state_dict()
    for frac in (0.01, 0.5, 0.99):
        u = max(1, int(units * frac))  # unit 0 has no line before it to cut
        state["at_document"]["cursors"][0].update(round=u // 8, position={"offset": u * shard})
        state["at_document"]["cursors"][0]["dp_rank"] = u % 8
        start = time.perf_counter()
        stream = EpisodeStream(cfg, ByteTokenizer(), u % 8, 8)
        stream.load_state_dict({**state, "dp_rank": u % 8})
        ep = next(stream)
        seconds = time.perf_counter() - start
        stream.close()
        rows.append((f"first episode after resume at {frac:.0%} of {gigabytes:g} GB", f"{seconds:.3f} s",
                     f"unit {u} of {units}, {ep.doc_id}", "PASS" if seconds < 2 else "FAIL (target < 2 s)",
                     {"seconds": seconds, "fraction": frac}))
    path.unlink()


def bench_overlap(tmp: Path, rows: list, data_s: float = 0.05, train_s: float = 0.1, steps: int = 20) -> None:
    """Step wall time with a data path slowed to data_s per step (sleeps per document) and train_s of work."""
    from rntp_megatron.data.episodes import EpisodeBuilder
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.data.tokenizer import ByteTokenizer

    class SlowBuilder(EpisodeBuilder):
        def episodes(self, doc, rng, skips):
            time.sleep(data_s / 2)  # two documents a step, one episode each
            return super().episodes(doc, rng, skips)[:1]

    tok = ByteTokenizer()
    for depth in (0, 8):
        cfg = data_config({"sources": [{"kind": "synthetic"}], "context_len": 64, "min_context": 8,
                           "sites_per_chunk": 1, "prefetch_documents": depth})
        stream = EpisodeStream(cfg, tok, builder=SlowBuilder(cfg, tok))
        stream.take(1)
        start = time.perf_counter()
        for _ in range(steps):
            stream.take(2)
            time.sleep(train_s)  # the training step: torch and file reads release the GIL as a sleep does
        per_step = (time.perf_counter() - start) / steps
        stream.close()
        rows.append((f"step with slow data ({data_s * 1e3:.0f} ms) + train ({train_s * 1e3:.0f} ms), "
                     f"prefetch_documents={depth}", f"{per_step * 1e3:.0f} ms",
                     f"max {max(data_s, train_s) * 1e3:.0f} ms, sum {(data_s + train_s) * 1e3:.0f} ms", "",
                     {"step_s": per_step, "prefetch_documents": depth, "max_s": max(data_s, train_s),
                      "sum_s": data_s + train_s}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="pydoc corpus copies for prepare-data")
    parser.add_argument("--episodes", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="episodes per training step")
    parser.add_argument("--scale", action="store_true", help="the data path at scale (sections 4-7)")
    parser.add_argument("--big-gb", type=float, default=10.0, help="size of the sparse file resumed into")
    parser.add_argument("--bpe-vocab", type=int, default=2048, help="vocabulary of the trained BPE tokenizer")
    parser.add_argument("--amplification-files", type=int, default=16, help="--scale: JSONL files of the corpus")
    parser.add_argument("--overlap-steps", type=int, default=20, help="--scale: steps timed with slow data")
    args = parse_args(parser, SMOKE)
    import torch

    torch.set_num_threads(1)
    from rntp_megatron.config import SourceConfig, TokenizerConfig
    from rntp_megatron.data.prepare import prepare_data

    data = {"context_len": 256, "min_context": 16, "answer_horizon": 4, "sites_per_chunk": 4}
    rows: list = []
    if args.scale:
        with tempfile.TemporaryDirectory() as tmp:
            bench_amplification(Path(tmp), rows, args.amplification_files, args.episodes)
            bench_resume(Path(tmp), args.big_gb, rows)
            bench_overlap(Path(tmp), rows, steps=args.overlap_steps)
        print_table(rows, args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydoc.jsonl"
        text_bytes = write_corpus(corpus, args.copies)
        src = [SourceConfig(kind="jsonl", path=str(corpus))]
        bpe = TokenizerConfig(kind="trained", path=f"{tmp}/bpe")
        prepare_data(src, bpe, f"{tmp}/bpe_train", 1, train_vocab_size=args.bpe_vocab, progress=False)  # trains once
        for name, tok_cfg in (("byte", TokenizerConfig()), (f"trained BPE {args.bpe_vocab}", bpe)):
            prep = {w: prepare_data(src, tok_cfg, f"{tmp}/{name[:4]}{w}", w, progress=False) for w in (1, 2)}
            base = prep[1].tokens / prep[1].seconds
            for workers, rep in prep.items():
                rate = rep.tokens / rep.seconds
                rows.append((f"prepare-data, {workers} worker(s), {name} tokenizer", f"{rate:,.0f} tokens/s",
                             f"{rep.documents} docs / {text_bytes / 1e6:.1f} MB in {rep.seconds:.2f}s",
                             f"{rate / base:.2f}x of 1 worker",
                             {"tokens_per_s": rate, "workers": workers, "seconds": rep.seconds,
                              "ratio_to_1_worker": rate / base}))
        seconds, tokens, episodes = bench_episodes(f"{tmp}/byte1", args.episodes, data, args.batch)
        data_eps = len(episodes) / seconds
        rows.append(("episode path (.bin/.idx -> episodes -> packed rows)", f"{data_eps:,.0f} episodes/s",
                     f"{tokens / seconds:,.0f} tokens/s", "",
                     {"episodes_per_s": data_eps, "tokens_per_s": tokens / seconds}))
        train_eps = bench_training(episodes, args.steps, args.batch, data["context_len"] + 16)
        rows.append((f"training step, tiny GPTModel, {args.batch} episodes/step", f"{train_eps:,.1f} episodes/s",
                     f"{train_eps * tokens / len(episodes):,.0f} tokens/s", "",
                     {"episodes_per_s": train_eps, "tokens_per_s": train_eps * tokens / len(episodes)}))
        rows.append(("data path / training consumption", f"{data_eps / train_eps:,.0f}x", "target >= 50x",
                     "PASS" if data_eps / train_eps >= 50 else "FAIL", {"ratio": data_eps / train_eps}))
    print_table(rows, args)
    return 0


def print_table(rows: list, args: argparse.Namespace) -> None:
    """The rows' (what, rate, detail, ratio) as a text table; their numbers to --json."""
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(("what", "rate", "detail", "ratio"), widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r[:4], widths)))
    write_json(args.json, "bench_data", [{"name": r[0], **r[4]} for r in rows], args)


if __name__ == "__main__":
    sys.exit(main())
