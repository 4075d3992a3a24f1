"""Benchmark: MegatronEngine (KV cache, shared prefill) vs recomputing the full sequence every token.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_megatron_engine.py --prompts 16 --n 8 --new 24

Both sides sample greedily from the same GPTModel on the same prompts, alternating in one run; the table
gives generated tokens per second and the ratio. The recompute side is checked to produce the same tokens.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))

import torch  # noqa: E402

from rntp_megatron.config import build_config  # noqa: E402
from rntp_megatron.data.synthetic import THINK_OPEN, synthetic_documents  # noqa: E402
from rntp_megatron.data.tokenizer import ByteTokenizer  # noqa: E402
from rntp_megatron.model.provider import build_model  # noqa: E402
from rntp_megatron.rollout.engine import SamplingParams  # noqa: E402
from rntp_megatron.rollout.megatron_engine import MegatronEngine  # noqa: E402
from rntp_megatron.runtime import init_distributed  # noqa: E402


@torch.no_grad()
def recompute_greedy(model, prompts: list[list[int]], n: int, new: int, vocab: int) -> list[list[int]]:
    """Greedy tokens by a full forward over prompt + generated tokens at every step (no cache), n rows a prompt."""
    out = []
    for p in prompts:
        rows = torch.tensor([p] * n)
        for _ in range(new):
            logits = model(rows, torch.arange(rows.shape[1]).expand_as(rows), None)[:, -1, :vocab]
            rows = torch.cat([rows, logits.argmax(-1, keepdim=True)], dim=1)
        out += rows[:, len(p):].tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = ByteTokenizer()
    cfg = build_config({"model": {"card": "tiny", "num_layers": args.layers, "hidden_size": args.hidden,
                                  "ffn_hidden_size": args.hidden * 8 // 3 // 16 * 16, "num_query_groups": 4,
                                  "vocab_size": tok.vocab_size}})
    init_distributed(cfg.parallel, seed=0)
    model = build_model(cfg.model, cfg.parallel).eval()
    engine = MegatronEngine(model, tok)
    # prompts of mixed lengths, as RL sites are: terse documents cut at their C sites
    prompts = []
    for doc in synthetic_documents(0, "heldout", kinds={"terse": 1}):
        prompts += [tok.encode(doc["text"][:s["pos"]] + THINK_OPEN) for s in doc["sites"] if s["cls"] == "C"]
        if len(prompts) >= args.prompts:
            break
    prompts = prompts[:args.prompts]
    sampling = SamplingParams(temperature=0.0, n=args.n, max_new_tokens=args.new)
    times = {"engine (KV cache)": [], "full recompute": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        cached = [r.token_ids for r in engine.generate(prompts, sampling)]
        times["engine (KV cache)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        plain = recompute_greedy(model, prompts, args.n, args.new, tok.vocab_size)
        times["full recompute"].append(time.perf_counter() - t)
        assert cached == plain, "the KV-cache engine and the full recompute disagree on greedy tokens"
    tokens = len(prompts) * args.n * args.new
    base = min(times["full recompute"])
    print(f"{len(prompts)} prompts (lengths {min(map(len, prompts))}-{max(map(len, prompts))}) x n={args.n} x "
          f"{args.new} new tokens, {args.layers} layers, hidden {args.hidden}, 1 thread; best of {args.repeats}")
    print(f"| {'method':<20} | {'seconds':>8} | {'tokens/s':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, ts in times.items():
        best = min(ts)
        print(f"| {name:<20} | {best:8.2f} | {tokens / best:9.0f} | {base / best:7.2f}x |")


if __name__ == "__main__":
    main()
