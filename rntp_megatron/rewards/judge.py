"""The judge hook: a pluggable model call deciding whether y means a prefix of the continuation (RLPT style)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence

import torch

from rntp_megatron.data.episode import Episode
from rntp_megatron.rewards.registry import RewardContext, register_reward

JudgeFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]


def resolve_judge(spec: Any) -> JudgeFn:
    """A callable judge, given directly or as 'package.module:function'."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward.params.judge must be a callable or 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"reward.params.judge: {spec!r} names nothing callable")
    return fn


@register_reward("judge")
def judge(episodes: Sequence[Episode], answers: Sequence[Optional[str]], ctx: RewardContext) -> torch.Tensor:
    """r = clip(judge(answers, continuations, contexts)_i, 0, 1) for parsed answers, 0 for missing ones; the
    judge (params.judge) sees only samples with an answer, in one batched call."""
    fn = resolve_judge(ctx.params.get("judge"))
    live = [i for i, y in enumerate(answers) if y]
    out = torch.zeros(len(answers), dtype=torch.float32, device="cpu")
    if live:
        scores = list(fn([answers[i] for i in live], [episodes[i].continuation_text for i in live],
                         [ctx.tokenizer.decode(episodes[i].context_ids) for i in live]))
        if len(scores) != len(live):
            raise ValueError(f"judge returned {len(scores)} scores for {len(live)} answers")
        out[live] = torch.tensor(scores, dtype=torch.float32, device="cpu").clamp(0, 1)
    return out
