"""Tokenizers behind one protocol: a built-in byte tokenizer, a Hugging Face tokenizer from a local folder, and a
byte-level BPE trained locally with `tokenizers`.

The RNTP tags (`<think>`, `</think>`, `<answer>`, `</answer>`) are single tokens in every tokenizer built here,
so a prompt ends exactly where the policy starts to think and the answer slot is easy to find.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

from rntp_megatron.config import ConfigError, DataConfig, RunConfig, TokenizerConfig, padded_vocab_size

DEFAULT_TAGS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"


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


class ByteTokenizer:
    """ids 0..255 are bytes; specials (tags, eos, pad) follow at 256.. . vocab_size = 256 + len(tags) + 2."""

    def __init__(self, tags: Sequence[str] = DEFAULT_TAGS) -> None:
        self.specials: list[str] = [*tags, EOS_TOKEN, PAD_TOKEN]
        if len(set(self.specials)) != len(self.specials) or any(not s for s in self.specials):
            raise ValueError(f"special tokens must be distinct and non-empty, got {self.specials}")
        self._special_ids = {s: 256 + i for i, s in enumerate(self.specials)}
        self.vocab_size = 256 + len(self.specials)
        self.eos_id = self._special_ids[EOS_TOKEN]
        self.pad_id = self._special_ids[PAD_TOKEN]
        # Longest first, so a special that contains another (e.g. "</think>" vs "<think>") wins.
        self._by_length = sorted(self.specials, key=len, reverse=True)

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ids, with each special string replaced by its single id."""
        ids: list[int] = []
        pos = 0
        while pos < len(text):
            nxt, which = len(text), None
            for s in self._by_length:
                i = text.find(s, pos)
                if i != -1 and i < nxt:
                    nxt, which = i, s
            ids.extend(text[pos:nxt].encode("utf-8"))
            if which is None:
                break
            ids.append(self._special_ids[which])
            pos = nxt + len(which)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes of `ids` joined and decoded as UTF-8 (errors replaced)."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """One byte for ids < 256, the special's UTF-8 text above."""
        if 0 <= token_id < 256:
            return bytes((token_id,))
        if 256 <= token_id < self.vocab_size:
            return self.specials[token_id - 256].encode("utf-8")
        raise ValueError(f"token id {token_id} is outside the byte tokenizer's vocab [0, {self.vocab_size})")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE: printable stand-in character -> the byte it encodes."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (tokenizer.json or a transformers tokenizer)."""

    def __init__(self, path: str | Path, tags: Sequence[str] = DEFAULT_TAGS) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
        self.path = path
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        missing = [t for t in tags if t not in self._tok.get_vocab()]
        if missing:
            # Tags become single added tokens; the model's vocab must cover them (vocab_size says how big).
            self._tok.add_special_tokens({"additional_special_tokens": missing})
        if self._tok.eos_token is None:
            self._tok.add_special_tokens({"eos_token": EOS_TOKEN})
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token
        self.vocab_size = len(self._tok)
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id)
        backend = getattr(self._tok, "backend_tokenizer", None)
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        self._byte_level = _has_byte_level(decoder)

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for `text`, without BOS/EOS added."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's decoding of `ids`, special tokens kept."""
        return self._tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token: byte-level BPE pieces are mapped back through the GPT-2 byte alphabet,
        SentencePiece byte-fallback pieces `<0xNN>` are one byte, other pieces are their decoded text."""
        piece = self._tok.convert_ids_to_tokens(int(token_id))
        if piece is None:
            raise ValueError(f"token id {token_id} is outside the tokenizer's vocab [0, {self.vocab_size})")
        if piece in self._tok.all_special_tokens or int(token_id) in self._tok.added_tokens_decoder:
            return piece.encode("utf-8")
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            return bytes(alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes((int(piece[3:5], 16),))
        return piece.replace("\u2581", " ").encode("utf-8")


def _has_byte_level(decoder: Optional[dict]) -> bool:
    """Whether a tokenizers decoder (as JSON) is, or contains, the byte-level decoder."""
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(d) for d in decoder.get("decoders", []) or [])


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                    tags: Sequence[str] = DEFAULT_TAGS) -> HFTokenizer:
    """A byte-level BPE with `vocab_size` ids (tags, eos, pad included) trained on `texts`, saved to `out_dir`
    in Hugging Face format (tokenizer.json + config), and loaded back."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*tags, EOS_TOKEN, PAD_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} cannot hold 256 byte tokens and {len(specials)} specials")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                            additional_special_tokens=list(tags)).save_pretrained(str(out))
    return HFTokenizer(out, tags)


def build_tokenizer(cfg: TokenizerConfig, tags: Sequence[str] = DEFAULT_TAGS) -> Tokenizer:
    """The tokenizer a TokenizerConfig names: `byte`, or `hf` / `trained` loaded from `cfg.path`."""
    if cfg.kind == "byte":
        return ByteTokenizer(tags)
    if not cfg.path:
        raise ValueError(f"data.tokenizer.path: tokenizer kind {cfg.kind!r} needs the folder it loads from")
    return HFTokenizer(cfg.path, tags)


def tokenizer_for(data: DataConfig) -> Tokenizer:
    """The run's tokenizer: data.tokenizer with data's think/answer tags as single tokens (use this one
    everywhere, so episodes, rollouts and rewards agree on the ids)."""
    return build_tokenizer(data.tokenizer, (data.think_open, data.think_close, data.answer_open, data.answer_close))


def check_model_vocab(cfg: RunConfig, tokenizer_vocab: int) -> None:
    """model.vocab_size must hold every tokenizer id (tags included); the error names the smallest padded size
    that does: tokenizer_vocab rounded up to make_vocab_size_divisible_by * TP, as the model pads it anyway."""
    if tokenizer_vocab <= cfg.model.vocab_size:
        return
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's vocabulary "
                      f"({tokenizer_vocab} ids with the think/answer tags, data.tokenizer.kind="
                      f"{cfg.data.tokenizer.kind!r}); fix: model.vocab_size: "
                      f"{padded_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by, tp)} (the tokenizer's "
                      f"{tokenizer_vocab} rounded up to make_vocab_size_divisible_by * TP = "
                      f"{m.make_vocab_size_divisible_by} * {tp}), or a tokenizer of at most {m.vocab_size} ids")
