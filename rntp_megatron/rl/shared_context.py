"""Shared-context rows: a group's G rollouts as one sequence [context | y_1 | ... | y_G], several groups a row.

A group's rollouts share their prompt. Per-row training feeds it G times; here the group's first c tokens (the
prompt but its last token) are fed once, then each rollout's branch y_j = [prompt[-1], generated[:-1]] whose
positions continue from c. A branch attends to the context and causally to itself, never to another branch
(model/attention.SharedContextMask), so every label's log-prob equals the per-row one: the label at per-row
column t of rollout j sits at the group's column t when t < c (the context's labels, the next-token term's,
counted once per group instead of G times) and at c + (branch j's offset) + (t - c) otherwise.

Groups are placed first-fit decreasing (data/packing.py) into rows of `row_length` tokens (the trainer's
micro_batch_size x seq_length: a micro-batch is one row, by tokens), raised to the longest group when one is
longer and cut to the fullest row; padding sits only at the tail of a row. Every per-token tensor of a per-row RLBatch
moves to the packed layout by one scatter (`SharedLayout.pack`), so everything scored on the per-row layout
(rewards, masks, engine log-probs) carries over, and the scoring passes (old log-probs, reference) run on the
packed rows themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from rntp_megatron.config import RunConfig
from rntp_megatron.data.packing import pack_sequences
from rntp_megatron.model.moe import expert_parallel_max
from rntp_megatron.rl.batch import RLBatch
from rntp_megatron.rollout.engine import Rollout
from rntp_megatron.runtime import device


@dataclass
class SharedLayout:
    """Where per-row label column t of rollout i sits in the packed rows: row[i], column index[i, t] (-1: none)."""

    row: torch.Tensor  # [N]
    context: torch.Tensor  # [N] the shared context's length c of each rollout's group
    index: torch.Tensor  # [N, S]
    rows: int
    length: int
    spans: list[tuple[int, int]]  # FLOP accounting: (fed tokens, cached past) of each context and branch

    def attention_ids(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """segment_ids and branch_ids[rows, length] of model/attention.SharedContextMask, groups[N] the group
        (prompt_index) of each sequence: segment = group + 1 (0: padding), branch k = the row's k-th sequence."""
        n, s = self.index.shape
        in_row = torch.zeros(n, dtype=torch.long, device="cpu")
        for r in range(self.rows):
            members = (self.row == r).nonzero().squeeze(1)
            in_row[members] = torch.arange(1, members.numel() + 1, device="cpu")
        branch = torch.where(torch.arange(s, device="cpu") < self.context[:, None], 0, in_row[:, None].expand(n, s))
        return self.pack((groups[:, None] + 1).expand(n, s)), self.pack(branch)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """x[N, S] (per-row label coordinates) -> [rows, length]; shared context columns take any member's value
        (they are equal across a group)."""
        valid = self.index >= 0
        flat = (self.row[:, None] * self.length + self.index)[valid]
        out = x.new_zeros(self.rows * self.length)
        return out.index_put_((flat,), x[valid]).view(self.rows, self.length)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def shared_layout(rollouts: Sequence[Rollout], row_length: int, length_multiple: int = 1) -> SharedLayout:
    """The packed placement of rollouts grouped by prompt_index: context c = the group's common prefix, at most
    its shortest prompt less one token; groups placed first-fit decreasing in rows of max(row_length, longest
    group) tokens, cut to the fullest row's length rounded up to a multiple of length_multiple. Under expert
    parallelism every rank of the EP group gets the group's most rows and longest length (empty rows and columns
    are padding): its forwards are collectives that need as many micro-batches, and as many tokens, on each rank."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.prompt_index, []).append(i)
    full = [list(r.prompt_ids) + list(r.token_ids) for r in rollouts]
    contexts, sizes = [], []
    for members in groups.values():
        c = min(len(rollouts[i].prompt_ids) for i in members) - 1
        c = min([c] + [_common_prefix(full[members[0]], full[i]) for i in members[1:]])
        contexts.append(c)
        sizes.append(c + sum(len(full[i]) - 1 - c for i in members))
    placement = pack_sequences([[0] * n for n in sizes], max([row_length] + sizes), 0).placement
    # rows end at the fullest row's last token: a batch smaller than one row pays no padding up to row_length
    length = max(start + n for (_, start), n in zip(placement, sizes))
    length = -(-length // length_multiple) * length_multiple
    n, s = len(rollouts), max(len(f) for f in full) - 1
    row, context = torch.zeros(n, dtype=torch.long, device="cpu"), torch.zeros(n, dtype=torch.long, device="cpu")
    index = torch.full((n, s), -1, dtype=torch.long, device="cpu")
    spans: list[tuple[int, int]] = []
    for (r, start), c, members in zip(placement, contexts, groups.values()):
        spans.append((c, 0))
        at = start + c
        for i in members:
            b = len(full[i]) - 1 - c
            row[i], context[i] = r, c
            index[i, :c] = torch.arange(start, start + c, device="cpu")
            index[i, c:c + b] = torch.arange(at, at + b, device="cpu")
            spans.append((b, c))
            at += b
    rows = expert_parallel_max(1 + max(r for r, _ in placement), device())
    length = expert_parallel_max(length, device())
    return SharedLayout(row, context, index, rows, length, spans)


def share_context(batch: RLBatch, rollouts: Sequence[Rollout], row_length: int, pad_id: int,
                  length_multiple: int = 1) -> tuple[RLBatch, SharedLayout]:
    """The per-row batch of `rollouts` (row i = rollout i) as shared-context rows, and their layout."""
    layout = shared_layout(rollouts, row_length, length_multiple)
    s = layout.index.shape[1]

    def pack(x: torch.Tensor) -> torch.Tensor:
        return layout.pack(x[:, :s])

    n = len(rollouts)
    segment_ids, branch_ids = layout.attention_ids(torch.tensor([r.prompt_index for r in rollouts], device="cpu"))
    advantages = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand(n, s)
    fields = {f.name: pack(getattr(batch, f.name)) for f in dataclasses.fields(batch)
              if f.name in ("thought_mask", "answer_mask", "ntp_mask", "old_logprobs", "rollout_logprobs")}
    tokens, labels = pack(batch.tokens), pack(batch.labels)
    real = layout.pack(torch.ones(n, s, dtype=torch.bool, device="cpu"))
    tokens[~real], labels[~real] = pad_id, pad_id

    def per_row(x: torch.Tensor) -> torch.Tensor:  # a per-rollout value summed over each packed row, in x's dtype
        return torch.zeros(layout.rows, dtype=x.dtype, device="cpu").index_add_(0, layout.row, x.cpu())

    positions = pack(torch.arange(s, device="cpu").expand(n, s))
    packed = RLBatch(tokens=tokens, labels=labels, position_ids=positions, **fields,
                     advantages=pack(advantages), rewards=per_row(batch.rewards),
                     ref_logprobs=None if batch.ref_logprobs is None else pack(batch.ref_logprobs),
                     segment_ids=segment_ids, branch_ids=branch_ids,
                     sequences=per_row(torch.ones(n, device="cpu")), global_policy_tokens=batch.global_policy_tokens,
                     global_ntp_tokens=batch.global_ntp_tokens, global_rows=batch.global_rows)
    return packed, layout


def shared_context_fallback(cfg: RunConfig) -> Optional[str]:
    """Why a run with rl.shared_context on trains one rollout a row instead (None: shared-context rows apply)."""
    from rntp_megatron.model.spec import use_transformer_engine
    from rntp_megatron.rl.rollout_routing import routed_experts

    if use_transformer_engine(cfg.model):
        return "Transformer Engine's layer spec attends through its own kernels, which take no shared-prefix mask"
    if routed_experts(cfg) is not None:
        return ("moe/rollout_routing_mismatch compares the server's experts per rollout row "
                "(rollout.sglang.routed_experts)")
    return None
