"""Step time of the RNTP loss hook vs a plain next-token step on the same tokens and model, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_rl_loss.py --repeats 7

Both run megatron's get_forward_backward_func over the same DDP-wrapped GPTModel and micro-batches; the plain
step uses the model's own fused vocab-parallel cross-entropy (labels=...) on every token, the RNTP step
rl/loss.RNTPLoss with temperature, KL, TIS and entropy metrics on, once with the thought+answer tokens at the end
of each row as policy tokens (the rest is context) and once with every token a policy token (the plain step's
token count). The three alternate, so drift on a shared machine hits all alike; each is timed in process CPU
time (robust to other processes on a shared machine, the run being one thread) and in wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import parse_args, write_json  # noqa: E402

SMOKE = {"repeats": 1, "layers": 1, "hidden": 64, "vocab": 512, "seq": 32, "micro_batch": 2, "policy_tokens": 8}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--policy-tokens", type=int, default=96, help="thought+answer tokens at the end of each row")
    args = parse_args(ap, SMOKE)

    from rntp_megatron.config import RLConfig, build_config, from_dict
    from rntp_megatron.lm_loss import lm_batch, lm_forward_step
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import wrap_ddp
    from rntp_megatron.rl.batch import RLBatch, with_global_counts
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.step import forward_backward

    cfg = build_config({"model": {"card": "tiny", "num_layers": args.layers, "hidden_size": args.hidden,
                                  "ffn_hidden_size": args.hidden * 11 // 4, "num_attention_heads": 8,
                                  "num_query_groups": 4, "vocab_size": args.vocab,
                                  "max_position_embeddings": args.seq}})
    rl = from_dict(RLConfig, {"kl_coef": 0.01, "tis_cap": 2.0, "train_on": "thought_and_answer"})  # the loss alone: ref log-probs come in the batch
    init_distributed(cfg.parallel)
    ddp = wrap_ddp(build_model(cfg.model, cfg.parallel), cfg.parallel)
    n = args.micro_batch * args.micro_batches
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, args.vocab, (n, args.seq + 1), generator=g)
    plain = [lm_batch(rows[i:i + args.micro_batch]) for i in range(0, n, args.micro_batch)]
    old = -10.4 + 0.1 * torch.randn(n, args.seq, generator=g)
    advantages, rewards = torch.randn(n, generator=g), torch.rand(n, generator=g)

    def rl_microbatches(policy_tokens: int) -> list[RLBatch]:
        """The plain step's rows as RL micro-batches whose last `policy_tokens` tokens are the policy's."""
        policy = torch.zeros(n, args.seq)
        policy[:, args.seq - policy_tokens:] = 1
        batch = with_global_counts(RLBatch(
            tokens=rows[:, :-1], position_ids=torch.arange(args.seq).expand(n, -1).contiguous(),
            labels=rows[:, 1:], thought_mask=policy, answer_mask=torch.zeros_like(policy), ntp_mask=1 - policy,
            old_logprobs=old, rollout_logprobs=old + 0.05, ref_logprobs=old - 0.05, advantages=advantages,
            rewards=rewards), rl.train_on)
        return batch.microbatches(args.micro_batch)

    rntp = RNTPLoss(rl, temperature=0.7)
    plain_name = "plain next-token (megatron CE, all tokens)"
    steps = {plain_name: (lm_forward_step, plain),
             f"RNTP loss hook ({args.policy_tokens} policy tokens a row)":
                 (rntp.forward_step, rl_microbatches(args.policy_tokens)),
             f"RNTP loss hook (all {args.seq} tokens policy tokens)": (rntp.forward_step, rl_microbatches(args.seq))}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    wall: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.repeats + 1):  # the first round warms up
        for name, (forward_step, mbs) in steps.items():
            ddp.zero_grad_buffer()
            c0, w0 = time.process_time(), time.perf_counter()
            forward_backward([ddp], forward_step, mbs, len(mbs), args.seq, args.micro_batch)
            if rep:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    destroy_distributed()
    base_med, base_min = statistics.median(cpu[plain_name]), min(cpu[plain_name])
    print(f"layers={args.layers} hidden={args.hidden} vocab={args.vocab} seq={args.seq} "
          f"micro_batch={args.micro_batch} x {args.micro_batches}, {args.repeats} repeats, "
          f"threads={torch.get_num_threads()}")
    print("| step | median CPU s | min CPU s | median wall s | ratio (median CPU) | ratio (min CPU) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in steps:
        med, low = statistics.median(cpu[name]), min(cpu[name])
        rows.append({"name": name, "median_cpu_s": med, "min_cpu_s": low,
                     "median_wall_s": statistics.median(wall[name]), "ratio_median_cpu": med / base_med,
                     "ratio_min_cpu": low / base_min})
        print(f"| {name} | {med:.3f} | {low:.3f} | {rows[-1]['median_wall_s']:.3f} | {med / base_med:.3f} "
              f"| {low / base_min:.3f} |")
    write_json(args.json, "bench_rl_loss", rows, args, threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
