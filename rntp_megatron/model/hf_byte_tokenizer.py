"""A Hugging Face tokenizer folder for byte-vocabulary models (vocab 256, id i = byte i), for engines such as
SGLang that need tokenizer files next to the weights of a model trained on raw bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def write_byte_tokenizer(folder: str | Path, eos_id: Optional[int] = 0) -> Path:
    """tokenizer.json + tokenizer_config.json in folder: ByteLevel BPE without merges, byte b -> id b, eos = byte
    eos_id (None: no EOS token, generation runs to max_new_tokens or a stop string)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # ByteLevel maps every byte to one printable character; its alphabet lists them in byte order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    eos = alphabet[eos_id] if eos_id is not None else None
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos, "bos_token": None,
        "unk_token": None, "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
    }, indent=2))
    return folder


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-level alphabet stands `char` in for."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
