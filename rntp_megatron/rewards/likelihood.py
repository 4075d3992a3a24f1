"""Likelihood rewards from the trainer's forward over [context, thought, true continuation] (no answer needed).

logp[N, K] = log p_theta(x_{t+k} | x_<t, c, x_{t:t+k}); baseline[N, K] the same without the thought under the
baseline model p_bar (EMA or frozen, rewards/baseline.py); mask[N, K] marks real continuation tokens.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from rntp_megatron.rewards.registry import param, register_reward


def discounted_mean(logp: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1/K) sum_k gamma^k logp[:, k] over the masked k (K = tokens in the row); logp[N, K] -> [N]."""
    k = torch.arange(logp.shape[1], dtype=logp.dtype, device=logp.device)
    weights = gamma ** k * mask
    return (logp * weights).sum(-1) / mask.sum(-1).clamp(min=1)


def _need_baseline(name: str, baseline: Optional[torch.Tensor]) -> torch.Tensor:
    if baseline is None:
        raise ValueError(f"reward {name!r} needs the baseline model's no-thought log-probs (baseline is None)")
    return baseline


@register_reward("loglik", kind="likelihood")
def loglik(logp: torch.Tensor, mask: torch.Tensor, baseline: Optional[torch.Tensor], params: dict[str, Any]
           ) -> torch.Tensor:
    """r = (1/K) sum_k gamma^k log p_theta(x_{t+k} | x_<t, c, x_{t:t+k}); params.gamma (default 1)."""
    return discounted_mean(logp, mask, float(param(params, "gamma", 1.0)))


@register_reward("info_gain", kind="likelihood", needs_baseline=True, baseline_shift=True)
def info_gain(logp: torch.Tensor, mask: torch.Tensor, baseline: Optional[torch.Tensor], params: dict[str, Any]
              ) -> torch.Tensor:
    """r = loglik(c) - (1/K) sum_k gamma^k log p_bar(x_{t+k} | x_<t, x_{t:t+k}) (RLP), with the same discount."""
    gamma = float(param(params, "gamma", 1.0))
    return discounted_mean(logp, mask, gamma) - discounted_mean(_need_baseline("info_gain", baseline), mask, gamma)


@register_reward("prob", kind="likelihood")
def prob(logp: torch.Tensor, mask: torch.Tensor, baseline: Optional[torch.Tensor], params: dict[str, Any]
         ) -> torch.Tensor:
    """r = p_theta(x_t | x_<t, c): the expected value of `exact`, from the first continuation token only."""
    return torch.exp(logp[:, 0]) * mask[:, 0]


VRCLI_LEVELS = ((2.0, 1.0), (1.0, 0.9), (0.05, 0.5))  # (threshold on I, reward), highest first


@register_reward("vrcli", kind="likelihood", needs_baseline=True)
def vrcli(logp: torch.Tensor, mask: torch.Tensor, baseline: Optional[torch.Tensor], params: dict[str, Any]
          ) -> torch.Tensor:
    """I = 100 (PPL(y*|x) - PPL(y*|x,c)) / PPL(y*|x), PPL = exp(-mean_k logp); r = 1 if I >= 2, 0.9 if I >= 1,
    0.5 if I >= 0.05, else 0."""
    n = mask.sum(-1).clamp(min=1)
    ppl_thought = torch.exp(-(logp * mask).sum(-1) / n)
    ppl_plain = torch.exp(-(_need_baseline("vrcli", baseline) * mask).sum(-1) / n)
    improvement = 100 * (ppl_plain - ppl_thought) / ppl_plain
    r = torch.zeros_like(improvement)
    for threshold, value in reversed(VRCLI_LEVELS):
        r = torch.where(improvement >= threshold, torch.full_like(r, value), r)
    return r
