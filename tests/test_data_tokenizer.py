"""Tokenizers: byte-level round trips and token bytes, a locally trained BPE loaded as a Hugging Face tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rntp_megatron.config import TokenizerConfig, build_config
from rntp_megatron.data.tokenizer import (DEFAULT_TAGS, ByteTokenizer, HFTokenizer, build_tokenizer,
                                          tokenizer_for, train_tokenizer)

BYTE = ByteTokenizer()


def test_byte_tokenizer_layout():
    assert BYTE.vocab_size == 262  # 256 bytes + 4 tags + eos + pad
    assert [BYTE.encode(t) for t in DEFAULT_TAGS] == [[256], [257], [258], [259]]
    assert (BYTE.eos_id, BYTE.pad_id) == (260, 261)
    assert BYTE.encode("a</think>b<think>") == [97, 257, 98, 256]
    assert BYTE.encode("é") == [0xC3, 0xA9]
    with pytest.raises(ValueError, match="outside"):
        BYTE.token_bytes(262)


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_byte_round_trip_and_token_bytes(text):
    ids = BYTE.encode(text)
    assert BYTE.decode(ids) == text
    assert b"".join(BYTE.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert all(0 <= i < BYTE.vocab_size for i in ids)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> HFTokenizer:
    from pydoc_data.topics import topics

    return train_tokenizer(list(topics.values())[:40], tmp_path_factory.mktemp("tok"), vocab_size=600)


def test_trained_tokenizer_is_a_local_hf_tokenizer(trained):
    assert trained.vocab_size == 600
    reloaded = build_tokenizer(TokenizerConfig(kind="hf", path=str(trained.path)))
    text = "The <think>loop</think><answer> statement</answer>"
    assert reloaded.encode(text) == trained.encode(text)
    for tag in DEFAULT_TAGS:
        assert len(trained.encode(tag)) == 1, tag
    assert len(trained.encode("the statement is executed")) < len("the statement is executed")  # merges learned
    assert trained.decode([trained.eos_id]) == "<|eos|>"


@given(st.text(max_size=80))
@settings(max_examples=60, deadline=None)
def test_trained_round_trip_and_token_bytes(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert b"".join(trained.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="needs the folder"):
        build_tokenizer(TokenizerConfig(kind="hf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="cannot hold"):
        train_tokenizer(["abc"], tmp_path, vocab_size=100)


def test_configured_tags_are_single_tokens():
    data = build_config({"data": {"think_open": "<reason>", "think_close": "</reason>",
                                  "prompt_template": "Q: {context}<reason>"}}).data
    tok = tokenizer_for(data)
    assert tok.encode("x<reason>y</reason>") == [120, 256, 121, 257]
    assert tok.encode("<think>") == list(b"<think>")


TAGGED = "Ab <think>x y</think><answer> 42</answer>é"


def test_qwen3_keeps_its_think_tags_and_adds_only_the_answer_tags(tmp_path):
    from tests.family_tokenizers import write_family_tokenizer

    folder = write_family_tokenizer(tmp_path, "qwen3")
    tok = HFTokenizer(folder)
    base = 256 + 26
    assert tok._tok.convert_tokens_to_ids(["<think>", "</think>"]) == [base - 2, base - 1]  # Qwen3's own ids
    assert tok.added_tags == ["<answer>", "</answer>"] and tok.mapped_tags == {}
    assert tok.vocab_size == base + 2 and tok.eos_id == 256 + 2 and tok.pad_id == 256  # <|im_end|>, <|endoftext|>
    ids = tok.encode(TAGGED)
    assert [ids.count(i) for i in (base - 2, base - 1, base, base + 1)] == [1, 1, 1, 1]
    assert tok.decode(ids) == TAGGED and b"".join(tok.token_bytes(i) for i in ids) == TAGGED.encode()


def test_llama3_puts_the_tags_on_reserved_special_tokens_without_growing(tmp_path):
    from tests.family_tokenizers import write_family_tokenizer

    folder = write_family_tokenizer(tmp_path, "llama3")
    tok = HFTokenizer(folder)
    assert tok.vocab_size == 512 and tok.added_tags == []  # Llama 3's 128,256 stays 128,256
    reserved = [tok._tok.convert_tokens_to_ids(f"<|reserved_special_token_{k}|>") for k in range(4)]
    assert reserved == [256 + 2, 256 + 3, 256 + 5, 256 + 11]  # reserved 0..3 in Llama 3.1's layout
    assert tok.mapped_tags == dict(zip(DEFAULT_TAGS, reserved))
    ids = tok.encode(TAGGED)
    assert [ids.count(i) for i in reserved] == [1, 1, 1, 1] and len(ids) == len(TAGGED.encode()) - sum(map(len, DEFAULT_TAGS)) + 4
    assert tok.decode(ids) == TAGGED and b"".join(tok.token_bytes(i) for i in ids) == TAGGED.encode()
    assert tok.eos_id == 256 + 1 and tok.pad_id == tok.eos_id
    # the trainer's tokenizer, with the run's tags: the same mapping
    data = build_config({"data": {"tokenizer": {"kind": "hf", "path": str(folder)}}}).data
    assert tokenizer_for(data).encode("<answer>") == [reserved[2]]
