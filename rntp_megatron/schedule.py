"""Learning-rate schedules (constant, cosine, WSD, with warm-up) and token budgets -> steps."""

from __future__ import annotations

import math

from rntp_megatron.config import ConfigError, ScheduleConfig


def learning_rate(step: int, s: ScheduleConfig) -> float:
    """lr at optimizer step `step` (0-based): linear warm-up to s.lr, then constant / cosine / WSD to s.min_lr.

    cosine: min + (lr - min) * (1 + cos(pi * p)) / 2, p = progress after warm-up in [0, 1];
    wsd: lr until the last wsd_decay_fraction of the steps, then linear decay to min_lr.
    """
    total = max(s.train_steps, 1)
    if s.warmup_steps and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.lr_schedule == "constant":
        return s.lr
    after = max(total - s.warmup_steps, 1)
    progress = min(max(step - s.warmup_steps, 0) / after, 1.0)
    if s.lr_schedule == "cosine":
        return s.min_lr + (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress)) / 2
    decay_start = 1.0 - s.wsd_decay_fraction
    if progress <= decay_start:
        return s.lr
    return s.lr + (s.min_lr - s.lr) * (progress - decay_start) / max(s.wsd_decay_fraction, 1e-12)


def steps_for_token_budget(token_budget: int, tokens_per_step: int) -> int:
    """ceil(token_budget / tokens_per_step): the optimizer steps a budget of text tokens takes."""
    if tokens_per_step <= 0:
        raise ConfigError(f"schedule.token_budget: tokens per step must be > 0, got {tokens_per_step}; fix: "
                          "schedule.global_batch_size and schedule.seq_length of 1 or more")
    return -(-token_budget // tokens_per_step)


def set_learning_rate(optimizer, lr: float) -> None:
    """Write lr into every param group of a (chained) Megatron optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr
