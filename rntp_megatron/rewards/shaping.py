"""Shaping terms added to the reward, each with its weight from RewardConfig: format, per-token length cost and
DAPO's overlong soft penalty. (The optional next-token loss is a loss term: rl/loss.py, reward.ntp_weight.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rntp_megatron.config import RewardConfig
from rntp_megatron.rewards.answer import ParsedAnswer


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO soft overlong penalty: 0 if L <= L_max - B; (L_max - B - L) / B if L_max - B < L <= L_max; -1 beyond."""
    if buffer <= 0 or length <= max_len - buffer:
        return 0.0
    if length > max_len:
        return -1.0
    return (max_len - buffer - length) / buffer


@dataclass
class ShapedReward:
    total: torch.Tensor  # [N] base + shaping
    terms: dict[str, torch.Tensor]  # each [N], for logging


def shape(base: torch.Tensor, parsed: Sequence[ParsedAnswer], thought_lengths: Sequence[int],
          generated_lengths: Sequence[int], cfg: RewardConfig, max_new_tokens: int) -> ShapedReward:
    """r = base + format_weight (1[format ok] - 1) - length_cost * |thought| + overlong(|generated|)."""
    fmt = torch.tensor([float(p.format_ok) - 1.0 for p in parsed], device="cpu") * cfg.format_weight
    length = -cfg.length_cost * torch.tensor([float(n) for n in thought_lengths], device="cpu")
    overlong = torch.tensor([overlong_penalty(n, max_new_tokens, cfg.overlong_buffer) for n in generated_lengths],
                            device="cpu")
    return ShapedReward(total=base.float() + fmt + length + overlong,
                        terms={"reward_base": base.float(), "reward_format": fmt, "reward_length": length,
                               "reward_overlong": overlong})
