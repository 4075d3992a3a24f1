"""Streamed sources: bad input counted by reason, disjoint data-parallel shards, exact resume from positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rntp_megatron.config import SourceConfig
from rntp_megatron.data.sources import DataError, SkipCounts, open_source


def read_all(src: SourceConfig, rank: int = 0, size: int = 1, max_bytes: int = 1 << 20, shard_bytes: int = 1 << 20):
    """One pass over the units of data-parallel rank `rank` of `size`: [(document, unit, position after)]."""
    skips = SkipCounts()
    source = open_source(src, max_bytes, skips, shard_bytes)
    items = [(d, u, p) for u in range(rank, source.num_units, size) for d, p in source.read(u, {})]
    return items, skips


def texts(items):
    return [item[0].text for item in items]


BAD_JSONL = [
    b'{"text": "first good document"}',
    b'{"text": "broken',                 # malformed_json
    b'{"body": "no text key"}',          # missing_field
    b'{"text": null}',                   # missing_field
    b'{"text": 17}',                     # missing_field
    b'[1, 2, 3]',                        # missing_field (not an object)
    b'{"text": "caf\xe9"}',              # invalid_utf8 (latin-1 byte)
    b'{"text": "   "}',                  # empty
    b'',                                 # empty
    b'{"text": "' + b"x" * 500 + b'"}',  # too_long at max_bytes=200
    b'{"text": "second \\u00e9 good"}',
]


def test_jsonl_bad_lines_are_counted_by_reason(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(BAD_JSONL) + b"\n")
    items, skips = read_all(SourceConfig(kind="jsonl", path=str(tmp_path)), max_bytes=200)
    assert texts(items) == ["first good document", "second \u00e9 good"]
    assert dict(skips) == {"malformed_json": 1, "missing_field": 4, "invalid_utf8": 1, "empty": 2, "too_long": 1}


def test_jsonl_custom_field_and_no_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    items, _ = read_all(SourceConfig(kind="jsonl", path=str(tmp_path / "a.jsonl"), text_field="body"))
    assert texts(items) == ["hello"]
    with pytest.raises(DataError, match="no .jsonl"):
        read_all(SourceConfig(kind="jsonl", path=str(tmp_path / "missing")))


@given(st.lists(st.binary(max_size=60), max_size=30), st.integers(1, 3), st.integers(8, 80), st.integers(1, 90))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_jsonl_random_bytes_never_crash_and_every_line_is_accounted(tmp_path, lines, dp_size, max_bytes, shard):
    path = tmp_path / "random.jsonl"
    data = b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines)
    path.write_bytes(data)
    total_good, total_skipped = 0, 0
    for rank in range(dp_size):
        items, skips = read_all(SourceConfig(kind="jsonl", path=str(path)), rank, dp_size, max_bytes, shard)
        total_good += len(items)
        total_skipped += sum(skips.values())
    n_lines = len(data.splitlines()) or 1  # an empty file is counted once, as empty_file
    if data[:64].split(b"\n")[0].strip() == b"[":
        n_lines = 1  # a JSON array file is counted once, as json_array
    assert total_good + total_skipped == n_lines


def make_corpora(tmp_path):
    """The same 23 documents as jsonl (2 files), text paragraphs, text files and parquet (row groups of 5)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document number {i} " + "word " * (i % 7) for i in range(23)]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]))
    (tmp_path / "j" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:]))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "all.txt").write_text("\n\n\n".join(docs) + "\n")
    (tmp_path / "f").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "f" / f"{i:03d}.txt").write_text(d)
    (tmp_path / "q").mkdir()
    pq.write_table(pa.table({"text": docs, "n": list(range(23))}), tmp_path / "q" / "d.parquet", row_group_size=5)
    return docs, {
        "jsonl": SourceConfig(kind="jsonl", path=str(tmp_path / "j")),
        "paragraph": SourceConfig(kind="text", path=str(tmp_path / "p"), text_unit="paragraph"),
        "file": SourceConfig(kind="text", path=str(tmp_path / "f")),
        "parquet": SourceConfig(kind="parquet", path=str(tmp_path / "q")),
    }


@pytest.mark.parametrize("kind", ["jsonl", "paragraph", "file", "parquet"])
@pytest.mark.parametrize("shard_bytes", [7, 64, 1 << 20])
def test_units_are_disjoint_cover_everything_and_resume_exactly(tmp_path, kind, shard_bytes):
    docs, sources = make_corpora(tmp_path)
    src = sources[kind]
    assert [t.strip() for t in texts(read_all(src, shard_bytes=shard_bytes)[0])] == [d.strip() for d in docs]
    shards = [read_all(src, r, 3, shard_bytes=shard_bytes)[0] for r in range(3)]
    assert sorted(t for s in shards for t in texts(s)) == sorted(texts(read_all(src)[0]))
    skips = SkipCounts()
    source = open_source(src, 1 << 20, skips, shard_bytes)
    for i, (_, unit, pos) in enumerate(shards[1]):  # reading on from any position gives exactly the rest
        assert [d.text for d, _ in source.read(unit, pos)] == [d.text for d, u, _ in shards[1][i + 1:] if u == unit]


def test_pydoc_source_is_real_text_and_shards():
    items, skips = read_all(SourceConfig(kind="pydoc"))
    assert len(items) > 50 and not skips
    assert sum(len(t) for t in texts(items)) > 300_000
    assert any("statement" in t for t in texts(items))
    halves = [[it[0].doc_id for it in read_all(SourceConfig(kind="pydoc"), r, 2)[0]] for r in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(it[0].doc_id for it in items)
    assert not set(halves[0]) & set(halves[1])


def test_parquet_missing_column_null_and_bad_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [b"good bytes", b"\xff\xfe", None, b""]}), tmp_path / "b.parquet")
    items, skips = read_all(SourceConfig(kind="parquet", path=str(tmp_path)))
    assert texts(items) == ["good bytes"]
    assert dict(skips) == {"missing_column": 1, "missing_field": 1, "invalid_utf8": 1, "empty": 1}


def test_text_sources_skip_invalid_utf8_empty_and_long(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine text")
    (tmp_path / "b.txt").write_bytes(b"\xff broken")
    (tmp_path / "c.txt").write_bytes(b"  \n ")
    (tmp_path / "d.txt").write_bytes(b"y" * 300)
    items, skips = read_all(SourceConfig(kind="text", path=str(tmp_path)), max_bytes=100)
    assert texts(items) == ["fine text"]
    assert dict(skips) == {"invalid_utf8": 1, "empty": 1, "too_long": 1}
    (tmp_path / "p.md").write_bytes(b"para one\nline two\n\n" + b"z" * 300 + b"\n\n\xff\n\nlast")
    items, skips = read_all(SourceConfig(kind="text", path=str(tmp_path / "p.md"), text_unit="paragraph"),
                            max_bytes=100)
    assert texts(items) == ["para one\nline two", "last"]
    assert dict(skips) == {"too_long": 1, "invalid_utf8": 1}


def test_megatron_source_reads_prepared_tokens_and_counts_truncated_bin(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "ds")
    docs = [np.arange(10 * i + 1, 10 * i + 1 + 5 + i, dtype=np.int32) for i in range(8)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_document(torch.from_numpy(d), [len(d)])
    builder.finalize(prefix + ".idx")
    src = SourceConfig(kind="megatron", path=prefix)
    items, skips = read_all(src)
    assert [d.token_ids.tolist() for d, _, _ in items] == [d.tolist() for d in docs] and not skips
    shard = read_all(src, 1, 3, shard_bytes=60)[0]  # units of 60 * 8 // 272 = 1 document
    assert [d.token_ids.tolist() for d, _, _ in shard] == [d.tolist() for d in docs[1::3]]
    two = open_source(src, 1 << 20, SkipCounts(), shard_bytes=80)  # 2 documents a unit
    assert two.num_units == 4 and [d.doc_id for d, _ in two.read(1, {})] == ["ds:2", "ds:3"]
    assert [d.doc_id for d, _ in two.read(1, {"doc": 3})] == ["ds:3"]
    data = (tmp_path / "ds.bin").read_bytes()
    (tmp_path / "ds.bin").write_bytes(data[: len(data) - 4 * (len(docs[-1]) + 3)])  # cut into docs 6 and 7
    items, skips = read_all(src)
    assert [d.token_ids.tolist() for d, _, _ in items] == [d.tolist() for d in docs[:6]]
    assert dict(skips) == {"truncated_bin": 2}
    (tmp_path / "ds.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_all(src)


@given(st.binary(max_size=400), st.integers(1, 5), st.integers(4, 60), st.integers(1, 90))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_text_from_random_bytes_is_read_once_whatever_the_units(tmp_path, data, dp_size, max_bytes, shard_bytes):
    (tmp_path / "r.txt").write_bytes(data)
    for unit in ("paragraph", "file"):
        src = SourceConfig(kind="text", path=str(tmp_path / "r.txt"), text_unit=unit)
        whole, whole_skips = read_all(src, max_bytes=max_bytes)
        shards = [read_all(src, r, dp_size, max_bytes, shard_bytes) for r in range(dp_size)]
        assert sorted(d.doc_id for items, _ in shards for d, _, _ in items) == sorted(d.doc_id for d, _, _ in whole)
        assert sorted(t for items, _ in shards for t in texts(items)) == sorted(texts(whole))
        assert sum((skips for _, skips in shards), SkipCounts()) == whole_skips
        for doc, _, _ in whole:
            assert doc.text.strip() and len(doc.text.encode()) <= max_bytes
