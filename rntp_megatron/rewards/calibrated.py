"""The calibrated (confidence) reward: the answer states a probability q for its guess; a proper scoring rule."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from rntp_megatron.data.episode import Episode
from rntp_megatron.rewards.registry import RewardContext, get_reward, param, register_reward

Q_FLOOR = 1e-4  # q is clipped to [Q_FLOOR, 1 - Q_FLOOR] so log scores stay finite


def split_confidence(y: Optional[str], sep: str) -> tuple[Optional[str], Optional[float]]:
    """'guess<sep>q' -> (guess, q) for q a number in [0, 1]; (None, None) when y does not have that form."""
    if not y or sep not in y:
        return None, None
    guess, raw = y.rsplit(sep, 1)
    try:
        q = float(raw.strip())
    except ValueError:
        return None, None
    return (guess, q) if 0.0 <= q <= 1.0 and guess else (None, None)


@register_reward("calibrated")
def calibrated(episodes: Sequence[Episode], answers: Sequence[Optional[str]], ctx: RewardContext) -> torch.Tensor:
    """With c = base reward of the guess (params.base: prefix | exact) and q its stated probability:
    rule 'log': r = c log q + (1 - c) log(1 - q); rule 'brier': r = -(q - c)^2. An answer without a
    readable 'guess<sep>q' (params.sep, default ' | ') gets the rule's worst score: log(Q_FLOOR) or -1."""
    rule = param(ctx.params, "rule", "log", ("log", "brier"))
    base = get_reward(param(ctx.params, "base", "prefix", ("prefix", "exact"))).fn
    parts = [split_confidence(y, param(ctx.params, "sep", " | ")) for y in answers]
    correct = base(episodes, [g for g, _ in parts], ctx)
    out = []
    for (guess, q), c in zip(parts, correct.tolist()):
        if guess is None:
            out.append(math.log(Q_FLOOR) if rule == "log" else -1.0)
        elif rule == "log":
            q = min(max(q, Q_FLOOR), 1 - Q_FLOOR)
            out.append(c * math.log(q) + (1 - c) * math.log(1 - q))
        else:
            out.append(-(q - c) ** 2)
    return torch.tensor(out, dtype=torch.float32, device="cpu")
