"""Group-relative advantages (docs/method.md, section 4) and the dynamic-sampling filter (section 2).

Rewards arrive as one flat tensor, grouped in order: the G samples of group 0, then group 1, ... (the order
`RolloutEngine.generate` returns them in). Advantages are computed within each group, never across sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-6


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards[N] -> rewards[N / G, G] in float64, or a ValueError naming N and G."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat tensor [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of size {group_size}")
    return rewards.double().view(-1, group_size)


def grpo(rewards: torch.Tensor, group_size: int, eps: float = EPS) -> torch.Tensor:
    """A_i = (r_i - mean_g(r)) / (std_g(r) + eps), std unbiased (G - 1), per group; rewards[N] -> A[N]."""
    r = _groups(rewards, group_size)
    std = r.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).flatten().to(rewards.dtype)


def dr_grpo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - mean_g(r) (Dr. GRPO: no std normalisation); rewards[N] -> A[N]."""
    r = _groups(rewards, group_size)
    return (r - r.mean(dim=1, keepdim=True)).flatten().to(rewards.dtype)


def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_g(r)) (leave-one-out); rewards[N] -> A[N]."""
    if group_size < 2:
        raise ValueError(f"rloo needs at least 2 samples per group, got group_size={group_size}")
    r = _groups(rewards, group_size)
    return (group_size / (group_size - 1) * (r - r.mean(dim=1, keepdim=True))).flatten().to(rewards.dtype)


ADVANTAGES = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}


def compute_advantages(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """Advantages[N] of grouped rewards[N] by name: grpo, dr_grpo or rloo."""
    if kind not in ADVANTAGES:
        raise ValueError(f"unknown advantage {kind!r} (known: {', '.join(ADVANTAGES)})")
    return ADVANTAGES[kind](rewards, group_size)


@dataclass
class GroupFilter:
    """Which groups carry signal: `keep[N / G]` is False for groups whose rewards are all equal."""

    keep: torch.Tensor  # bool [num_groups]
    zero_variance_fraction: float  # fraction of groups dropped (logged as a metric)

    def sample_mask(self, group_size: int) -> torch.Tensor:
        """keep expanded to the samples: bool[N]."""
        return self.keep.repeat_interleave(group_size)


def zero_variance_filter(rewards: torch.Tensor, group_size: int, atol: float = 0.0) -> GroupFilter:
    """Dynamic sampling: drop groups with max(r) - min(r) <= atol (their advantages are all zero)."""
    r = _groups(rewards, group_size)
    keep = (r.max(dim=1).values - r.min(dim=1).values) > atol
    dropped = float((~keep).double().mean()) if keep.numel() else 0.0
    return GroupFilter(keep=keep, zero_variance_fraction=dropped)
