"""Tokenizers behind one protocol: a built-in byte tokenizer, a Hugging Face tokenizer from a local folder, and a
byte-level BPE trained locally with `tokenizers`.

The RNTP tags (`<think>`, `</think>`, `<answer>`, `</answer>`) are single tokens in every tokenizer built here,
so a prompt ends exactly where the policy starts to think and the answer slot is easy to find.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from rntp_megatron.config import ConfigError, DataConfig, RunConfig, TokenizerConfig, padded_vocab_size
from rntp_megatron.data.tokenizer_protocol import Tokenizer  # noqa: F401 (the protocol, where users look for it)

DEFAULT_TAGS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")
EOS_TOKEN = "<|eos|>"
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_(\d+)\|>")  # Llama 3's unused special tokens
PAD_TOKEN = "<|pad|>"


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
        for piece, special in _split_on(text, self._by_length):
            ids.extend(piece.encode("utf-8"))
            if special is not None:
                ids.append(self._special_ids[special])
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
    """A Hugging Face tokenizer loaded from a local folder (tokenizer.json or a transformers tokenizer).

    Each RNTP tag becomes one token without growing the vocabulary when it can: a tag the tokenizer has
    (Qwen3's `<think>`, `</think>`) keeps its id; a missing one takes the next unused reserved special token
    (Llama 3's `<|reserved_special_token_k|>`, in order of k), encoded and decoded as the tag's text here; only
    a tokenizer with neither gets the tag as an added token (`added_tags`), which the model's vocab must hold.
    """

    def __init__(self, path: str | Path, tags: Sequence[str] = DEFAULT_TAGS) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
        self.path = path
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        vocab = self._tok.get_vocab()
        missing = [t for t in tags if t not in vocab]
        reserved = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := RESERVED_TOKEN.fullmatch(t)))
        self.mapped_tags = {tag: i for tag, (_, i) in zip(missing, reserved)}  # tag -> reserved token id
        self.added_tags = missing[len(self.mapped_tags):]
        if self.added_tags:
            self._tok.add_special_tokens({"additional_special_tokens": self.added_tags})
        if self._tok.eos_token is None:
            self._tok.add_special_tokens({"eos_token": EOS_TOKEN})
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token
        self._mapped_by_id = {i: tag for tag, i in self.mapped_tags.items()}
        self._mapped_by_length = sorted(self.mapped_tags, key=len, reverse=True)
        self.vocab_size = len(self._tok)
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id)
        backend = getattr(self._tok, "backend_tokenizer", None)
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        self._byte_level = _has_byte_level(decoder)

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids for `text`, without BOS/EOS added; tags on reserved tokens become their ids."""
        ids: list[int] = []
        for piece, tag in _split_on(text, self._mapped_by_length):
            if piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False))
            if tag is not None:
                ids.append(self.mapped_tags[tag])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The tokenizer's decoding of `ids`, special tokens kept; reserved tokens that carry a tag read as it."""
        out, run = [], []
        for i in map(int, ids):
            if i in self._mapped_by_id:
                out += [self._decode_run(run), self._mapped_by_id[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self._decode_run(run)

    def _decode_run(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token: byte-level BPE pieces are mapped back through the GPT-2 byte alphabet,
        SentencePiece byte-fallback pieces `<0xNN>` are one byte, other pieces are their decoded text."""
        if int(token_id) in self._mapped_by_id:
            return self._mapped_by_id[int(token_id)].encode("utf-8")
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


def _split_on(text: str, specials: Sequence[str]) -> Iterator[tuple[str, Optional[str]]]:
    """(text before, special) pieces of `text` split at each occurrence of a special string (longest first at
    a position); the last piece has special None."""
    pos = 0
    while True:
        found = min(((i, -len(s), s) for s in specials if (i := text.find(s, pos)) != -1), default=None)
        if found is None:
            yield text[pos:], None
            return
        at, _, special = found
        yield text[pos:at], special
        pos = at + len(special)


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


def check_model_vocab(cfg: RunConfig, tokenizer_vocab: int, added_tags: Sequence[str] = ()) -> None:
    """model.vocab_size must hold every tokenizer id (tags included); the error names the smallest padded size
    that does: tokenizer_vocab rounded up to make_vocab_size_divisible_by * TP, as the model pads it anyway.
    added_tags: the tags the tokenizer had to add (it had neither them nor reserved special tokens)."""
    if tokenizer_vocab <= cfg.model.vocab_size:
        return
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    added = (f", with the tags {list(added_tags)} added: it has neither them nor reserved special tokens to carry "
             "them" if added_tags else "")
    raise ConfigError(f"model.vocab_size: {m.vocab_size} is smaller than the tokenizer's vocabulary "
                      f"({tokenizer_vocab} ids with the think/answer tags, data.tokenizer.kind="
                      f"{cfg.data.tokenizer.kind!r}{added}); fix: model.vocab_size: "
                      f"{padded_vocab_size(tokenizer_vocab, m.make_vocab_size_divisible_by, tp)} (the tokenizer's "
                      f"{tokenizer_vocab} rounded up to make_vocab_size_divisible_by * TP = "
                      f"{m.make_vocab_size_divisible_by} * {tp}), or a tokenizer of at most {m.vocab_size} ids")
