"""`rntp plan`: what an RNTP run costs. For a model card, a cluster, context/thought lengths, a group size and a
token budget of text: steps, generated tokens, rollout vs training FLOPs, and wall time at a stated MFU and
decode throughput; then the memory per GPU of the run's config (memory_plan.py) at its parallel layout.

FLOPs come from rntp_megatron/flops.py, the formulas the trainer logs: each site's context prefilled once for
its group, each thought decoded after it, each rollout row trained (3x forward, logits at the thought). For a
mixture of experts they count the parameters a token goes through (its top-k experts and the router: "active"),
while memory holds all of them ("total"): weights, grads and Adam state take BYTES_PER_PARAM per total parameter.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from rntp_megatron.config import ModelConfig, build_config
from rntp_megatron.flops import (TokenTally, forward_flops, non_embedding_params, rollout_tally,
                                 training_flops)

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, without sparsity).
GPU_PEAK_FLOPS = {"B200": 2.25e15, "H200": 0.989e15, "H100": 0.989e15, "A100": 0.312e15}


@dataclass
class Plan:
    steps: int
    sites: float
    generated_tokens: float
    trained_tokens: float
    rollout_flops: float
    training_flops: float
    rollout_hours: float
    training_hours: float

    @property
    def hours(self) -> float:
        return self.rollout_hours + self.training_hours


# bf16 weights (2) + fp32 grads (4) + fp32 master weights and Adam moments (12), before any sharding
BYTES_PER_PARAM = 18


def total_params(m: ModelConfig) -> float:
    """Every parameter held in memory: all experts, the embedding and (untied) output layer."""
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return non_embedding_params(m, active=False) + embeddings


def make_plan(m: ModelConfig, gpus: int, gpu: str, context_len: int, thought_len: int, group_size: int,
              token_budget: float, sites_per_chunk: int, global_batch_size: int, mfu: float,
              decode_tokens_per_s_per_gpu: float) -> Plan:
    """Costs of RL over `token_budget` text tokens cut into chunks of context_len with sites_per_chunk sites."""
    chunks = token_budget / context_len
    sites = chunks * sites_per_chunk
    generated = sites * group_size * thought_len
    rows = sites * group_size
    trained = rows * (context_len + thought_len)  # every rollout row is forwarded and backpropagated
    group_rows = TokenTally()
    for _ in range(group_size):
        group_rows.add(context_len + thought_len, 0, thought_len)
    rollout_flops = sites * forward_flops(m, rollout_tally([context_len], [[thought_len] * group_size]))
    train_flops = sites * training_flops(m, group_rows)
    peak = GPU_PEAK_FLOPS[gpu] * gpus
    return Plan(
        steps=int(-(-rows // global_batch_size)),
        sites=sites, generated_tokens=generated, trained_tokens=trained,
        rollout_flops=rollout_flops, training_flops=train_flops,
        rollout_hours=generated / (decode_tokens_per_s_per_gpu * gpus) / 3600,
        training_hours=train_flops / (peak * mfu) / 3600,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--card", default="qwen3_8b", help="model card name or YAML path")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPU_PEAK_FLOPS), default="B200")
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--thought-len", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--sites-per-chunk", type=int, default=1)
    parser.add_argument("--token-budget", type=float, default=1e12, help="text tokens the run reads")
    parser.add_argument("--global-batch-size", type=int, default=1024, help="rollouts per optimizer step")
    parser.add_argument("--mfu", type=float, default=0.4, help="training model-FLOP utilisation")
    parser.add_argument("--decode-tps", type=float, default=20000.0, help="generated tokens/s per GPU")
    parser.add_argument("--config", default=None, help="a run's YAML: its model, layout and batch for the memory plan")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the run config, e.g. --set parallel.tensor_model_parallel_size=2")


def run(args: argparse.Namespace) -> int:
    from rntp_megatron.config import load_config
    from rntp_megatron.memory_plan import memory_plan

    cfg = load_config(args.config, args.overrides) if args.config else build_config(
        {"model": {"card": args.card}}, args.overrides)
    m = cfg.model
    p = make_plan(m, args.gpus, args.gpu, args.context_len, args.thought_len, args.group_size, args.token_budget,
                  args.sites_per_chunk, args.global_batch_size, args.mfu, args.decode_tps)
    rows = [
        ("model", f"{args.card} ({non_embedding_params(m) / 1e9:.2f}B non-embedding params per token, "
                  f"{total_params(m) / 1e9:.2f}B in total)"),
        ("training state", f"{total_params(m) * BYTES_PER_PARAM / 2**30:,.0f} GiB ({BYTES_PER_PARAM} B/param), "
                           f"{total_params(m) * BYTES_PER_PARAM / 2**30 / args.gpus:,.1f} GiB/GPU fully sharded"),
        ("cluster", f"{args.gpus} x {args.gpu} ({GPU_PEAK_FLOPS[args.gpu] / 1e15:.2f} PFLOP/s bf16 each)"),
        ("text tokens", f"{args.token_budget:.3g}"),
        ("sites (groups)", f"{p.sites:.3g}"),
        ("optimizer steps", f"{p.steps:,}"),
        ("generated tokens", f"{p.generated_tokens:.3g}"),
        ("trained tokens", f"{p.trained_tokens:.3g}"),
        ("rollout FLOPs", f"{p.rollout_flops:.3g}"),
        ("training FLOPs", f"{p.training_flops:.3g}"),
        ("rollout time", f"{p.rollout_hours:,.0f} h at {args.decode_tps:,.0f} tok/s/GPU"),
        ("training time", f"{p.training_hours:,.0f} h at MFU {args.mfu:.0%}"),
        ("total", f"{p.hours:,.0f} h = {p.hours / 24:,.1f} days"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    p = cfg.parallel
    print(f"\nmemory per GPU at TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size} "
          f"CP={p.context_parallel_size} on {args.gpus} GPUs, micro-batch {cfg.schedule.micro_batch_size} x "
          f"{cfg.schedule.seq_length} tokens ({args.config or 'card ' + args.card}):")
    print(memory_plan(cfg, args.gpus, fused_attention=m.transformer_impl != "local").table())
    return 0
