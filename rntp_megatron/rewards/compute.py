"""Rewards of one batch of rollouts: parse answers, run the configured reward, add the shaping terms."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from rntp_megatron.config import DataConfig, RewardConfig
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.tokenizer import Tokenizer
from rntp_megatron.rewards.answer import parse_answer
from rntp_megatron.rewards.registry import RewardContext, get_reward
from rntp_megatron.rewards.shaping import ShapedReward, shape
from rntp_megatron.rl.batch import find_sublist
from rntp_megatron.rollout.engine import Rollout


def compute_rewards(episodes: Sequence[Episode], rollouts: Sequence[Rollout], tokenizer: Tokenizer,
                    reward: RewardConfig, data: DataConfig, max_new_tokens: int,
                    likelihood: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
                    shuffle_seed: Optional[int] = None, judge_logprobs: Optional[Callable[..., Any]] = None
                    ) -> ShapedReward:
    """Shaped rewards[N] for rollouts[N] (rollout i answers episodes[rollout.prompt_index]).

    String rewards read the parsed answer; likelihood rewards take `likelihood` = (logp[N, K], mask[N, K],
    baseline[N, K] or None) from rewards/scoring.py, computed by the trainer. With `reward.shuffle` the base
    rewards are permuted across the batch by `shuffle_seed` (the shuffled-reward control of docs/method.md, section 5).
    `judge_logprobs` runs the judge model of `self_judge` (RewardContext.judge_logprobs).
    """
    spec = get_reward(reward.name)
    eps = [episodes[r.prompt_index] for r in rollouts]
    parsed = [parse_answer(r.text, data, stopped=r.finish_reason == "stop") for r in rollouts]
    if spec.kind == "string":
        base = spec.fn(eps, [p.answer for p in parsed], RewardContext(tokenizer, reward.params, judge_logprobs))
    else:
        if likelihood is None:
            raise ValueError(f"reward {reward.name!r} is a likelihood reward: pass the trainer's continuation "
                             "log-probs (rewards.scoring.continuation_logprobs)")
        logp, mask, baseline = likelihood
        base = spec.fn(logp, mask, baseline, reward.params)
    if reward.shuffle:
        if shuffle_seed is None:
            raise ValueError("reward.shuffle=True needs a shuffle_seed (the trainer's step seed)")
        base = base[torch.randperm(len(base), generator=torch.Generator().manual_seed(shuffle_seed), device="cpu")]
    close = tokenizer.encode(data.think_close)
    thought_lengths = []
    for r in rollouts:
        at = find_sublist(r.token_ids, close)
        thought_lengths.append(len(r.token_ids) if at < 0 else at)
    return shape(base, parsed, thought_lengths, [len(r.token_ids) for r in rollouts], reward, max_new_tokens)
