"""Benchmark: MegatronEngine (KV cache, shared prefill) vs Hugging Face transformers `generate` (KV cache) on
the same weights, and vs recomputing the full sequence every token.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_megatron_engine.py --prompts 16 --n 8 --new 24

The Megatron model's weights are exported with the project's converter path (weights.export stream ->
weights.hf_checkpoint folder) and loaded with transformers from that folder. All sides decode greedily, the
same prompts, n rows a prompt, exactly --new tokens (no early stop), one thread, alternating in one run;
the table gives generated tokens per second and each side's speed relative to HF generate. The recompute
side must produce the engine's tokens (asserted); the share of HF's tokens equal to the engine's is printed
(float32 on both sides, so a near-tie in the logits is the only way they can part).

On CPU the project's compat layer (runtime/cpu_compat) keeps a TorchFunctionMode on every torch call of the
process; the engine lifts it around its decode loop, which runs under inference_mode, so HF generate, which
needs none of the redirects (asserted), runs the same way. The row "HF generate, compat mode on" is plain HF
generate (no_grad) under the mode, as a process with the layer installed runs it by default.

A second table splits the engine's generate time at --loop-rows rows (prompts of one length, n a prompt,
stop string "</answer>" set, sampled at temperature 1) into the model's forwards and the decode loop's own CPU
time (sampling, stop tokens and strings, bookkeeping: everything but the forwards).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_io import parse_args, write_json

from rntp_megatron.config import build_config
from rntp_megatron.data.synthetic import THINK_OPEN, synthetic_documents
from rntp_megatron.data.tokenizer import ByteTokenizer
from rntp_megatron.model.provider import build_model
from rntp_megatron.rollout.engine import SamplingParams
from rntp_megatron.rollout.megatron_engine import MegatronEngine
from rntp_megatron.runtime import cpu_compat, init_distributed
from rntp_megatron.weights.export import stream_hf_weights
from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint


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


@torch.no_grad()
def hf_greedy(hf_model, prompts: list[list[int]], n: int, new: int) -> list[list[int]]:
    """Greedy tokens[P*n][new] from transformers generate with its KV cache; prompts of equal length go in one
    batch of n rows each (the engine's batching, so neither side pads), rows returned in prompt order."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    rows: dict[int, list[list[int]]] = {}
    for length, indices in by_length.items():
        ids = torch.tensor([prompts[i] for i in indices]).repeat_interleave(n, dim=0)
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                min_new_tokens=new, use_cache=True, eos_token_id=None, pad_token_id=0)
        for j, i in enumerate(indices):
            rows[i] = out[j * n:(j + 1) * n, length:].tolist()
    return [r for i in range(len(prompts)) for r in rows[i]]


def hf_greedy_engine_settings(hf_model, prompts: list[list[int]], n: int, new: int) -> list[list[int]]:
    """hf_greedy as the engine's decode loop runs: CPU compat mode lifted, under inference_mode; asserts that
    no redirect was needed (hits() unchanged)."""
    before = cpu_compat.hits()
    with cpu_compat.cuda_redirects_paused(), torch.inference_mode():
        tokens = hf_greedy(hf_model, prompts, n, new)
    assert cpu_compat.hits() == before, f"HF generate hit CUDA redirects: {cpu_compat.hits()} (before: {before})"
    return tokens


class ForwardTimedEngine(MegatronEngine):
    """MegatronEngine that sums the wall time of its model forwards (synchronising a GPU around each)."""

    forward_s = 0.0

    def _forward(self, tokens, positions, context):
        """MegatronEngine._forward, timed."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = super()._forward(tokens, positions, context)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.forward_s += time.perf_counter() - t
        return out


def loop_vs_forward(model, tok, prompts: list[list[int]], rows: int, n: int, new: int, repeats: int
                    ) -> tuple[float, float]:
    """Best-of-repeats (generate seconds, forward seconds) of `rows` rows: prompts cut to one length, n a prompt."""
    length = min(map(len, prompts))
    batch = [prompts[i % len(prompts)][:length] for i in range(max(rows // n, 1))]
    engine = ForwardTimedEngine(model, tok, max_batch_size=len(batch) * n)
    sampling = SamplingParams(temperature=1.0, n=n, max_new_tokens=new, stop=["</answer>"], seed=0)
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        engine.forward_s = 0.0
        t = time.perf_counter()
        engine.generate(batch, sampling)
        best = min(best, (time.perf_counter() - t, engine.forward_s))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--loop-rows", default="64,512", help="row counts of the loop-vs-forward table")
    p.add_argument("--no-recompute", action="store_true", help="leave out the (slow) full-recompute side")
    args = parse_args(p, smoke={"prompts": 2, "n": 2, "new": 4, "repeats": 1, "layers": 1, "hidden": 64,
                                   "loop_rows": "4,8"})
    torch.set_num_threads(1)
    import transformers

    tok = ByteTokenizer()
    cfg = build_config({"model": {"card": "tiny", "num_layers": args.layers, "hidden_size": args.hidden,
                                  "ffn_hidden_size": args.hidden * 8 // 3 // 16 * 16, "num_query_groups": 4,
                                  "vocab_size": tok.vocab_size}})
    init_distributed(cfg.parallel, seed=0)
    model = build_model(cfg.model, cfg.parallel).eval()
    engine = MegatronEngine(model, tok)
    with tempfile.TemporaryDirectory(prefix="rntp-bench-engine-") as tmp:
        folder = save_hf_checkpoint(stream_hf_weights(model, cfg.model), Path(tmp) / "hf", cfg.model)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # prompts of mixed lengths, as RL sites are: terse documents cut at their C sites
    prompts = []
    for doc in synthetic_documents(0, "heldout", kinds={"terse": 1}):
        prompts += [tok.encode(doc["text"][:s["pos"]] + THINK_OPEN) for s in doc["sites"] if s["cls"] == "C"]
        if len(prompts) >= args.prompts:
            break
    prompts = prompts[:args.prompts]
    sampling = SamplingParams(temperature=0.0, n=args.n, max_new_tokens=args.new)
    sides = {"engine (KV cache)": lambda: [r.token_ids for r in engine.generate(prompts, sampling)],
             "HF generate (KV cache)": lambda: hf_greedy_engine_settings(hf_model, prompts, args.n, args.new),
             "HF generate, compat mode on": lambda: hf_greedy(hf_model, prompts, args.n, args.new)}
    if not args.no_recompute:
        sides["full recompute"] = lambda: recompute_greedy(model, prompts, args.n, args.new, tok.vocab_size)
    times: dict[str, list[float]] = {name: [] for name in sides}
    tokens_of: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, run in sides.items():
            t = time.perf_counter()
            tokens_of[name] = run()
            times[name].append(time.perf_counter() - t)
    engine_tokens = tokens_of["engine (KV cache)"]
    if "full recompute" in tokens_of:
        assert tokens_of["full recompute"] == engine_tokens, "the engine and the full recompute disagree"
    hf_tokens = tokens_of["HF generate (KV cache)"]
    assert tokens_of["HF generate, compat mode on"] == hf_tokens, "HF generate changed with the compat mode"
    same = sum(a == b for x, y in zip(engine_tokens, hf_tokens) for a, b in zip(x, y))
    tokens = len(prompts) * args.n * args.new
    base = min(times["HF generate (KV cache)"])
    print(f"{len(prompts)} prompts (lengths {min(map(len, prompts))}-{max(map(len, prompts))}) x n={args.n} x "
          f"{args.new} new tokens, {args.layers} layers, hidden {args.hidden}, float32, 1 thread; best of "
          f"{args.repeats}; HF tokens equal to the engine's: {same}/{tokens}")
    print(f"| {'method':<27} | {'seconds':>8} | {'tokens/s':>9} | {'vs HF':>7} |")
    print(f"|{'-' * 29}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for name, ts in times.items():
        best = min(ts)
        print(f"| {name:<27} | {best:8.3f} | {tokens / best:9.0f} | {base / best:6.2f}x |")
    print(f"\nthe decode loop's own time beside the forwards: {args.new} new tokens a row (stop string set, "
          f"none hit at most rows), best of {args.repeats}")
    print(f"| {'rows':<26} | {'generate s':>10} | {'forward s':>9} | {'loop s':>8} | {'loop share':>10} |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 12}|")
    loop_rows = []
    for rows in map(int, args.loop_rows.split(",")):
        total, forward = loop_vs_forward(model, tok, prompts, rows, args.n, args.new, args.repeats)
        name = f"decode loop at {rows} rows"
        print(f"| {name:<26} | {total:10.3f} | {forward:9.3f} | {total - forward:8.3f} | "
              f"{(total - forward) / total:10.1%} |")
        loop_rows.append({"name": name, "generate_s": total, "forward_s": forward, "loop_s": total - forward})
    write_json(args.json, "bench_megatron_engine", [
        {"name": name, "seconds": min(ts), "tokens_per_s": tokens / min(ts), "vs_hf": base / min(ts)}
        for name, ts in times.items()] + loop_rows, args, hf_tokens_equal=same, tokens=tokens)


if __name__ == "__main__":
    main()
