"""Graded text similarity of y to the continuation text (sacrebleu chrF and BLEU, rapidfuzz edit distance)."""

from __future__ import annotations

from typing import Optional, Sequence

import sacrebleu
import torch
from rapidfuzz.distance import Levenshtein

from rntp_megatron.data.episode import Episode
from rntp_megatron.rewards.registry import RewardContext, param, register_reward


def _score(metric: str, y: str, truth: str) -> float:
    if metric == "chrf":
        return sacrebleu.sentence_chrf(y, [truth]).score / 100.0
    if metric == "bleu":
        return sacrebleu.sentence_bleu(y, [truth], smooth_method="exp").score / 100.0
    return Levenshtein.normalized_similarity(y, truth)


@register_reward("similarity")
def similarity(episodes: Sequence[Episode], answers: Sequence[Optional[str]], ctx: RewardContext) -> torch.Tensor:
    """r = chrF(y, x)/100, BLEU(y, x)/100 (exp smoothing) or 1 - Levenshtein(y, x) / max(|y|, |x|) with
    x = episode.continuation_text; params.metric in chrf | bleu | edit; empty or missing y gets 0."""
    metric = param(ctx.params, "metric", "chrf", ("chrf", "bleu", "edit"))
    return torch.tensor([_score(metric, y, ep.continuation_text) if y else 0.0
                         for ep, y in zip(episodes, answers)], dtype=torch.float32, device="cpu")
