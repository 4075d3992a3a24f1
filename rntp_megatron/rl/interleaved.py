"""Interleaved episodes (data.episode_format: interleaved): one rollout reads a chunk and thinks and answers at
each of its k sites in turn, its earlier thoughts staying in its context.

    turn 1: [prefix, x_<t1, <think>]                                  -> thought_1 </think> <answer> y_1 </answer>
    turn j: everything so far + x_{t_{j-1}:t_j} (the true text) + <think> -> thought_j </think> <answer> y_j </answer>

The G rollouts of an episode are one GRPO group at every site: the rewards of site j give advantages A_ij within
the group, and A_ij weighs the tokens of rollout i's own segment j (its thought and answer) only. The true text
and the template between segments are fed, not sampled: never policy tokens (the true text is next-token-loss
text under the mixed objective, like the context).

Rewards and metrics see each (rollout, site) as a single-site episode ("views", `segment_views`): its prompt is
everything before the segment, its rollout the segment's tokens. Views come site by site, and within a site in
rollout order, so each site's views form whole groups of G in order, as compute_advantages expects.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from rntp_megatron.data.episode import Episode
from rntp_megatron.data.tokenizer import Tokenizer
from rntp_megatron.rl.batch import RLBatch, find_sublist, pack_rollouts
from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams


def generate_interleaved(engine: RolloutEngine, episodes: Sequence[Episode], sampling: SamplingParams,
                         think_open_ids: Sequence[int], tokenizer: Tokenizer) -> list[Rollout]:
    """sampling.n rollouts per episode (grouped by episode, as engine.generate returns them), turn by turn over
    the episode's meta["segments"]; Rollout.segments[j] = [start, end, stopped] of turn j in token_ids."""
    rollouts = []
    for r in engine.generate([ep.prompt_ids for ep in episodes], sampling):
        # routed_experts dropped: they would cover the first turn only (no moe/rollout_routing_mismatch here)
        rollouts.append(dataclasses.replace(r, token_ids=list(r.token_ids), logprobs=list(r.logprobs),
                                            segments=[[0, len(r.token_ids), int(r.finish_reason == "stop")]],
                                            routed_experts=None))
    turns = max(len(ep.meta["segments"]) for ep in episodes)
    for j in range(1, turns):
        live = [r for r in rollouts if len(episodes[r.prompt_index].meta["segments"]) > j]
        for r in live:  # the true text up to site j, then the template's <think>: fed, log-prob 0
            fed = list(episodes[r.prompt_index].meta["segments"][j]["text_ids"]) + list(think_open_ids)
            r.token_ids += fed
            r.logprobs += [0.0] * len(fed)
        seed = None if sampling.seed is None else (sampling.seed + 7919 * j) % (2**31 - 1)
        outs = engine.generate([r.prompt_ids + r.token_ids for r in live],
                               dataclasses.replace(sampling, n=1, seed=seed))
        for r, o in zip(live, outs):
            r.segments.append([len(r.token_ids), len(r.token_ids) + len(o.token_ids), int(o.finish_reason == "stop")])
            r.token_ids += list(o.token_ids)
            r.logprobs += list(o.logprobs)
            r.weight_version = min(r.weight_version, o.weight_version)
    for r in rollouts:
        r.finish_reason = "stop" if all(s[2] for s in r.segments) else "length"
        r.text = tokenizer.decode(r.token_ids)
    return rollouts


def view_order(episodes: Sequence[Episode], rollouts: Sequence[Rollout]) -> list[tuple[int, int]]:
    """(rollout i, site j) of every view: site by site, rollouts in order, where the rollout's episode has site j."""
    turns = max(len(ep.meta["segments"]) for ep in episodes)
    return [(i, j) for j in range(turns) for i, r in enumerate(rollouts)
            if len(episodes[r.prompt_index].meta["segments"]) > j]


def segment_views(episodes: Sequence[Episode], rollouts: Sequence[Rollout], tokenizer: Tokenizer
                  ) -> tuple[list[Episode], list[Rollout]]:
    """Each (rollout, site) of view_order as a single-site episode and its rollout (rollout v answers episode v)."""
    views_e, views_r = [], []
    for v, (i, j) in enumerate(view_order(episodes, rollouts)):
        r, seg = rollouts[i], episodes[rollouts[i].prompt_index].meta["segments"][j]
        start, end, stopped = r.segments[j]
        before = list(r.prompt_ids) + list(r.token_ids[:start])
        views_e.append(Episode(before, before, list(seg["continuation_ids"]), seg["continuation_text"], seg["site"],
                               episodes[r.prompt_index].doc_id, seg["token_class"]))
        views_r.append(Rollout(before, list(r.token_ids[start:end]), tokenizer.decode(r.token_ids[start:end]),
                               list(r.logprobs[start:end]), "stop" if stopped else "length", r.weight_version, v))
    return views_e, views_r


def pack_interleaved(episodes: Sequence[Episode], rollouts: Sequence[Rollout], advantages: torch.Tensor,
                     rewards: torch.Tensor, think_close_ids: Sequence[int], seq_length: int, pad_id: int,
                     old_logprobs: Optional[Sequence[Sequence[float]]] = None) -> RLBatch:
    """Rows [prompt + all turns] (pack_rollouts) with per-token advantages[N, s]: view v = (i, j) of view_order
    puts advantages[v] on the thought and answer label positions of rollout i's segment j; thought = the segment
    through its first </think> (all of it when missing), answer = the rest; ntp = the context and the fed true text.
    rewards[N] (metrics only) is each rollout's mean over its sites."""
    order = view_order(episodes, rollouts)
    n = len(rollouts)
    if advantages.shape != (len(order),) or rewards.shape != (len(order),):
        raise ValueError(f"{len(order)} segment views but advantages {tuple(advantages.shape)} and rewards "
                         f"{tuple(rewards.shape)}")
    per_row = torch.zeros(n, dtype=torch.float64, device="cpu")
    sites = torch.zeros(n, dtype=torch.float64, device="cpu")
    for (i, _), r in zip(order, rewards.double().tolist()):
        per_row[i] += r
        sites[i] += 1
    batch = pack_rollouts(episodes, rollouts, torch.zeros(n, device="cpu"), (per_row / sites.clamp(min=1)).float(),
                          think_close_ids, seq_length, pad_id, old_logprobs)
    thought, answer = torch.zeros_like(batch.thought_mask), torch.zeros_like(batch.answer_mask)
    token_adv = torch.zeros_like(batch.thought_mask)
    for v, (i, j) in enumerate(order):
        ro = rollouts[i]
        p = len(ro.prompt_ids)
        start, end, _ = ro.segments[j]
        close = find_sublist(ro.token_ids[start:end], think_close_ids)
        n_thought = end - start if close < 0 else close + len(think_close_ids)
        thought[i, p - 1 + start:p - 1 + start + n_thought] = 1
        answer[i, p - 1 + start + n_thought:p - 1 + end] = 1
        token_adv[i, p - 1 + start:p - 1 + end] = advantages[v]
        if j > 0:  # the true text fed before segment j: label positions of its tokens
            text = len(episodes[ro.prompt_index].meta["segments"][j]["text_ids"])
            fed = ro.segments[j - 1][1]
            batch.ntp_mask[i, p - 1 + fed:p - 1 + fed + text] = 1
    return dataclasses.replace(batch, thought_mask=thought, answer_mask=answer, advantages=token_adv)
