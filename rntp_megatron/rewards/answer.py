"""Parse `thought</think><answer>y</answer>` out of a rollout's text; the format check behind the shaping term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rntp_megatron.config import DataConfig


@dataclass(frozen=True)
class ParsedAnswer:
    answer: Optional[str]  # y verbatim (spaces kept), None when the format gives no single answer
    format_ok: bool  # exactly one </think>, then (whitespace and) exactly one closed <answer>...</answer>


def parse_answer(text: str, data: DataConfig, stopped: bool = False) -> ParsedAnswer:
    """y from `...</think> <answer>y</answer>`; `stopped`: generation ended on the stop string, which engines
    strip from the text, so a missing final </answer> still closes the answer.

    Missing or repeated tags give answer None: two answers would let a policy hedge.
    """
    if text.count(data.think_close) != 1:
        return ParsedAnswer(None, False)
    after = text.split(data.think_close, 1)[1]
    if after.count(data.answer_open) != 1:
        return ParsedAnswer(None, False)
    between, body = after.split(data.answer_open, 1)
    if between.strip():
        return ParsedAnswer(None, False)
    closes = body.count(data.answer_close)
    if closes == 0 and stopped:
        return ParsedAnswer(body, True)
    if closes != 1 or body.split(data.answer_close, 1)[1].strip():
        return ParsedAnswer(None, False)
    return ParsedAnswer(body.split(data.answer_close, 1)[0], True)
