"""Token- and byte-matching rewards against the true continuation x_{t:t+K}: exact, prefix (RPT), run."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from rntp_megatron.data.episode import Episode
from rntp_megatron.rewards.registry import RewardContext, param, register_reward


def _per_sample(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device="cpu")


@register_reward("exact")
def exact(episodes: Sequence[Episode], answers: Sequence[Optional[str]], ctx: RewardContext) -> torch.Tensor:
    """r = 1[encode(y)[0] == x_t]: the answer's first token is the true next token (y verbatim, spaces kept)."""
    out = []
    for ep, y in zip(episodes, answers):
        ids = ctx.tokenizer.encode(y) if y else []
        out.append(float(bool(ids) and bool(ep.continuation_ids) and ids[0] == ep.continuation_ids[0]))
    return _per_sample(out)


def token_boundaries(token_ids: Sequence[int], ctx: RewardContext) -> list[int]:
    """Byte offsets where the tokens of x_{t:t+K} end: cumulative len(token_bytes(x_{t+k}))."""
    ends, total = [], 0
    for i in token_ids:
        total += len(ctx.tokenizer.token_bytes(i))
        ends.append(total)
    return ends


@register_reward("prefix")
def prefix(episodes: Sequence[Episode], answers: Sequence[Optional[str]], ctx: RewardContext) -> torch.Tensor:
    """r = 1 if bytes(y) is a non-empty prefix of bytes(x_{t:t+K}) and len(bytes(y)) is a token boundary of
    x_{t:t+K}, else 0 (RPT). Bytes of the continuation come from its token ids (token_bytes), so a multi-byte
    character split over tokens is compared exactly; y longer than the horizon cannot be verified and gets 0."""
    out = []
    for ep, y in zip(episodes, answers):
        if not y:
            out.append(0.0)
            continue
        truth = b"".join(ctx.tokenizer.token_bytes(i) for i in ep.continuation_ids)
        guess = y.encode("utf-8")
        out.append(float(truth.startswith(guess) and len(guess) in token_boundaries(ep.continuation_ids, ctx)))
    return _per_sample(out)


@register_reward("run")
def run(episodes: Sequence[Episode], answers: Sequence[Optional[str]], ctx: RewardContext) -> torch.Tensor:
    """r = sum_{k<n} w_k / sum_{k<K} w_k, n = the number of leading tokens of encode(y) equal to x_{t+k} (a wrong
    token ends the run). params.weighting: 'linear' (w_k = 1, so r = n/K) or 'surprisal' (w_k = -log p_ref(x_{t+k}),
    read from episode.meta['ref_logprobs'], K values)."""
    weighting = param(ctx.params, "weighting", "linear", ("linear", "surprisal"))
    out = []
    for ep, y in zip(episodes, answers):
        truth = list(ep.continuation_ids)
        if weighting == "surprisal":
            ref = ep.meta.get("ref_logprobs")
            if ref is None or len(ref) != len(truth):
                raise ValueError(f"run reward with weighting 'surprisal' needs episode.meta['ref_logprobs'] with "
                                 f"{len(truth)} values (episode {ep.doc_id!r} site {ep.site}), got {ref!r}")
            weights = [-float(v) for v in ref]
        else:
            weights = [1.0] * len(truth)
        ids = ctx.tokenizer.encode(y) if y else []
        n = 0
        while n < min(len(ids), len(truth)) and ids[n] == truth[n]:
            n += 1
        total = sum(weights)
        out.append(sum(weights[:n]) / total if total > 0 else 0.0)
    return _per_sample(out)
