"""Prompts that fit the row: an RL row holds [prompt, generated], at most schedule.seq_length + 1 tokens.

Validation (config.check_prompt_fits) keeps data.context_len, the template and rollout.max_new_tokens inside
the row; a prompt that is still too long (a tokenizer that writes the template longer than its bound) loses
its oldest context tokens, the ones furthest from the site, instead of failing the step.
"""

from __future__ import annotations

import dataclasses

from rntp_megatron.data.episode import Episode

CUT_KEY = "prompt_cut"  # Episode.meta: how many context tokens were cut from the left


def cut_prompt_left(episode: Episode, max_prompt_len: int, prefix_len: int) -> Episode:
    """The episode with its prompt [prefix, x_<t, suffix] at most max_prompt_len tokens: drop = overflow tokens
    of x_<t are removed from its left (prompt and context_ids alike), meta[CUT_KEY] = drop; unchanged when it fits."""
    drop = len(episode.prompt_ids) - max_prompt_len
    if drop <= 0:
        return episode
    if drop >= len(episode.context_ids):
        raise ValueError(f"a prompt of {len(episode.prompt_ids)} tokens cannot fit {max_prompt_len}: its context has "
                         f"only {len(episode.context_ids)} tokens to cut (the template alone is too long)")
    prompt = episode.prompt_ids[:prefix_len] + episode.prompt_ids[prefix_len + drop:]
    return dataclasses.replace(episode, prompt_ids=prompt, context_ids=episode.context_ids[drop:],
                               meta={**episode.meta, CUT_KEY: drop})
