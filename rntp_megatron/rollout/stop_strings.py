"""Stop strings found from token ids: a vocab mask picks the few rows whose new token can end one, and only
those rows decode a short tail of their tokens.

Why a mask over the vocab, then a tail decode (and not token-sequence matching): a stop string can be spelt by
many tokenisations and can straddle token boundaries (a byte-level token may even hold half of a character), so
matching id sequences would need every spelling. Text is a UTF-8 decode of the tokens' bytes (byte tokenizer,
byte-level BPE, SentencePiece with byte fallback), and that decode is stable under appending except for a
trailing incomplete character. So a stop string s newly in the text after token v has its last byte among v's
bytes: `may_end[v]` = v's bytes (Tokenizer.token_bytes) hold the last UTF-8 byte of some stop string. That test
is exact (no stop is missed) and rare (for "</answer>", the tokens holding ">"). For a row whose token passes
it, the text of its last W tokens with and without the new token tells what the new token changed; the stop
hits if some s lies in the new text and reaches past what was there before. A cut at the tail's start can only
garble its first few characters (up to 3 U+FFFD for a cut UTF-8 character, or a dropped leading space), so W
doubles until the compared span starts at least `MARGIN` characters in (or W covers the whole row): the answer
equals the one the full text would give.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

MARGIN = 4  # characters at a tail's start that may differ from the full decode's (a cut UTF-8 character: <= 3)


class StopStrings:
    """The stop strings of a sampling call over one tokenizer (Tokenizer protocol of data/tokenizer)."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        last_bytes = {s.encode("utf-8")[-1] for s in self.stops}
        # bool[vocab_size]: whether token v's bytes can end a stop string (see the module docstring)
        self.may_end = np.array([any(b in tokenizer.token_bytes(v) for b in last_bytes)
                                 for v in range(tokenizer.vocab_size)], dtype=bool)
        self._longest = max((len(s) for s in self.stops), default=0)

    def completed_by_last(self, ids: Sequence[int]) -> bool:
        """Whether decode(ids) holds a stop string that ends in the text ids[-1] added to decode(ids[:-1])."""
        window = self._longest + MARGIN
        while True:
            tail = ids[-window:]
            now, before = self.tokenizer.decode(tail), self.tokenizer.decode(tail[:-1])
            changed = len(os.path.commonprefix([now, before]))  # first character the last token made or changed
            if changed - self._longest + 1 >= MARGIN or window >= len(ids):
                return any(s in now[max(0, changed - len(s) + 1):] for s in self.stops)
            window *= 2
