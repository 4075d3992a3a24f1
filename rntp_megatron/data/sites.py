"""Site selection: which token positions t of a chunk become RNTP episodes (ALGORITHMS.md section 2).

A site t needs `min_context` tokens before it and `horizon` tokens from it on: min_context <= t <= n - horizon.
`uniform` draws k of them; `entropy` and `logprob_window` draw k among those a proxy model finds
interesting, from per-token arrays computed by `ProxyScorer` (a Megatron GPTModel forward at TP1):
entropy[t] is the top-k renormalized entropy of p(. | x_<t), logprob[t] = log p(x_t | x_<t) (index 0: NaN).
With data.site_classes, labelled documents (the synthetic corpus) only offer tokens of those classes.
"""

from __future__ import annotations

from typing import Optional, Sequence

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


def draw_sites(keep: np.ndarray, k: int, min_context: int, horizon: int, rng: np.random.Generator) -> list[int]:
    """k sites drawn uniformly without replacement among t in [min_context, n - horizon] with keep[t] (keep[n])."""
    cand = np.asarray(candidate_range(len(keep), min_context, horizon), dtype=np.int64)
    return _draw(cand[keep[cand]], k, rng)


def entropy_keep(entropy: np.ndarray, threshold: float) -> np.ndarray:
    """keep[t] = entropy[t] > threshold (entropy[T] in nats; NaN never kept)."""
    return np.nan_to_num(entropy, nan=-np.inf) > threshold


def logprob_window_keep(logprob: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """keep[t] = lo <= logprob[t] <= hi (logprob[T] of the true token; NaN never kept)."""
    return (logprob >= lo) & (logprob <= hi)


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
                 scorer: ProxyScorer | None = None,
                 allowed: Optional[Sequence[np.ndarray]] = None) -> list[list[int]]:
    """Sites of each chunk by cfg.site_selection (at most cfg.sites_per_chunk each), only where allowed[i][t]
    (a bool mask per chunk, e.g. the token's synthetic class) when given."""
    if cfg.site_selection == "uniform":
        keeps = [np.ones(len(c), dtype=bool) for c in chunks]
    elif scorer is None:
        raise ValueError(f"data.site_selection={cfg.site_selection!r} needs a ProxyScorer (a proxy model)")
    elif cfg.site_selection == "entropy":
        keeps = [entropy_keep(e, cfg.entropy_threshold) for e, _ in scorer.score(chunks)]
    else:
        keeps = [logprob_window_keep(lp, *cfg.logprob_window) for _, lp in scorer.score(chunks)]
    if allowed is not None:
        keeps = [keep & mask for keep, mask in zip(keeps, allowed)]
    return [draw_sites(keep, cfg.sites_per_chunk, cfg.min_context, cfg.answer_horizon, rng) for keep in keeps]
