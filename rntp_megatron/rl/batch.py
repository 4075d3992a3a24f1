"""The training batch the loss hook consumes: [prompt + thought + answer] rows with their masks and log-probs.

Every per-token tensor is in *label* coordinates: position i of a row holds facts about labels[i] =
tokens[i + 1] (the token the model predicts at i). Rows are right-padded to one sequence length; padding has
all masks zero. The step-wide counts (`global_*`) are the same in every micro-batch of a step, on every DP
rank, so the mixed objective weighs its two terms identically however the batch is split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from rntp_megatron.data.episode import Episode
from rntp_megatron.model.attention import SharedContextMask
from rntp_megatron.rollout.engine import Rollout


def sequence_sums(x: torch.Tensor, branch_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """sums[b, K] of x[b, s] over each rollout's positions: K = 1 for plain rows (branch_ids None); for
    shared-context rows column k sums branch k (column 0: the contexts and padding)."""
    if branch_ids is None:
        return x.sum(-1, keepdim=True)
    return x.new_zeros(x.shape).scatter_add_(1, branch_ids, x)


@dataclass
class RLBatch:
    """One (micro-)batch of b rows of length s for `RNTPLoss`."""

    tokens: torch.Tensor  # [b, s] input ids
    position_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s] next token of each position
    thought_mask: torch.Tensor  # [b, s] 1 where the label is a thought token written by the policy (to </think>)
    answer_mask: torch.Tensor  # [b, s] 1 where the label is an answer token written by the policy
    ntp_mask: torch.Tensor  # [b, s] 1 where the label is a chunk (context) token: the next-token loss
    old_logprobs: torch.Tensor  # [b, s] trainer log-probs before the update (at the rollout temperature)
    rollout_logprobs: torch.Tensor  # [b, s] the engine's log-probs of the sampled tokens
    advantages: torch.Tensor  # [b], or [b, s] per token (interleaved episodes: each site's own advantage)
    rewards: torch.Tensor  # [b] (metrics only)
    ref_logprobs: Optional[torch.Tensor] = None  # [b, s] reference policy, for the KL term
    # shared-context rows (rl/shared_context.py): [context | y_1 | ... | y_G] groups per row; None: one rollout a row
    segment_ids: Optional[torch.Tensor] = None  # [b, s] group of each position in its row (0: padding)
    branch_ids: Optional[torch.Tensor] = None  # [b, s] 0 on a group's context, k on the row's k-th rollout
    sequences: Optional[torch.Tensor] = None  # [b] rollouts per row
    global_policy_tokens: float = 0.0  # policy tokens of the whole step (all micro-batches, all DP ranks)
    global_ntp_tokens: float = 0.0  # next-token-loss tokens of the whole step
    global_rows: float = 0.0  # rows of the whole step

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_sequences(self) -> float:
        """Rollouts in the batch: its rows, or what its shared-context rows hold."""
        return float(self.num_rows) if self.sequences is None else self.sequences.sum().item()

    def attention_mask(self) -> Optional[SharedContextMask]:
        """What the model's attention_mask argument gets: None for plain causal rows."""
        return None if self.segment_ids is None else SharedContextMask(self.segment_ids, self.branch_ids)

    def per_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """sequence_sums of x[b, s] over this batch's rollouts."""
        return sequence_sums(x, self.branch_ids)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RLBatch":
        """The batch with fn applied to every tensor field (counts kept)."""
        return dataclasses.replace(self, **{
            f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})

    def rows(self, start: int, stop: int) -> "RLBatch":
        """Rows [start, stop) as a batch with the same step-wide counts."""
        return self._map(lambda t: t[start:stop])

    def to(self, device: torch.device) -> "RLBatch":
        """Every tensor of the batch on `device` (the model's): pack_rollouts builds on the host, the step moves
        the batch once."""
        return self._map(lambda t: t.to(device))

    def microbatches(self, micro_batch_size: int) -> list["RLBatch"]:
        """Consecutive row slices of micro_batch_size rows (b must divide evenly)."""
        if self.num_rows % micro_batch_size:
            raise ValueError(f"{self.num_rows} rows do not split into micro-batches of {micro_batch_size}")
        return [self.rows(i, i + micro_batch_size) for i in range(0, self.num_rows, micro_batch_size)]

    def data_parallel_shard(self, dp_rank: int, dp_size: int) -> "RLBatch":
        """This DP rank's contiguous share of the rows (b must divide by dp_size)."""
        if self.num_rows % dp_size:
            raise ValueError(f"{self.num_rows} rows do not split over {dp_size} data-parallel ranks")
        per = self.num_rows // dp_size
        return self.rows(dp_rank * per, (dp_rank + 1) * per)


def policy_mask(batch: RLBatch, train_on: str) -> torch.Tensor:
    """Tokens the policy loss trains: thought | answer ('thought_and_answer') or thought only ('thought')."""
    if train_on == "thought_and_answer":
        return ((batch.thought_mask + batch.answer_mask) > 0).float()
    if train_on == "thought":
        return (batch.thought_mask > 0).float()
    raise ValueError(f"rl.train_on must be 'thought_and_answer' or 'thought', got {train_on!r} (None: unresolved; "
                     "a RunConfig resolves it from reward.name, config.default_train_on)")


def with_global_counts(batch: RLBatch, train_on: str, group: Optional[dist.ProcessGroup] = None) -> RLBatch:
    """The batch with its step-wide token and row counts: local sums all-reduced over `group` (the DP group)."""
    counts = torch.tensor([policy_mask(batch, train_on).sum().item(), batch.ntp_mask.sum().item(),
                           batch.num_sequences], dtype=torch.float64, device=batch.tokens.device)
    if group is not None:
        dist.all_reduce(counts, group=group)
    return dataclasses.replace(batch, global_policy_tokens=counts[0].item(), global_ntp_tokens=counts[1].item(),
                               global_rows=counts[2].item())


def find_sublist(haystack: Sequence[int], needle: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of `needle` in `haystack` at or after `start`, or -1."""
    n = len(needle)
    for i in range(start, len(haystack) - n + 1):
        if list(haystack[i:i + n]) == list(needle):
            return i
    return -1


def pack_rollouts(episodes: Sequence[Episode], rollouts: Sequence[Rollout], advantages: torch.Tensor,
                  rewards: torch.Tensor, think_close_ids: Sequence[int], seq_length: int, pad_id: int,
                  old_logprobs: Optional[Sequence[Sequence[float]]] = None) -> RLBatch:
    """Rows [prompt + generated][seq_length] with masks: thought = generated tokens through `think_close_ids`,
    answer = the rest (all thought when the tag is missing), ntp = the episode's context inside the prompt.

    rollouts[i] answers episodes[rollouts[i].prompt_index]; old log-probs default to the rollout's
    (on-policy, before any trainer forward). Built on the host (RLBatch.to moves it to the model's device).
    """
    n = len(rollouts)
    if advantages.shape != (n,) or rewards.shape != (n,):
        raise ValueError(f"{n} rollouts but advantages {tuple(advantages.shape)} and rewards {tuple(rewards.shape)}")
    zeros = lambda dtype=torch.float32: torch.zeros(n, seq_length, dtype=dtype, device="cpu")  # noqa: E731
    tokens, labels = zeros(torch.long).fill_(pad_id), zeros(torch.long).fill_(pad_id)
    thought, answer, ntp, old, engine = zeros(), zeros(), zeros(), zeros(), zeros()
    for i, ro in enumerate(rollouts):
        ep = episodes[ro.prompt_index]
        if len(ro.logprobs) != len(ro.token_ids):
            raise ValueError(f"rollout {i}: {len(ro.token_ids)} tokens but {len(ro.logprobs)} log-probs")
        row = list(ro.prompt_ids) + list(ro.token_ids)
        if len(row) > seq_length + 1:
            raise ValueError(f"rollout {i}: prompt {len(ro.prompt_ids)} + generated {len(ro.token_ids)} tokens "
                             f"exceed seq_length + 1 = {seq_length + 1}")
        ids = torch.tensor(row, device="cpu")
        tokens[i, :len(row) - 1] = ids[:-1]
        labels[i, :len(row) - 1] = ids[1:]
        p, g = len(ro.prompt_ids), len(ro.token_ids)
        close = find_sublist(ro.token_ids, think_close_ids)
        n_thought = g if close < 0 else close + len(think_close_ids)
        gen = slice(p - 1, p - 1 + g)  # label positions of the generated tokens
        thought[i, p - 1:p - 1 + n_thought] = 1
        answer[i, p - 1 + n_thought:p - 1 + g] = 1
        engine[i, gen] = torch.tensor(ro.logprobs, dtype=torch.float32, device="cpu")
        old[i, gen] = torch.tensor(old_logprobs[i] if old_logprobs is not None else ro.logprobs, dtype=torch.float32,
                                   device="cpu")
        c = find_sublist(ro.prompt_ids, ep.context_ids)
        if c >= 0 and ep.context_ids:
            # label positions j whose label tokens[j + 1] lies inside the context span [c, c + len)
            ntp[i, max(c - 1, 0):c + len(ep.context_ids) - 1] = 1
    positions = torch.arange(seq_length, device="cpu").unsqueeze(0).expand(n, -1).contiguous()
    return RLBatch(tokens=tokens, position_ids=positions, labels=labels, thought_mask=thought, answer_mask=answer,
                   ntp_mask=ntp, old_logprobs=old, rollout_logprobs=engine, advantages=advantages.float(),
                   rewards=rewards.float())
