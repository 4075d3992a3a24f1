"""Trainer-side scoring for likelihood rewards: log-probs of true continuations after given prefixes, batched,
forward-only through megatron's get_forward_backward_func (so it runs under TP and PP like training does).

The trainer scores [context, thought] prefixes with the policy and [context] prefixes with the baseline model
(rewards/baseline.py); rewards/likelihood.py turns the two into loglik, info_gain, prob or vrcli.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_model_config

from rntp_megatron.flops import record_scoring, record_scoring_spans
from rntp_megatron.model.moe import expert_parallel_max
from rntp_megatron.rl.logprobs import mask_padded_vocab, vocab_parallel_logprobs
from rntp_megatron.runtime import device
from rntp_megatron.step import forward_backward


def _logprob_loss(labels: torch.Tensor, temperature: float, vocab_size: Optional[int], logits: torch.Tensor):
    """Forward-only 'loss': no loss, the log-probs of labels[b, s] under logits[b, s, V/tp] as data."""
    logp, _ = vocab_parallel_logprobs(mask_padded_vocab(logits, vocab_size), labels, temperature)
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    return zero, zero.to(torch.int), {"logp": logp.detach()}


def _logprob_forward_step(temperature: float, vocab_size: Optional[int], data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    return output, partial(_logprob_loss, batch["labels"], temperature, vocab_size)


def continuation_logprobs(chunks: list[torch.nn.Module], prefixes: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], micro_batch_size: int, pad_id: int = 0,
                          temperature: float = 1.0, length_multiple: int = 1, vocab_size: Optional[int] = None,
                          groups: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logp[N, K] = log p(continuations[i][k] | prefixes[i], continuations[i][:k]) and mask[N, K] (K = longest
    continuation), on the host, on every rank of the pipeline. Rows are right-padded to one length (a multiple of
    `length_multiple`, and of TP under sequence parallelism; the longest of the EP group's ranks under expert
    parallelism) and N to a multiple of micro_batch_size. With `groups[N]`, the sequences of one group share
    their common prefix in shared-context rows of micro_batch_size x the longest sequence (rl/shared_context.py;
    under expert parallelism as many rows, as long, on every rank of the EP group)."""
    n = len(prefixes)
    if n != len(continuations) or n == 0:
        raise ValueError(f"need as many continuations as prefixes (> 0), got {n} and {len(continuations)}")
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token (the first continuation token is predicted from it)")
    config = get_model_config(chunks[0])
    if config.sequence_parallel:  # the embedding scatters the sequence over TP: every caller needs this
        length_multiple = math.lcm(length_multiple, config.tensor_model_parallel_size)
    rows = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
    if groups is not None:
        return _shared_continuation_logprobs(chunks, prefixes, continuations, groups, micro_batch_size, pad_id,
                                             temperature, length_multiple, vocab_size)
    record_scoring([len(p) for p in prefixes], [len(c) for c in continuations])
    length = expert_parallel_max(max(len(r) for r in rows) - 1, next(chunks[0].parameters()).device)
    length = -(-length // length_multiple) * length_multiple
    padded_n = -(-n // micro_batch_size) * micro_batch_size
    ids = torch.full((padded_n, length + 1), pad_id, dtype=torch.long, device="cpu")
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, device="cpu")
    ids = ids.to(device())
    positions = torch.arange(length, device=ids.device).expand(micro_batch_size, length).contiguous()
    microbatches = [{"tokens": ids[i:i + micro_batch_size, :-1], "labels": ids[i:i + micro_batch_size, 1:],
                     "position_ids": positions} for i in range(0, padded_n, micro_batch_size)]
    out = forward_backward(chunks, partial(_logprob_forward_step, temperature, vocab_size), microbatches,
                           len(microbatches), length, micro_batch_size, forward_only=True)
    all_logp = _gathered(out, padded_n, length, ids.device)
    k_max = max(len(c) for c in continuations)
    logp, mask = torch.zeros(n, k_max, device="cpu"), torch.zeros(n, k_max, device="cpu")
    for i, (p, c) in enumerate(zip(prefixes, continuations)):
        logp[i, :len(c)] = all_logp[i, len(p) - 1:len(p) - 1 + len(c)]
        mask[i, :len(c)] = 1
    return logp, mask


def _gathered(out: list[dict], rows: int, length: int, dev: torch.device) -> torch.Tensor:
    """The forward-only pass's logp[rows, length] on the host, broadcast from the last pipeline stage."""
    all_logp = torch.empty(rows, length, dtype=torch.float32, device=dev)
    if parallel_state.is_pipeline_last_stage():
        all_logp = torch.cat([o["logp"] for o in out]).float()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(all_logp, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return all_logp.cpu()


def _shared_continuation_logprobs(chunks: list[torch.nn.Module], prefixes: Sequence[Sequence[int]],
                                  continuations: Sequence[Sequence[int]], groups: Sequence[int],
                                  micro_batch_size: int, pad_id: int, temperature: float, length_multiple: int,
                                  vocab_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """continuation_logprobs on shared-context rows: each group's common prefix fed once."""
    from rntp_megatron.model.attention import SharedContextMask
    from rntp_megatron.rl.shared_context import shared_layout
    from rntp_megatron.rollout.engine import Rollout

    seqs = [Rollout(list(p), list(c), "", [], "", prompt_index=g) for p, c, g in zip(prefixes, continuations, groups)]
    longest = max(len(p) + len(c) - 1 for p, c in zip(prefixes, continuations))
    layout = shared_layout(seqs, micro_batch_size * longest, length_multiple)
    n, s = layout.index.shape
    full = torch.full((n, s + 1), pad_id, dtype=torch.long, device="cpu")
    for i, (p, c) in enumerate(zip(prefixes, continuations)):
        full[i, :len(p) + len(c)] = torch.tensor(list(p) + list(c), device="cpu")
    record_scoring_spans(layout.spans, sum(len(c) for c in continuations))
    segment_ids, branch_ids = layout.attention_ids(torch.tensor(list(groups), device="cpu"))
    tokens, labels = layout.pack(full[:, :-1]), layout.pack(full[:, 1:])
    positions = layout.pack(torch.arange(s, device="cpu").expand(n, s))
    dev = device()
    microbatches = [{"tokens": tokens[r:r + 1].to(dev), "labels": labels[r:r + 1].to(dev),
                     "position_ids": positions[r:r + 1].to(dev),
                     "attention_mask": SharedContextMask(segment_ids[r:r + 1].to(dev), branch_ids[r:r + 1].to(dev))}
                    for r in range(layout.rows)]
    out = forward_backward(chunks, partial(_logprob_forward_step, temperature, vocab_size), microbatches,
                           len(microbatches), layout.length, 1, forward_only=True)
    packed = _gathered(out, layout.rows, layout.length, dev)
    k_max = max(len(c) for c in continuations)
    logp, mask = torch.zeros(n, k_max, device="cpu"), torch.zeros(n, k_max, device="cpu")
    for i, (p, c) in enumerate(zip(prefixes, continuations)):
        cols = layout.index[i, len(p) - 1:len(p) - 1 + len(c)]
        logp[i, :len(c)] = packed[layout.row[i], cols]
        mask[i, :len(c)] = 1
    return logp, mask
