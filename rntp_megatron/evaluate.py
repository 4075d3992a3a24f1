"""Held-out evaluation: does thinking help, where, and is the thought used?

For each episode (a site of held-out text), with greedy decoding:
- `next_token`: accuracy of the plain language model's greedy next token after the context (no template, no
  thought): what next-token training optimises,
- `no_thought`: accuracy of the answer after an empty thought (`<think></think><answer>`),
- `thought`: accuracy after the policy's own greedy thought,
- `swap`: accuracy when the thought is another episode's (same bucket): near `no_thought` if the thought is
  really used, near `thought` if the model ignores it,
- `info_gain`: mean over the answer horizon of log p(x | context, thought) - log p(x | context, no thought),
- `thought_len` and `format_ok` of the greedy generations,
- `ppl`: exp of the mean over episodes of the next-token loss (nats per token) on the episode's own text (its
  context and continuation), without any thought: the plain language-modelling quality of the checkpoint.

Episodes are bucketed by their synthetic class (T trivial, C computable, I impossible) or, on real text, by the
model's own next-token entropy at the site (> 0.5, > 1.0, > 1.5 nats: the RPT protocol; buckets overlap).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from typing import Optional, Sequence

import torch

from rntp_megatron.config import DataConfig
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.tokenizer import Tokenizer
from rntp_megatron.rewards.answer import parse_answer
from rntp_megatron.rewards.registry import RewardContext, get_reward
from rntp_megatron.rewards.scoring import continuation_logprobs
from rntp_megatron.rl.batch import find_sublist
from rntp_megatron.rollout.engine import RolloutEngine, SamplingParams

ENTROPY_BUCKETS = (0.5, 1.0, 1.5)
METRICS = ("n", "next_token", "no_thought", "thought", "swap", "info_gain", "thought_len", "format_ok", "ppl")


def heldout_synthetic(data: DataConfig) -> DataConfig:
    """The synthetic sources' held-out split, terse documents only (no thoughts shown), sites of every class."""
    return dataclasses.replace(data, site_classes=["T", "C", "I"], sources=[
        dataclasses.replace(s, split="heldout", synthetic={**s.synthetic, "kinds": {"terse": 1}})
        for s in data.sources])


def buckets_of(episode: Episode, entropy: Optional[float]) -> list[str]:
    """The class label of a synthetic episode, else the entropy buckets it falls in (plus 'all')."""
    if episode.token_class is not None:
        return [episode.token_class]
    return ["all"] + [f"H>{b}" for b in ENTROPY_BUCKETS if entropy is not None and entropy > b]


def _greedy(engine: RolloutEngine, prompts: list[list[int]], max_new_tokens: int, stop: list[str],
            eos_id: int) -> list:
    return engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=stop,
                                                   stop_token_ids=[eos_id], n=1, seed=0))


def evaluate(engine: RolloutEngine, chunks: list[torch.nn.Module], tokenizer: Tokenizer, data: DataConfig,
             episodes: Sequence[Episode], max_new_tokens: int, entropies: Optional[Sequence[float]] = None,
             micro_batch_size: int = 8, per_site: Optional[dict[str, list[float]]] = None
             ) -> dict[str, dict[str, float]]:
    """{bucket: {metric: value}} over the episodes (see the module docstring); collective over TP ranks.
    `per_site` (when given) receives each metric's value per episode, in order (for paired comparisons)."""
    exact = get_reward("exact").fn
    ctx = RewardContext(tokenizer, {})
    close, answer_open = tokenizer.encode(data.think_close), tokenizer.encode(data.answer_open)
    stop = [data.answer_close]
    horizon = max(len(e.continuation_ids) for e in episodes)

    def accuracy(prefixes: list[list[int]]) -> list[float]:
        outs = _greedy(engine, prefixes, horizon + 2, stop, tokenizer.eos_id)
        answers = [parse_answer(data.think_close + data.answer_open + o.text, data, o.finish_reason == "stop").answer
                   for o in outs]
        return exact(list(episodes), answers, ctx).tolist()

    # the policy's own thoughts, then its answers
    own = _greedy(engine, [e.prompt_ids for e in episodes], max_new_tokens, stop, tokenizer.eos_id)
    parsed = [parse_answer(o.text, data, o.finish_reason == "stop") for o in own]
    thought_acc = exact(list(episodes), [p.answer for p in parsed], ctx).tolist()
    thoughts = []
    for o in own:
        at = find_sublist(o.token_ids, close)
        thoughts.append(list(o.token_ids[:at]) if at >= 0 else list(o.token_ids))
    no_thought_acc = accuracy([e.prompt_ids + close + answer_open for e in episodes])
    plain = engine.generate([e.context_ids for e in episodes], SamplingParams(temperature=0.0, max_new_tokens=1, n=1,
                                                                              seed=0))
    next_acc = [float(o.token_ids[:1] == e.continuation_ids[:1]) for o, e in zip(plain, episodes)]

    labels = [buckets_of(e, None if entropies is None else entropies[i]) for i, e in enumerate(episodes)]
    by_bucket: dict[str, list[int]] = defaultdict(list)
    for i, bs in enumerate(labels):
        for b in bs:
            by_bucket[b].append(i)
    swap_of = list(range(len(episodes)))
    for members in by_bucket.values():  # each episode gets the thought of the next one in its bucket
        for k, i in enumerate(members):
            swap_of[i] = members[(k + 1) % len(members)]
    swap_acc = accuracy([e.prompt_ids + thoughts[swap_of[i]] + close + answer_open for i, e in enumerate(episodes)])

    conts = [e.continuation_ids for e in episodes]
    with_thought, mask = continuation_logprobs(chunks, [e.prompt_ids + t + close + answer_open
                                                        for e, t in zip(episodes, thoughts)], conts, micro_batch_size,
                                               tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    without, _ = continuation_logprobs(chunks, [e.prompt_ids + close + answer_open for e in episodes], conts,
                                       micro_batch_size, tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    gain = (((with_thought - without) * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    text = [e.context_ids + e.continuation_ids for e in episodes]
    text_logp, text_mask = continuation_logprobs(chunks, [t[:1] for t in text], [t[1:] for t in text],
                                                 micro_batch_size, tokenizer.pad_id, vocab_size=tokenizer.vocab_size)
    nll = (-(text_logp * text_mask).sum(1) / text_mask.sum(1).clamp(min=1)).tolist()

    per_episode = {"next_token": next_acc, "no_thought": no_thought_acc, "thought": thought_acc, "swap": swap_acc,
                   "info_gain": gain,
                   "thought_len": [float(len(t)) for t in thoughts],
                   "format_ok": [float(p.format_ok) for p in parsed], "ppl": nll}
    if per_site is not None:
        per_site.update(per_episode)
    table = {}
    for b in sorted(by_bucket):
        idx = by_bucket[b]
        table[b] = {"n": float(len(idx)), **{m: sum(v[i] for i in idx) / len(idx) for m, v in per_episode.items()}}
        table[b]["ppl"] = math.exp(table[b]["ppl"])  # the bucket's mean loss, as a perplexity
    return table


def format_table(table: dict[str, dict[str, float]], title: str = "") -> str:
    """The evaluation as a fixed-width text table."""
    head = f"{'bucket':<8}" + "".join(f"{m:>12}" for m in METRICS)
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for b, row in table.items():
        cells = "".join(f"{int(row[m]):>12d}" if m == "n" else f"{row[m]:>12.3f}" for m in METRICS)
        lines.append(f"{b:<8}{cells}")
    return "\n".join(lines)


def save_table(table: dict[str, dict[str, float]], path: str) -> None:
    with open(path, "w") as f:
        json.dump({b: {m: (v if math.isfinite(v) else None) for m, v in row.items()} for b, row in table.items()},
                  f, indent=1, sort_keys=True)
