"""Per-token policy-gradient terms (docs/method.md, section 4): PPO clip (clip-higher, dual clip), GSPO's sequence
ratio, KL estimators to a reference policy, and train/rollout importance corrections (TIS, icepop).

Everything here is elementwise over [b, s] tensors plus per-row reductions; aggregation over the step lives
in loss.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rntp_megatron.config import RLConfig
from rntp_megatron.rl.batch import sequence_sums


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(p || p_ref) estimate with d = logp - ref_logp: k1 = d, k2 = d^2 / 2, k3 = e^-d - 1 + d."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) - 1 + d
    raise ValueError(f"rl.kl_type must be one of k1, k2, k3, got {kind!r}")


def importance_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cfg: RLConfig) -> torch.Tensor:
    """Train/rollout correction w[b, s] (no gradient): TIS min(e^(old - rollout), C); icepop 1[lo <= e^(.) <= hi];
    both multiply when both are set; 1 when neither is."""
    ratio = torch.exp(old_logp - rollout_logp).detach()
    w = torch.ones_like(ratio)
    if cfg.tis_cap is not None:
        w = w * ratio.clamp(max=cfg.tis_cap)
    if cfg.icepop is not None:
        lo, hi = cfg.icepop
        w = w * ((ratio >= lo) & (ratio <= hi)).to(w.dtype)
    return w


@dataclass
class PolicyTerms:
    """Per-token results of the policy objective over [b, s]."""

    loss: torch.Tensor  # per-token loss (policy gradient, weighted, plus KL)
    ratio: torch.Tensor  # the ratio used (token, or the row's GSPO ratio broadcast)
    clipped: torch.Tensor  # 1 where the clipped branch was active
    kl: Optional[torch.Tensor]  # per-token KL estimate (None without reference log-probs)
    is_weight: torch.Tensor  # importance weight applied


def policy_terms(logp: torch.Tensor, old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                 advantages: torch.Tensor, mask: torch.Tensor, cfg: RLConfig,
                 ref_logp: Optional[torch.Tensor] = None, branch_ids: Optional[torch.Tensor] = None) -> PolicyTerms:
    """l[b, s] = w * max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) (with dual clip min(., -c A) for A < 0)
    + kl_coef * KL; rho = e^(logp - old) per token, or GSPO's rho_i = e^(mean_t over mask of (logp - old)) per
    rollout (a row, or a branch of a shared-context row: `branch_ids`, rl/batch.sequence_sums).
    """
    log_ratio = logp - old_logp
    if cfg.ratio_type == "gspo":
        means = sequence_sums(log_ratio * mask, branch_ids) / sequence_sums(mask, branch_ids).clamp(min=1)
        log_ratio = means.expand_as(logp) if branch_ids is None else means.gather(1, branch_ids)
    elif cfg.ratio_type != "token":
        raise ValueError(f"rl.ratio_type must be 'token' or 'gspo', got {cfg.ratio_type!r}")
    ratio = torch.exp(log_ratio)
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(ratio.dtype)  # per row or per token
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    loss = torch.maximum(unclipped, clipped)
    if cfg.dual_clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * cfg.dual_clip_c), loss)
    w = importance_weights(old_logp, rollout_logp, cfg)
    loss = loss * w
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, cfg.kl_type)
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * kl
    elif cfg.kl_coef:
        raise ValueError(f"rl.kl_coef={cfg.kl_coef} needs reference log-probs in the batch (ref_logprobs is None)")
    return PolicyTerms(loss=loss, ratio=ratio.detach(), clipped=(clipped > unclipped).float(),
                       kl=None if kl is None else kl.detach(), is_weight=w)
