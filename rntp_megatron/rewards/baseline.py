"""The EMA no-thought baseline model p_bar of info_gain and vrcli (RLP): a second GPTModel with the policy's card
and sharding, p_bar <- d p_bar + (1 - d) p after every optimizer step.

The average is kept in fp32 (`average`, a GPTModel built in float32: bf16 weights would swallow updates of size
(1 - d) |p - p_bar|), and it is what a checkpoint saves, so a resumed run continues the very same average.
The forward runs on `model`, the average cast to the policy's dtype (the average itself when that is fp32).
"""

from __future__ import annotations

import dataclasses

import torch

from rntp_megatron.config import ModelConfig, ParallelConfig
from rntp_megatron.model.frozen import freeze


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


class EMABaseline:
    """p_bar[name] = d p_bar[name] + (1 - d) p[name] over the policy stage's parameters (same names, same shards)."""

    def __init__(self, average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"reward.ema_decay must be in [0, 1), got {decay}")
        self.average, self.model, self.decay = freeze(average), freeze(model), decay

    @classmethod
    def build(cls, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, decay: float) -> "EMABaseline":
        """Fresh stages of this rank for the card (call `reset` to start it at the policy's weights)."""
        from rntp_megatron.model.provider import build_model

        average = build_model(dataclasses.replace(model_cfg, params_dtype="float32", fp8=None), parallel_cfg)
        model = average if model_cfg.params_dtype == "float32" else build_model(model_cfg, parallel_cfg)
        return cls(average, model, decay)

    def _pairs(self, policy: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(average, policy) parameter pairs by name; an error when the two models differ."""
        mine, theirs = dict(self.average.named_parameters()), dict(_unwrap(policy).named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError(f"baseline and policy parameters differ: {sorted(mine.keys() ^ theirs.keys())[:5]}")
        return [(mine[n], theirs[n]) for n in mine]

    @torch.no_grad()
    def _sync_model(self) -> None:
        """The forward copy <- the fp32 average (cast to its dtype)."""
        if self.model is not self.average:
            for mine, avg in zip(self.model.parameters(), self.average.parameters()):
                mine.copy_(avg)

    @torch.no_grad()
    def reset(self, policy: torch.nn.Module) -> None:
        """p_bar <- p (a run's start)."""
        for avg, p in self._pairs(policy):
            avg.copy_(p)
        self._sync_model()

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        """One EMA step toward the policy's current weights."""
        for avg, p in self._pairs(policy):
            avg.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)
        self._sync_model()

    def loaded(self) -> None:
        """After the checkpoint restored `average`: refresh the forward copy."""
        self._sync_model()
