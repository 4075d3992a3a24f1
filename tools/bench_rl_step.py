"""The RL train step with its scoring passes, shared-context rows vs one rollout a row, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_rl_step.py            # qwen3_8b proportions shrunk to CPU
    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_rl_step.py --smoke    # the whole path in seconds

The qwen3_8b recipe's proportions (context 2,048, thoughts up to 1,024, G = 8) shrunk to a CPU: groups of G = 8
rollouts after a 1,024-token prompt, thoughts drawn uniformly in 32..256 tokens plus an 8-token answer, on a
4-layer GQA model (hidden 256, 8 heads, 2 KV groups). One step = the reference pass (KL), the off-policy anchor
pass (old log-probs), and forward/backward + optimizer step of the mixed objective (PPO clip, TIS, KL, next-token
loss on the context). Per-row: rows of seq_length = prompt + 256 + 8 tokens, micro-batches of
`--micro-batch` rows, scoring through rewards/scoring.continuation_logprobs as the trainer does; shared:
rl/shared_context rows of micro_batch x seq_length tokens, scoring on those rows. Each layout runs in its own
process (so peak RSS is its own), from the same seeded weights and rollouts; the last of `--warmup` + 1 steps
is timed in wall and process CPU time (one thread: CPU time is robust to other processes on a shared machine;
the warm-up steps update both layouts' weights alike, their gradients being equal).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_io import parse_args, write_json  # noqa: E402  (tools/, beside this script)

RL = {"objective": "mixed", "kl_coef": 0.01, "tis_cap": 2.0, "clip_eps_high": 0.28, "train_on": "thought_and_answer"}


def rollouts_for(args: argparse.Namespace):
    """args.groups groups of G rollouts: prompt tokens, thought + answer lengths drawn, engine log-probs."""
    from rntp_megatron.data.episode import Episode
    from rntp_megatron.rollout.engine import Rollout

    g = torch.Generator().manual_seed(0)
    episodes, rollouts = [], []
    for e in range(args.groups):
        prompt = torch.randint(16, args.vocab, (args.context,), generator=g).tolist()
        episodes.append(Episode(prompt, prompt[8:], [], "", 0))
        for _ in range(args.G):
            n = int(torch.randint(args.thought_min, args.thought_max + 1, (1,), generator=g)) + args.answer
            tokens = torch.randint(16, args.vocab, (n,), generator=g).tolist()
            tokens[n - args.answer - 1] = 3  # </think>
            rollouts.append(Rollout(prompt, tokens, "", (-8.3 + 0.1 * torch.randn(n, generator=g)).tolist(), "stop",
                                    prompt_index=e))
    return episodes, rollouts


def step(rank: int, world: int, args: argparse.Namespace, shared: bool) -> dict:
    """One timed step (after `args.warmup` untimed ones) of the layout; loss, FLOPs, times, peak RSS."""
    from rntp_megatron.config import RLConfig, build_config, from_dict
    from rntp_megatron.flops import FlopMeter, record_scoring, record_scoring_spans
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import build_optimizer, wrap_ddp
    from rntp_megatron.rewards.scoring import continuation_logprobs
    from rntp_megatron.rl.batch import pack_rollouts, policy_mask, with_global_counts
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.rl.routing_replay import score_policy_tokens
    from rntp_megatron.rl.shared_context import share_context
    from rntp_megatron.runtime import device, init_distributed
    from rntp_megatron.step import train_step

    seq = args.context + args.thought_max + args.answer + 8  # + the prompt template's tokens
    cfg = build_config({"model": {"card": "tiny", "num_layers": args.layers, "hidden_size": args.hidden,
                                  "ffn_hidden_size": args.hidden * 3, "num_attention_heads": 8,
                                  "num_query_groups": 2, "vocab_size": args.vocab, "max_position_embeddings": seq,
                                  "params_dtype": "bfloat16" if args.bf16 else "float32"},
                        "data": {"context_len": args.context, "min_context": 8},
                        "rollout": {"max_new_tokens": args.thought_max + args.answer},
                        "schedule": {"seq_length": seq, "micro_batch_size": args.micro_batch, "lr": 1e-5}})
    init_distributed(cfg.parallel, seed=7)
    policy, reference = build_model(cfg.model, cfg.parallel), build_model(cfg.model, cfg.parallel)
    ddp = wrap_ddp(policy, cfg.parallel)
    optimizer = build_optimizer([ddp], cfg.schedule, cfg.parallel)
    loss = RNTPLoss(from_dict(RLConfig, RL), temperature=1.0, ntp_weight=0.1, vocab_size=args.vocab)
    episodes, rollouts = rollouts_for(args)
    meter = FlopMeter(cfg.model)
    out: dict = {}
    for it in range(args.warmup + 1):
        meter.begin()
        t0, c0 = time.perf_counter(), time.process_time()
        n = len(rollouts)
        batch = pack_rollouts(episodes, rollouts, torch.randn(n), torch.rand(n), [3], seq, 0)
        prompts, conts = [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts]
        if shared:
            batch, layout = share_context(batch, rollouts, args.micro_batch * seq, 0)
            batch = batch.to(device())
            micro, length, mbs = batch.microbatches(1), layout.length, 1
            policy_tokens = policy_mask(batch, "thought_and_answer")
            for model, field in ((reference, "ref_logprobs"), (ddp, "old_logprobs")):
                record_scoring_spans(layout.spans, int(policy_tokens.sum()))
                setattr(batch, field, score_policy_tokens([model], loss, micro, length, 1).float())
            meter.count_train_spans(layout.spans, int((policy_tokens + batch.ntp_mask).clamp(max=1).sum()))
        else:
            length, mbs = seq, args.micro_batch
            for model, field in ((reference, "ref_logprobs"), (ddp, "old_logprobs")):
                logp, _ = continuation_logprobs([model], prompts, conts, mbs, 0, vocab_size=args.vocab)
                full = torch.zeros(n, seq)
                for i, r in enumerate(rollouts):
                    full[i, len(r.prompt_ids) - 1:len(r.prompt_ids) - 1 + len(r.token_ids)] = logp[i, :len(r.token_ids)]
                setattr(batch, field, full)
            batch = batch.to(device())
            read = (policy_mask(batch, "thought_and_answer") + batch.ntp_mask).clamp(max=1)
            meter.count_train([len(p) + len(c) - 1 for p, c in zip(prompts, conts)], read.sum(1).long().tolist())
        batch = with_global_counts(batch, "thought_and_answer")
        scored = time.perf_counter()
        metrics = train_step([ddp], optimizer, loss.forward_step, batch.microbatches(mbs), length, mbs)
        done = time.perf_counter()
        flops = meter.end()
        out = {"loss": metrics["loss"], "time_s": done - t0, "cpu_s": time.process_time() - c0, "scoring_s": scored - t0, "train_s": done - scored,
               "flops": flops["step_flops_train"] + flops["step_flops_scoring"],
               "fed_tokens": int((batch.tokens != 0).sum()) if not shared else int((batch.segment_ids > 0).sum()),
               "rows": batch.num_rows, "row_tokens": length}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--thought-min", type=int, default=32)
    ap.add_argument("--thought-max", type=int, default=256)
    ap.add_argument("--answer", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters (a GPU's setting; tools/gpu_check.py)")
    args = parse_args(ap, smoke={"groups": 1, "G": 4, "context": 48, "thought_min": 4, "thought_max": 16,
                                 "layers": 2, "hidden": 64, "vocab": 512, "micro_batch": 2, "warmup": 0})

    from rntp_megatron.runtime.spawn import run_ranks

    rows = {name: run_ranks(step, 1, args=(args, name == "shared"))[0] for name in ("per-row", "shared")}
    print(f"RL step, {args.groups} groups x G={args.G}, context {args.context}, thoughts {args.thought_min}-"
          f"{args.thought_max} + {args.answer}, {args.layers} layers x {args.hidden}, vocab {args.vocab}")
    print(f"{'layout':<8} {'rows x tokens':>14} {'fed tokens':>10} {'step s':>8} {'CPU s':>8} {'scoring s':>9} "
          f"{'train s':>8} "
          f"{'GFLOP':>8} {'peak RSS MiB':>12} {'loss':>10}")
    for name, r in rows.items():
        print(f"{name:<8} {str(r['rows']) + ' x ' + str(r['row_tokens']):>14} {r['fed_tokens']:>10} "
              f"{r['time_s']:>8.2f} {r['cpu_s']:>8.2f} {r['scoring_s']:>9.2f} {r['train_s']:>8.2f} {r['flops'] / 1e9:>8.2f} "
              f"{r['peak_rss_mib']:>12.0f} {r['loss']:>10.6f}")
    a, b = rows["per-row"], rows["shared"]
    print(f"shared vs per-row: {a['time_s'] / b['time_s']:.2f}x faster (CPU time {a['cpu_s'] / b['cpu_s']:.2f}x), "
          f"{a['flops'] / b['flops']:.2f}x fewer FLOPs, "
          f"peak RSS {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x, loss difference {abs(a['loss'] - b['loss']):.2e}")
    ok = all(math.isfinite(v) for r in rows.values() for v in (r["time_s"], r["flops"], r["loss"]))
    write_json(args.json, "bench_rl_step", [
        {"name": name, "step_s": r["time_s"], "cpu_s": r["cpu_s"], "gflop": r["flops"] / 1e9,
         "peak_mib": r["peak_rss_mib"], "loss": r["loss"], "fed_tokens": r["fed_tokens"]} for name, r in rows.items()],
        args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
