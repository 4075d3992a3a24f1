"""Peak extra memory of rl/logprobs.vocab_parallel_logprobs vs a naive log_softmax, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_logprobs_memory.py --rows 2048 --vocab 131072 --chunk 256

Memory is read from the CPU allocator's own alloc/free events (torch.profiler, profile_memory=True): for each
phase, the peak of the running sum of bytes allocated minus freed since the phase began. "extra" excludes the
logits themselves; backward's "extra" excludes the gradient of the logits, which every method must return.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import parse_args, write_json  # noqa: E402
from rntp_megatron.rl.logprobs import vocab_parallel_logprobs  # noqa: E402


def _peak_and_net(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Run fn under the profiler: (its result, peak bytes above the start, net bytes still held at the end)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running, peak = 0, 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return result, peak, running


def naive(logits: torch.Tensor, labels: torch.Tensor, temperature: float, entropy: bool):
    logsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logsm.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1) if entropy else torch.zeros_like(logp)
    return logp, ent


def measure(method: str, rows: int, vocab: int, dtype: torch.dtype, chunk: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    w_lp, w_h = torch.randn(rows, generator=g), torch.randn(rows, generator=g)

    def forward():
        if method == "ours":
            return vocab_parallel_logprobs(logits, labels, temperature=0.7, chunk_size=chunk)
        return naive(logits, labels, 0.7, entropy=method == "naive logp+entropy")

    (logp, ent), fwd_peak, retained = _peak_and_net(forward)
    objective = (logp * w_lp).sum() + (ent * w_h).sum()
    _, bwd_peak, _ = _peak_and_net(lambda: objective.backward())
    grad_bytes = logits.numel() * logits.element_size()
    mib = 2 ** 20
    return {"forward peak": fwd_peak / mib, "kept for backward": retained / mib,
            "backward peak (excl. grad)": (bwd_peak - grad_bytes) / mib,
            "total peak (fwd kept + bwd)": (retained + bwd_peak) / mib}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="tokens (b * s) in the micro-batch")
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=256, help="rows per chunk (rl.logprob_chunk_size)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parse_args(ap, smoke={"rows": 256, "vocab": 4096, "chunk": 32})
    dtype = getattr(torch, args.dtype)
    methods = ["naive logp", "naive logp+entropy", "ours"]
    results = {m: measure(m, args.rows, args.vocab, dtype, args.chunk) for m in methods}
    logits_mib = args.rows * args.vocab * torch.tensor([], dtype=dtype).element_size() / 2 ** 20
    print(f"rows={args.rows} vocab={args.vocab} dtype={args.dtype} chunk={args.chunk} "
          f"(logits: {logits_mib:.0f} MiB); extra memory in MiB, CPU allocator events")
    cols = list(results["ours"])
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{results[m][c]:.0f}" for c in cols) + " |")
    ratios = {f"ours / {ref}": {c: results["ours"][c] / results[ref][c] for c in cols if results[ref][c] > 0}
              for ref in ("naive logp", "naive logp+entropy")}
    for name, ratio in ratios.items():
        print(f"| {name} | " + " | ".join(f"{ratio[c]:.3f}" if c in ratio else "-" for c in cols) + " |")
    write_json(args.json, "bench_logprobs_memory",
               [{"name": m, **{f"{c} MiB": v for c, v in results[m].items()}} for m in methods] +
               [{"name": name, **ratio} for name, ratio in ratios.items()], args, logits_mib=logits_mib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
