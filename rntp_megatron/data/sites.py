"""Site selection: which token positions t of a chunk become RNTP episodes (docs/method.md, section 2).

A site t needs `min_context` tokens before it and `horizon` tokens from it on: min_context <= t <= n - horizon.
`uniform` draws k of them; `entropy` and `logprob_window` draw k among those a proxy model finds
interesting, from per-token arrays computed by `data/proxy.ProxyScorer` (a frozen GPTModel at the trainer's
layout): entropy[t] is the top-k renormalized entropy of p(. | x_<t), logprob[t] = log p(x_t | x_<t) (index 0: NaN).
With data.site_classes, labelled documents (the synthetic corpus) only offer tokens of those classes.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from rntp_megatron.config import DataConfig


class Scorer(Protocol):
    """What site selection reads from a scoring model (data/proxy.ProxyScorer implements it; proxy.py reads this
    module, never the other way round)."""

    def score(self, chunks: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per chunk x[n]: (entropy[n], logprob[n]), position 0 NaN."""

    def finish(self) -> None:
        """Called once a rank has all the data of its step (a scorer whose forwards are collectives of ranks that
        read different documents keeps joining them until every rank has)."""


def candidate_range(n: int, min_context: int, horizon: int) -> range:
    """Sites of a chunk of n tokens: [min_context, n - horizon]."""
    return range(min_context, n - horizon + 1)


def _draw(candidates: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k distinct candidates drawn uniformly (all when fewer), ascending so prompts share prefixes in order."""
    if len(candidates) > k:
        candidates = rng.choice(candidates, size=k, replace=False)
    return sorted(int(c) for c in candidates)


def draw_sites(keep: np.ndarray, k: int, min_context: int, horizon: int, rng: np.random.Generator) -> list[int]:
    """k sites drawn uniformly without replacement among t in [min_context, n - horizon] with keep[t] (keep[n])."""
    cand = np.asarray(candidate_range(len(keep), min_context, horizon), dtype=np.int64)
    return _draw(cand[keep[cand]], k, rng)


def entropy_keep(entropy: np.ndarray, threshold: float, maximum: Optional[float] = None) -> np.ndarray:
    """keep[t] = threshold < entropy[t] <= maximum (entropy[T] in nats; NaN never kept; maximum None: no bound)."""
    h = np.nan_to_num(entropy, nan=-np.inf)
    return (h > threshold) & (h <= (np.inf if maximum is None else maximum))


def draw_weighted_sites(weight: np.ndarray, k: int, min_context: int, horizon: int, rng: np.random.Generator
                        ) -> list[int]:
    """k sites drawn without replacement with P(t) proportional to weight[t] among t in [min_context, n - horizon]
    with weight[t] > 0 (all of those when fewer), ascending."""
    cand = np.asarray(candidate_range(len(weight), min_context, horizon), dtype=np.int64)
    cand = cand[np.nan_to_num(weight[cand], nan=0.0) > 0]
    if len(cand) > k:
        w = weight[cand]
        cand = rng.choice(cand, size=k, replace=False, p=w / w.sum())
    return sorted(int(c) for c in cand)


def logprob_window_keep(logprob: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """keep[t] = lo <= logprob[t] <= hi (logprob[T] of the true token; NaN never kept)."""
    return (logprob >= lo) & (logprob <= hi)


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of softmax over the top-k of logits[..., V] (renormalized), in nats: shape logits[..., 0]."""
    top = torch.topk(logits.double(), min(k, logits.shape[-1]), dim=-1).values
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def select_sites(chunks: Sequence[Sequence[int]], cfg: DataConfig, rng: np.random.Generator,
                 scorer: Optional[Scorer] = None,
                 allowed: Optional[Sequence[np.ndarray]] = None) -> list[list[int]]:
    """Sites of each chunk by cfg.site_selection (at most cfg.sites_per_chunk each), only where allowed[i][t]
    (a bool mask per chunk, e.g. the token's synthetic class) when given."""
    if cfg.site_selection == "uniform":
        keeps = [np.ones(len(c), dtype=bool) for c in chunks]
    elif scorer is None:
        raise ValueError(f"data.site_selection={cfg.site_selection!r} needs a ProxyScorer (a proxy model)")
    elif cfg.site_selection == "entropy_weighted":  # P(t) ~ entropy[t], within data.entropy_max
        weights = [np.where(entropy_keep(e, 0.0, cfg.entropy_max), e, 0.0) for e, _ in scorer.score(chunks)]
        if allowed is not None:
            weights = [np.where(mask, w, 0.0) for w, mask in zip(weights, allowed)]
        return [draw_weighted_sites(w, cfg.sites_per_chunk, cfg.min_context, cfg.answer_horizon, rng)
                for w in weights]
    elif cfg.site_selection == "entropy":
        keeps = [entropy_keep(e, cfg.entropy_threshold, cfg.entropy_max) for e, _ in scorer.score(chunks)]
    else:
        keeps = [logprob_window_keep(lp, *cfg.logprob_window) for _, lp in scorer.score(chunks)]
    if allowed is not None:
        keeps = [keep & mask for keep, mask in zip(keeps, allowed)]
    return [draw_sites(keep, cfg.sites_per_chunk, cfg.min_context, cfg.answer_horizon, rng) for keep in keeps]
