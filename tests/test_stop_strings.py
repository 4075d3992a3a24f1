"""StopStrings (rollout/stop_strings.py): at every prefix of a token sequence, "a stop string is completed by the
last token" equals the reference on the full text (a stop string in decode(ids[:m]) but not in decode(ids[:m-1])),
for the byte tokenizer (stop strings straddling byte tokens and UTF-8 characters cut between tokens) and a
byte-level BPE (stop strings inside and across merged tokens); the vocab mask never drops such a token."""

from __future__ import annotations

import pytest

from rntp_megatron.data.tokenizer import ByteTokenizer, train_tokenizer
from rntp_megatron.rollout.stop_strings import StopStrings

TEXT = "a<b>é€ x</answer> yé€</b>é<answer>q" * 2 + "ab" * 20 + "€é" + "xéééé"
STOPS = ["é€", "</b>", "</answer>", "€é", "b>é", "x", "ééé"]


def _occurrences(text: str, stop: str) -> int:
    """How many times stop occurs in text, overlaps counted."""
    return sum(text.startswith(stop, i) for i in range(len(text)))


def _reference(tokenizer, ids: list[int], stops: list[str]) -> list[bool]:
    """At each prefix length m >= 1: whether decode(ids[:m]) holds more occurrences of a stop string than
    decode(ids[:m-1]) (the first such m is where a row stops)."""
    texts = [tokenizer.decode(ids[:m]) for m in range(len(ids) + 1)]
    return [any(_occurrences(texts[m], s) > _occurrences(texts[m - 1], s) for s in stops)
            for m in range(1, len(ids) + 1)]


def _check(tokenizer, ids: list[int], stops: list[str]) -> int:
    """Asserts StopStrings agrees with the reference at every prefix; returns how many prefixes hit."""
    matcher = StopStrings(tokenizer, stops)
    want = _reference(tokenizer, ids, stops)
    got = [bool(matcher.may_end[ids[m - 1]]) and matcher.completed_by_last(ids[:m]) for m in range(1, len(ids) + 1)]
    assert got == want, [(m + 1, tokenizer.decode(ids[:m + 1])[-12:]) for m in range(len(ids)) if got[m] != want[m]]
    return sum(want)


@pytest.mark.parametrize("stop", STOPS)
def test_byte_tokenizer_stops_across_bytes(stop):
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert _check(tok, ids, [stop]) > 0  # each stop string occurs, split over several byte tokens
    # the mask keeps only tokens holding the last byte of a stop string: a few of the 262
    assert StopStrings(tok, [stop]).may_end.sum() <= 8


def test_byte_level_bpe_stops_inside_and_across_merges(tmp_path):
    tok = train_tokenizer([TEXT * 3, "the answer is </answer> here and there " * 5], tmp_path, vocab_size=320)
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges happened, so stops straddle merged tokens
    assert _check(tok, ids, STOPS) > 0
    for stop in STOPS:
        _check(tok, ids, [stop])
