"""Site selection: which token positions t of a chunk become RNTP episodes (ALGORITHMS.md section 2).

A site t needs `min_context` tokens before it and `horizon` tokens from it on: min_context <= t <= n - horizon.
`uniform` draws k of them; `entropy` and `logprob_window` draw k among those a proxy model finds
interesting, from per-token arrays computed by `ProxyScorer` (a Megatron GPTModel forward at TP1):
entropy[t] is the top-k renormalized entropy of p(. | x_<t), logprob[t] = log p(x_t | x_<t) (index 0: NaN).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rntp_megatron.config import DataConfig


def candidate_range(n: int, min_context: int, horizon: int) -> range:
    """Sites of a chunk of n tokens: [min_context, n - horizon]."""
    return range(min_context, n - horizon + 1)


def _draw(candidates: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k distinct candidates drawn uniformly (all when fewer), ascending so prompts share prefixes in order."""
    if len(candidates) > k:
        candidates = rng.choice(candidates, size=k, replace=False)
    return sorted(int(c) for c in candidates)


def uniform_sites(n: int, k: int, min_context: int, horizon: int, rng: np.random.Generator) -> list[int]:
    """k sites drawn uniformly without replacement from [min_context, n - horizon]."""
    return _draw(np.asarray(candidate_range(n, min_context, horizon)), k, rng)


def entropy_sites(entropy: np.ndarray, threshold: float, k: int, min_context: int, horizon: int,
                  rng: np.random.Generator) -> list[int]:
    """k sites drawn among candidates t with entropy[t] > threshold (entropy[T], nats)."""
    cand = np.asarray(candidate_range(len(entropy), min_context, horizon), dtype=np.int64)
    return _draw(cand[entropy[cand] > threshold], k, rng)


def logprob_window_sites(logprob: np.ndarray, lo: float, hi: float, k: int, min_context: int, horizon: int,
                         rng: np.random.Generator) -> list[int]:
    """k sites drawn among candidates t with lo <= logprob[t] <= hi (logprob[T] of the true token)."""
    cand = np.asarray(candidate_range(len(logprob), min_context, horizon), dtype=np.int64)
    lp = logprob[cand]
    return _draw(cand[(lp >= lo) & (lp <= hi)], k, rng)


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of softmax over the top-k of logits[..., V] (renormalized), in nats: shape logits[..., 0]."""
    top = torch.topk(logits.double(), min(k, logits.shape[-1]), dim=-1).values
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ProxyScorer:
    """Per-token entropy and log-prob arrays of chunks under a proxy Megatron GPTModel (TP1, one stage).

    `model` is a GPTModel built with rntp_megatron.model.provider.build_model on a single rank (its logits
    carry the whole, padded vocab); only the first `vocab_size` logits (the tokenizer's) are used."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, top_k: int = 16, pad_id: int = 0) -> None:
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (1, 1):
            raise ValueError(f"ProxyScorer needs the whole vocab and all layers on one rank (TP=1, PP=1), "
                             f"got TP={tp}, PP={pp}")
        self.model = model
        self.vocab_size = vocab_size
        self.top_k = top_k
        self.pad_id = pad_id

    @torch.no_grad()
    def score(self, chunks: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each chunk x[n]: (entropy[n], logprob[n]), position 0 NaN; chunks are right-padded into one
        batch (causal attention keeps padding out of real positions)."""
        if not chunks:
            return []
        width = max(len(c) for c in chunks)
        tokens = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        device = next(self.model.parameters()).device
        position_ids = torch.arange(width).unsqueeze(0).expand_as(tokens)
        was_training = self.model.training
        self.model.eval()
        logits = self.model(tokens.to(device), position_ids.to(device), None)[..., : self.vocab_size]
        logits = logits.double().cpu()
        self.model.train(was_training)
        ent = topk_entropy(logits[:, :-1], self.top_k)  # predicts positions 1..width-1
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        nan = torch.full((len(chunks), 1), float("nan"), dtype=torch.float64)
        ent, lp = torch.cat([nan, ent], 1).numpy(), torch.cat([nan, lp], 1).numpy()
        return [(ent[i, : len(c)].copy(), lp[i, : len(c)].copy()) for i, c in enumerate(chunks)]


def select_sites(chunks: Sequence[Sequence[int]], cfg: DataConfig, rng: np.random.Generator,
                 scorer: ProxyScorer | None = None) -> list[list[int]]:
    """Sites of each chunk by cfg.site_selection (at most cfg.sites_per_chunk each)."""
    k, lo_ctx, horizon = cfg.sites_per_chunk, cfg.min_context, cfg.answer_horizon
    if cfg.site_selection == "uniform":
        return [uniform_sites(len(c), k, lo_ctx, horizon, rng) for c in chunks]
    if scorer is None:
        raise ValueError(f"data.site_selection={cfg.site_selection!r} needs a ProxyScorer (a proxy model)")
    scores = scorer.score(chunks)
    if cfg.site_selection == "entropy":
        return [entropy_sites(e, cfg.entropy_threshold, k, lo_ctx, horizon, rng) for e, _ in scores]
    lo, hi = cfg.logprob_window
    return [logprob_window_sites(lp, lo, hi, k, lo_ctx, horizon, rng) for _, lp in scores]
