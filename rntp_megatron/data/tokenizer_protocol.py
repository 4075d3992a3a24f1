"""The tokenizer protocol alone, importing nothing of the package: the reward registry, which the config consults,
types its context with it without reading the config back (data/tokenizer.py builds tokenizers from the config)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data path, rewards and rollout engines need from a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special strings (tags, eos, pad) become their single ids."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (invalid UTF-8 from partial byte sequences is replaced)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes token `token_id` stands for (the prefix reward checks token boundaries with it)."""
