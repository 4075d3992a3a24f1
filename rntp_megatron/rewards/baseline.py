"""The no-thought baseline model p_bar of info_gain and vrcli: a second GPTModel with the policy's sharding,
either frozen at the initial policy or an exponential moving average of it."""

from __future__ import annotations

import torch

from rntp_megatron.config import ModelConfig, ParallelConfig


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


class EMABaseline:
    """p_bar <- tau p_bar + (1 - tau) p after each optimizer step (tau = 1: frozen). The average is kept in
    fp32 beside the model, so bf16 weights do not swallow updates of size (1 - tau) |p - p_bar|."""

    def __init__(self, shadow: torch.nn.Module, policy: torch.nn.Module, tau: float) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"reward.params.baseline_tau must be in [0, 1], got {tau}")
        self.model, self.tau = shadow, tau
        mine, theirs = dict(shadow.named_parameters()), dict(_unwrap(policy).named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError(f"baseline and policy parameters differ: {sorted(mine.keys() ^ theirs.keys())[:5]}")
        self._names = list(mine)
        self._average = {}
        with torch.no_grad():
            for name in self._names:
                mine[name].copy_(theirs[name])
                mine[name].requires_grad_(False)
                self._average[name] = theirs[name].detach().float().clone()
        shadow.eval()

    @classmethod
    def build(cls, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, policy: torch.nn.Module,
              tau: float) -> "EMABaseline":
        """A fresh GPTModel stage of this rank (same card, same sharding), initialised to the policy's weights."""
        from rntp_megatron.model.provider import build_model

        return cls(build_model(model_cfg, parallel_cfg), policy, tau)

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        """One EMA step toward the policy's current weights (a no-op when frozen)."""
        if self.tau == 1.0:
            return
        theirs, mine = dict(_unwrap(policy).named_parameters()), dict(self.model.named_parameters())
        for name in self._names:
            avg = self._average[name]
            avg.mul_(self.tau).add_(theirs[name].detach().float(), alpha=1.0 - self.tau)
            mine[name].copy_(avg)
