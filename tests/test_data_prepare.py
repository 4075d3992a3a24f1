"""`rntp prepare-data`: identical output for any worker count, exact tokens, counted bad input, a trained
tokenizer, and episodes from the prepared .bin/.idx equal to episodes from the text itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rntp_megatron.cli import main
from rntp_megatron.config import SourceConfig, TokenizerConfig, build_config
from rntp_megatron.data.prepare import prepare_data
from rntp_megatron.data.stream import EpisodeStream
from rntp_megatron.data.tokenizer import ByteTokenizer, build_tokenizer


@pytest.fixture
def corpus(tmp_path):
    good = [f"Document {i}: " + "the quick brown fox " * (i + 3) + "é" * i for i in range(40)]
    lines = [json.dumps({"text": t}) for t in good[:30]]
    lines[5:5] = ['{"text": oops', '{"title": "x"}', '{"text": ""}']
    (tmp_path / "c.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(good[30:]):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    return good, [SourceConfig(kind="jsonl", path=str(tmp_path / "c.jsonl")),
                  SourceConfig(kind="text", path=str(tmp_path / "txt"))]


def test_prepare_is_exact_and_independent_of_workers(tmp_path, corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    good, sources = corpus
    tok = ByteTokenizer()
    one = prepare_data(sources, TokenizerConfig(), str(tmp_path / "w1" / "ds"), workers=1, progress=False)
    two = prepare_data(sources, TokenizerConfig(), str(tmp_path / "w2" / "ds"), workers=2, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "w1" / f"ds{suffix}").read_bytes() == (tmp_path / "w2" / f"ds{suffix}").read_bytes()
    assert one.documents == two.documents == 40
    assert one.tokens == sum(len(tok.encode(t)) for t in good)
    assert one.skipped == {"malformed_json": 1, "missing_field": 1, "empty": 1, "invalid_utf8": 1}
    ds = IndexedDataset(str(tmp_path / "w1" / "ds"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) for t in good]
    info = json.loads((tmp_path / "w1" / "ds.json").read_text())
    assert info["vocab_size"] == 262 and info["documents"] == 40

    # The episode stream over the prepared tokens equals the one over the text source.
    prepare_data(sources[:1], TokenizerConfig(), str(tmp_path / "j" / "ds"), workers=2, progress=False)
    data = {"context_len": 40, "min_context": 8, "sites_per_chunk": 2, "answer_horizon": 3}
    from_text = EpisodeStream(build_config({"data": {"sources": [sources[0].__dict__], **data}}).data, tok)
    from_bin = EpisodeStream(build_config({"data": {"sources": [{"kind": "megatron",
                                                                  "path": str(tmp_path / "j" / "ds")}],
                                                     **data}}).data, tok)
    n = 0
    for a, b in zip(from_text.take(150), from_bin.take(150)):
        assert (a.prompt_ids, a.continuation_ids, a.continuation_text, a.site) == \
               (b.prompt_ids, b.continuation_ids, b.continuation_text, b.site)
        n += 1
    assert n == 150


def test_cli_trains_a_tokenizer_and_reports(tmp_path, corpus, capsys):
    _, sources = corpus
    tok_dir = tmp_path / "tok"
    rc = main(["prepare-data", "--source", f"jsonl:{sources[0].path}", "--source", f"text:{sources[1].path}",
               "--tokenizer", "trained", "--tokenizer-path", str(tok_dir), "--train-vocab-size", "300",
               "--output", str(tmp_path / "bpe"), "--workers", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "40 documents" in out and "1 malformed_json" in out and "1 invalid_utf8" in out
    tok = build_tokenizer(TokenizerConfig(kind="trained", path=str(tok_dir)))
    assert tok.vocab_size == 300
    cfg = build_config({"data": {"sources": [{"kind": "megatron", "path": str(tmp_path / "bpe")}],
                                 "tokenizer": {"kind": "trained", "path": str(tok_dir)}, "context_len": 24,
                                 "min_context": 4}}).data
    for e in EpisodeStream(cfg, tok).take(20):
        assert e.continuation_text == tok.decode(e.continuation_ids)
        assert np.all(np.asarray(e.context_ids) < 300)


def test_cli_refuses_a_source_with_nothing_usable(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_bytes(b"nope\n{\"a\": 1}\n\xff\n")
    rc = main(["prepare-data", "--source", f"jsonl:{tmp_path / 'bad.jsonl'}", "--output", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no usable document" in err and "1 malformed_json" in err and "1 invalid_utf8" in err
    assert not (tmp_path / "o.idx").exists()
    assert main(["prepare-data", "--source", "csv:x", "--output", str(tmp_path / "o"), "--no-progress"]) == 2
