"""Judges of an answer against the true continuation: a pluggable model call deciding whether y means a prefix of
the continuation (`judge`, RLPT style), and the model judging its own answer (`self_judge`)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence

import torch

from rntp_megatron.data.episode import Episode
from rntp_megatron.rewards.registry import RewardContext, param, register_reward

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


SELF_JUDGE_TEMPLATE = "Text: {truth}\nGuess: {answer}\nIs the guess how the text goes on? Answer:"


@register_reward("self_judge")
def self_judge(episodes: Sequence[Episode], answers: Sequence[Optional[str]], ctx: RewardContext) -> torch.Tensor:
    """r = p_J(yes | template(truth = x_{t:t+K} as text, answer = y, context = x_<t)) = exp(sum_k log p_J(yes_k |
    ...)): the probability that the judge J (params.judge_model: the policy itself, or the frozen reference) says
    params.yes (default " yes") after params.template; 0 for a missing answer. The trainer runs J forward-only
    over the filled templates (ctx.judge_logprobs), one row per answered rollout."""
    template = param(ctx.params, "template", SELF_JUDGE_TEMPLATE)
    param(ctx.params, "judge_model", "policy", ("policy", "reference"))
    yes = ctx.tokenizer.encode(param(ctx.params, "yes", " yes"))
    if ctx.judge_logprobs is None or not yes:
        raise ValueError(f"reward 'self_judge' needs the trainer's judge forward (ctx.judge_logprobs) and a non-empty "
                         f"reward.params.yes, got {ctx.judge_logprobs!r} and {param(ctx.params, 'yes', ' yes')!r}")
    live = [i for i, y in enumerate(answers) if y]
    out = torch.zeros(len(answers), dtype=torch.float32, device="cpu")
    if live:
        with_context = "{context}" in template
        prompts = [ctx.tokenizer.encode(template.format(
            truth=episodes[i].continuation_text, answer=answers[i],
            context=ctx.tokenizer.decode(episodes[i].context_ids) if with_context else "")) for i in live]
        logp, mask = ctx.judge_logprobs(prompts, [yes] * len(live))
        out[live] = torch.exp((logp * mask).sum(-1)).float()
    return out
