"""Routing replay for mixture-of-experts policies (rl.routing_replay), on Megatron-Core's RouterReplay.

A forward-only pass over the step's own training micro-batches computes the old log-probs (the PPO anchor, in
place of the rollout's: slime's and verl's recompute) with every TopKRouter in RECORD mode, and keeps each MoE
layer's top-k expert indices[tokens, k] with its micro-batch. The training forward then runs the same
micro-batches with the routers in REPLAY_FORWARD mode on those indices: each token goes to the experts the
recording pass chose, while the gate weights softmax(logits at those experts) and their gradient come from the
current router. Same micro-batches means same shapes and token order, so the indices line up token for token.

The metric `moe/routing_mismatch` is the fraction of (token, layer) routing decisions whose expert set in the
training forward's own top-k (what the router would have chosen; replay still computes it from the same scores)
differs from the recording pass's. Tokens after a row's last labelled position (padding) are not counted: they
reach no log-prob the loss reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from rntp_megatron.rl.batch import RLBatch, policy_mask
from rntp_megatron.rl.loss import RNTPLoss, output_layer_input
from rntp_megatron.runtime import device
from rntp_megatron.step import forward_backward

ForwardStep = Callable[[Iterator[Any], torch.nn.Module], Any]


class ObservedRouterReplay(RouterReplay):
    """Megatron's RouterReplay that, while replaying, also keeps the top-k the router would have chosen itself."""

    def __init__(self) -> None:
        super().__init__()
        self.natural_topk_idx: Optional[torch.Tensor] = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        """(probs, indices)[tokens, k] as Megatron's; under REPLAY_FORWARD also the router's own top-k of `scores`."""
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
            self.natural_topk_idx = default_compute_topk(scores, topk, num_groups, group_topk)[1]
        return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)


@dataclass
class Routed:
    """A training micro-batch and, per MoE layer of this rank, the experts[tokens, k] its recording pass chose."""

    batch: RLBatch
    topk: list[torch.Tensor] = field(default_factory=list)


def router_order(x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """x[b, s, ...] as [tokens, ...] in the router's order: [s, b] flattened (this TP rank's s-chunk under
    sequence parallelism)."""
    x = x.transpose(0, 1)
    if sequence_parallel:
        x = x.chunk(parallel_state.get_tensor_model_parallel_world_size())[
            parallel_state.get_tensor_model_parallel_rank()]
    return x.reshape(-1, *x.shape[2:])


def fed_tokens(batch: RLBatch, sequence_parallel: bool) -> torch.Tensor:
    """bool[tokens] in the router's order: the positions at or before a row's last labelled one."""
    labelled = (batch.thought_mask + batch.answer_mask + batch.ntp_mask) > 0
    return router_order(labelled.flip(1).cumsum(1).flip(1) > 0, sequence_parallel)


def differing_decisions(natural: list[torch.Tensor], recorded: list[torch.Tensor], fed: torch.Tensor
                        ) -> torch.Tensor:
    """[#(token, layer) whose expert sets differ, #(token, layer)] over the fed tokens; sets, so order is ignored."""
    differ = torch.zeros((), dtype=torch.float64, device=fed.device)
    for a, b in zip(natural, recorded):
        differ += ((a.sort(1).values != b.sort(1).values).any(1) & fed).sum()
    return torch.stack([differ, fed.sum().double() * len(natural)])


def _logprob_data(loss: RNTPLoss, batch: RLBatch, head: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Forward-only 'loss': none; the policy tokens' log-probs[b, s] (0 elsewhere) as data."""
    logp, _ = loss.policy_logprobs(head, batch)
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    return zero, zero.to(torch.int), {"logp": logp.detach()}


def logprob_step(loss: RNTPLoss, data_iterator: Iterator[RLBatch], model: torch.nn.Module):
    """Forward-only step: the model on one micro-batch without autograd, and the loss that returns its log-probs."""
    batch = next(data_iterator)
    with torch.no_grad():
        head = model(batch.tokens, batch.position_ids, batch.attention_mask(), output_processor=output_layer_input)
    return head, partial(_logprob_data, loss, batch)


def score_policy_tokens(chunks: list[torch.nn.Module], loss: RNTPLoss, microbatches: list[RLBatch],
                        seq_length: int, micro_batch_size: int) -> torch.Tensor:
    """logp[rows, s] of the policy tokens of every micro-batch (0 elsewhere) from a forward-only pass of `chunks`
    (the policy for the off-policy anchor, the reference for the KL term), on every pipeline stage."""
    out = forward_backward(chunks, partial(logprob_step, loss), microbatches, len(microbatches), seq_length,
                           micro_batch_size, forward_only=True)
    first = microbatches[0].tokens
    # float64 on every stage: the stages before the last do not know the model's dtype
    logp = torch.empty(sum(mb.num_rows for mb in microbatches), first.shape[1], dtype=torch.float64,
                       device=first.device)
    if parallel_state.is_pipeline_last_stage():
        logp = torch.cat([o["logp"] for o in out]).double()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        logp = logp.contiguous()
        dist.broadcast(logp, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return logp


class RoutingReplay:
    """Record and replay the experts of every TopKRouter of one policy model (its chunks on this rank).

    Each router gets an ObservedRouterReplay where TransformerConfig.moe_enable_routing_replay would give it a
    plain RouterReplay: the same hook in Megatron's top-k, plus the router's own choice for the metric. Only this
    model's routers are driven (not Megatron's process-wide list, which holds every model built with replay)."""

    def __init__(self, model: torch.nn.Module) -> None:
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        if not routers:
            raise ValueError("routing replay needs a mixture-of-experts model: this one has no TopKRouter")
        self.replays = []
        self.layers = [r.layer_number - 1 for r in routers]  # global (0-based) layer of each, as HF numbers them
        for router in routers:  # the router reads its replay object at every routing call
            router.router_replay = ObservedRouterReplay()
            self.replays.append(router.router_replay)
        self.sequence_parallel = bool(model.config.sequence_parallel)
        self._counts = torch.zeros(2, dtype=torch.float64, device=device())

    def _act(self, action: Optional[RouterReplayAction], topk: Optional[list[torch.Tensor]] = None) -> None:
        """Every router to `action` (None: route freely), fed `topk` per layer to replay; old indices dropped."""
        for i, r in enumerate(self.replays):
            r.clear_indices()
            r.natural_topk_idx = None
            if action is None:
                r.clear_router_replay_action()
            else:
                r.set_router_replay_action(action)
            if topk is not None:
                r.set_target_indices(topk[i])

    def recording(self, forward_step: ForwardStep) -> ForwardStep:
        """forward_step over Routed items: the routers record, and each item keeps its micro-batch's experts."""
        def step(data_iterator: Iterator[Routed], model: torch.nn.Module):
            item = next(data_iterator)
            self._act(RouterReplayAction.RECORD)
            try:
                out = forward_step(iter([item.batch]), model)
                item.topk = [r.get_recorded_indices() for r in self.replays]
            finally:
                self._act(None)  # the rollout engine shares these routers: never leave an action set
            return out
        return step

    def replaying(self, forward_step: ForwardStep) -> ForwardStep:
        """forward_step over Routed items: the routers replay each item's recorded experts; the decisions the
        routers would have made differently are counted for mismatch()."""
        def step(data_iterator: Iterator[Routed], model: torch.nn.Module):
            item = next(data_iterator)
            self._act(RouterReplayAction.REPLAY_FORWARD, item.topk)
            try:
                out = forward_step(iter([item.batch]), model)
                natural = [r.natural_topk_idx for r in self.replays]
                self._counts += differing_decisions(natural, item.topk, fed_tokens(item.batch, self.sequence_parallel))
            finally:
                self._act(None)
            return out
        return step

    def record(self, chunks: list[torch.nn.Module], loss: RNTPLoss, microbatches: list[RLBatch], seq_length: int,
               micro_batch_size: int) -> list[Routed]:
        """The recording pass: each micro-batch with old_logprobs = this pass's log-probs on the policy's tokens,
        and its experts per MoE layer."""
        items = [Routed(mb) for mb in microbatches]
        out = forward_backward(chunks, self.recording(partial(logprob_step, loss)), items, len(items), seq_length,
                               micro_batch_size, forward_only=True)
        for item, data in zip(items, out):
            policy = policy_mask(item.batch, loss.rl.train_on) > 0
            item.batch = dataclasses.replace(item.batch, old_logprobs=torch.where(policy, data["logp"],
                                                                                  item.batch.old_logprobs))
        return items

    def mismatch(self) -> float:
        """moe/routing_mismatch of the replayed forwards since the last call, over all ranks (a collective)."""
        counts, self._counts = self._counts, torch.zeros_like(self._counts)
        dist.all_reduce(counts)
        return (counts[0] / counts[1].clamp(min=1)).item()
