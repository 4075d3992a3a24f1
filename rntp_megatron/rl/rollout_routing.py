"""moe/rollout_routing_mismatch: the routing of the rollout engine (an SGLang server) against the trainer's.

With rl.routing_replay on an MoE model served by SGLang, each rollout carries the experts the server routed the
position predicting each of its generated tokens to (Rollout.routed_experts, int32[generated, layers, k]). The
metric is the fraction of (generated token, layer) decisions whose top-k expert set differs from the one the
trainer's recording pass (rl/routing_replay.py) chose at the same position: the row position p - 1 + j of a
rollout with a prompt of p tokens predicts its generated token j (RLBatch's label coordinates), and SGLang's
position t feeds the same token as the trainer's position t. Layers pair by global number: SGLang's layer i is
Megatron's layer_number i + 1, wherever the pipeline stage holding it is. Without rl.routing_replay there is no
recording of the trainer's routing to compare with, so the metric needs it (docs/config.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from rntp_megatron.config import RunConfig
from rntp_megatron.rl.routing_replay import Routed, differing_decisions, router_order
from rntp_megatron.rollout.engine import Rollout
from rntp_megatron.runtime import device


def routed_experts(cfg: RunConfig) -> Optional[tuple[int, int]]:
    """(layers, k) of the routed experts SGLang rollouts carry for the metric; None when the run compares none."""
    wanted = cfg.rl.routing_replay and cfg.rollout.engine == "sglang" and cfg.rollout.sglang.routed_experts
    return (cfg.model.num_layers, cfg.model.moe_router_topk) if wanted else None


def rollout_experts(rollouts: Sequence[Rollout], seq_length: int, layers: Sequence[int],
                    on: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts int32[b, s, len(layers), k], known bool[b, s]): rollout i's experts of its generated token j at
    row position p - 1 + j (the position predicting it), for the global layer indices `layers`; -1 and False at
    the prompt, the padding and every position of a rollout without routed experts."""
    k = next((r.routed_experts.shape[2] for r in rollouts if r.routed_experts is not None), 1)
    experts = torch.full((len(rollouts), seq_length, len(layers), k), -1, dtype=torch.int32)
    known = torch.zeros(len(rollouts), seq_length, dtype=torch.bool)
    index = torch.tensor(list(layers), dtype=torch.long)
    for i, r in enumerate(rollouts):
        if r.routed_experts is None:
            continue
        start = len(r.prompt_ids) - 1
        g = min(r.routed_experts.shape[0], seq_length - start)
        experts[i, start:start + g] = r.routed_experts[:g].index_select(1, index)
        known[i, start:start + g] = True
    return experts.to(on or device()), known.to(on or device())


def rollout_routing_counts(items: Sequence[Routed], rollouts: Sequence[Rollout], layers: Sequence[int],
                           sequence_parallel: bool) -> torch.Tensor:
    """[#differing, #compared] (token, layer) decisions of this rank: each micro-batch's rollouts (rows in order)
    against its recorded experts, per layer in the router order of the recording."""
    counts = torch.zeros(2, dtype=torch.float64, device=device())
    row = 0
    for item in items:
        b, s = item.batch.tokens.shape
        experts, known = rollout_experts(rollouts[row:row + b], s, layers, item.batch.tokens.device)
        row += b
        per_layer = [router_order(experts[:, :, j], sequence_parallel) for j in range(len(layers))]
        counts += differing_decisions(per_layer, item.topk, router_order(known, sequence_parallel)).to(counts.device)
    return counts


def rollout_routing_mismatch(items: Sequence[Routed], rollouts: Sequence[Rollout], layers: Sequence[int],
                             sequence_parallel: bool) -> Optional[float]:
    """moe/rollout_routing_mismatch over all ranks (a collective); None when no rollout carried routed experts."""
    counts = rollout_routing_counts(items, rollouts, layers, sequence_parallel)
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item() if counts[1] > 0 else None
