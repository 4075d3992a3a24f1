"""Benchmark of the RNTP data path, side by side in one run (ratios; these machines are noisy).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_data.py [--copies 4] [--episodes 4000] [--steps 5]

1. prepare-data throughput (tokens/s) at 1 and 2 workers on a corpus of pydoc prose (JSONL, `copies` times).
2. The episode path from the prepared .bin/.idx: EpisodeStream (uniform sites) + packing into training rows,
   in episodes/s and tokens/s.
3. What a training step of the demo model consumes: the tiny GPTModel (megatron-core, TP1 on CPU) doing
   forward + backward + AdamW on packed rows of those episodes, in episodes/s.
The target: the data path at least 50x faster than training consumes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    from rntp_megatron.config import build_config
    from rntp_megatron.data.packing import pack_sequences
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cfg = build_config({"data": {"sources": [{"kind": "megatron", "path": prefix}], **data}}).data
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="pydoc corpus copies for prepare-data")
    parser.add_argument("--episodes", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="episodes per training step")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from rntp_megatron.config import SourceConfig, TokenizerConfig
    from rntp_megatron.data.prepare import prepare_data

    data = {"context_len": 256, "min_context": 16, "answer_horizon": 4, "sites_per_chunk": 4}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydoc.jsonl"
        text_bytes = write_corpus(corpus, args.copies)
        src = [SourceConfig(kind="jsonl", path=str(corpus))]
        bpe = TokenizerConfig(kind="trained", path=f"{tmp}/bpe")
        prepare_data(src, bpe, f"{tmp}/bpe_train", 1, train_vocab_size=2048, progress=False)  # trains once
        for name, tok_cfg in (("byte", TokenizerConfig()), ("trained BPE 2048", bpe)):
            prep = {w: prepare_data(src, tok_cfg, f"{tmp}/{name[:4]}{w}", w, progress=False) for w in (1, 2)}
            base = prep[1].tokens / prep[1].seconds
            for workers, rep in prep.items():
                rate = rep.tokens / rep.seconds
                rows.append((f"prepare-data, {workers} worker(s), {name} tokenizer", f"{rate:,.0f} tokens/s",
                             f"{rep.documents} docs / {text_bytes / 1e6:.1f} MB in {rep.seconds:.2f}s",
                             f"{rate / base:.2f}x of 1 worker"))
        seconds, tokens, episodes = bench_episodes(f"{tmp}/byte1", args.episodes, data, args.batch)
        data_eps = len(episodes) / seconds
        rows.append(("episode path (.bin/.idx -> episodes -> packed rows)", f"{data_eps:,.0f} episodes/s",
                     f"{tokens / seconds:,.0f} tokens/s", ""))
        train_eps = bench_training(episodes, args.steps, args.batch, data["context_len"] + 16)
        rows.append((f"training step, tiny GPTModel, {args.batch} episodes/step", f"{train_eps:,.1f} episodes/s",
                     f"{train_eps * tokens / len(episodes):,.0f} tokens/s", ""))
        rows.append(("data path / training consumption", f"{data_eps / train_eps:,.0f}x", "target >= 50x",
                     "PASS" if data_eps / train_eps >= 50 else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(" | ".join(h.ljust(w) for h, w in zip(("what", "rate", "detail", "ratio"), widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
