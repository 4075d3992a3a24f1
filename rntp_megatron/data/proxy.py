"""The proxy scorer behind entropy / logprob_window site selection: per-token entropy and log-prob arrays of
chunks under a frozen GPTModel at the trainer's TP/PP layout, forward-only through megatron's schedule.

entropy[t] is the top-k renormalised entropy of p(. | x_<t) and logprob[t] = log p(x_t | x_<t) (index 0: NaN).
Under TP each rank holds a vocabulary slice: its top-k are all-gathered, and the global top-k are the top-k of
those tp * k values, so the entropy is exact. The last pipeline stage computes the arrays; they are broadcast
to every stage and then from the first TP rank, so every rank of a model-parallel group holds the same bits
(the sites drawn from them must agree). A document is scored in one call, so a resumed stream that re-reads it
gets the same arrays and draws the same sites.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from rntp_megatron.data.sites import topk_entropy
from rntp_megatron.flops import record_scoring, record_scoring_with
from rntp_megatron.rl.logprobs import mask_padded_vocab, vocab_parallel_logprobs
from rntp_megatron.step import forward_backward


def parallel_topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """topk_entropy over the whole vocabulary from this TP rank's slice logits[..., V/tp] -> [...] (float64)."""
    top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values.double()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(top) for _ in range(tp)]
        dist.all_gather(parts, top.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        top = torch.cat(parts, dim=-1)
    return topk_entropy(top, k)


def _score_loss(labels: torch.Tensor, vocab_size: int, top_k: int, logits: torch.Tensor):
    """Forward-only 'loss': entropy[b, s] of the prediction at each position and logprob[b, s] of labels."""
    logits = mask_padded_vocab(logits.float(), vocab_size)
    logp, _ = vocab_parallel_logprobs(logits, labels)
    scores = {"entropy": parallel_topk_entropy(logits, top_k).detach(), "logprob": logp.detach().double()}
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), scores


def _score_forward_step(vocab_size: int, top_k: int, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, partial(_score_loss, batch["labels"], vocab_size, top_k)


def share_over_model_parallel(t: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's `t`, then TP rank 0's, on every rank of the model-parallel group (in place)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(t, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return t


class ProxyScorer:
    """Per-token (entropy, logprob) arrays of chunks under `model` (one GPTModel stage, or the policy's DDP
    chunk); only the tokenizer's `vocab_size` ids count (megatron's vocab padding is masked out)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, top_k: int = 16, pad_id: int = 0,
                 micro_batch_size: int = 1, length_multiple: int = 1, card: Optional[Any] = None) -> None:
        self.model, self.vocab_size, self.top_k, self.pad_id = model, vocab_size, top_k, pad_id
        self.micro_batch_size, self.length_multiple = micro_batch_size, length_multiple
        self.card = card  # the model's ModelConfig when it is not the policy's card (its FLOPs are counted by it)

    def score(self, chunks: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each chunk x[n]: (entropy[n], logprob[n]) as float64, position 0 NaN. Collective over the
        model-parallel group: every rank passes the same chunks. Rows are right-padded (causal attention
        keeps padding out of real positions) to a multiple of length_multiple, their number to a multiple of
        micro_batch_size.

        Under expert parallelism a forward is also a collective of the EP group (the MoE dispatcher gathers every
        rank's tokens), while each data-parallel rank scores documents of its own, as many and as long as they
        are: each call is a round of the group (`_round`) in which every rank forwards the same shape, the
        largest of the round's calls, its own chunks padded to it (or only padding: a rank in `finish`)."""
        if not chunks:
            return []
        # forward(n - 1, 0, n - 1) a chunk: its last token is only a label (flops.py's scoring convention)
        if self.card is None:
            record_scoring([1] * len(chunks), [len(c) - 1 for c in chunks])
        else:
            record_scoring_with(self.card, [1] * len(chunks), [len(c) - 1 for c in chunks])
        rows, width = self._shape(chunks)
        if parallel_state.get_expert_model_parallel_world_size() > 1:
            _, rows, width = self._round(rows, width)
        return self._forward(chunks, rows, width)

    def finish(self) -> None:
        """Under expert parallelism: take part in the EP group's scoring rounds, with padding, until every rank of
        the group has called finish (the data of a step is then built on all of them); nothing at EP1."""
        if parallel_state.get_expert_model_parallel_world_size() == 1:
            return
        while True:
            active, rows, width = self._round(0, 0)
            if not active:
                return
            self._forward([], rows, width)

    def _shape(self, chunks: Sequence[Sequence[int]]) -> tuple[int, int]:
        """(rows, width) of the batch of chunks: their number up to a multiple of micro_batch_size, the longest
        up to a multiple of length_multiple."""
        width = -(-max(len(c) for c in chunks) // self.length_multiple) * self.length_multiple
        return -(-len(chunks) // self.micro_batch_size) * self.micro_batch_size, width

    def _round(self, rows: int, width: int) -> tuple[int, int, int]:
        """(ranks of the EP group with chunks to score, the largest rows, the largest width) of this round."""
        group = parallel_state.get_expert_model_parallel_group()
        mine = torch.tensor([int(rows > 0), rows, width], dtype=torch.long, device=next(self.model.parameters()).device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        stacked = torch.stack(every).cpu()
        return int(stacked[:, 0].sum()), int(stacked[:, 1].max()), int(stacked[:, 2].max())

    @torch.no_grad()
    def _forward(self, chunks: Sequence[Sequence[int]], rows: int, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The arrays of chunks, scored as rows x width tokens (padding beyond them)."""
        device = next(self.model.parameters()).device
        mbs = self.micro_batch_size
        tokens = torch.full((rows, width + 1), self.pad_id, dtype=torch.long, device="cpu")
        for i, c in enumerate(chunks):
            tokens[i, :len(c)] = torch.as_tensor(list(c), dtype=torch.long, device="cpu")
        tokens = tokens.to(device)
        positions = torch.arange(width, device=device).expand(mbs, width).contiguous()
        microbatches = [{"tokens": tokens[i:i + mbs, :-1], "labels": tokens[i:i + mbs, 1:], "position_ids": positions}
                        for i in range(0, rows, mbs)]
        out = forward_backward([self.model], partial(_score_forward_step, self.vocab_size, self.top_k),
                               microbatches, len(microbatches), width, mbs, forward_only=True)
        # [2, rows, width]: entropy and logprob of the token at position j + 1 (predicted at j)
        both = torch.empty(2, rows, width, dtype=torch.float64, device=device)
        if parallel_state.is_pipeline_last_stage():
            both = torch.stack([torch.cat([o[name] for o in out]) for name in ("entropy", "logprob")])
        both = share_over_model_parallel(both).cpu()
        nan = torch.full((2, rows, 1), float("nan"), dtype=torch.float64, device="cpu")
        ent, lp = torch.cat([nan, both], dim=2).numpy()
        return [(ent[i, :len(c)].copy(), lp[i, :len(c)].copy()) for i, c in enumerate(chunks)]
