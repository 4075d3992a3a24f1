"""Streamed document sources: JSONL, Parquet, plain text, Megatron .bin/.idx, pydoc prose, the synthetic corpus.

A source is read as a sequence of documents numbered 0, 1, 2, ... in a fixed order (files sorted by name).
Data-parallel rank r of D owns the documents whose number n has n % D == r, so ranks read disjoint shards
without talking to each other. Every reader is a generator `read(position) -> (Document, next_position)`:
the position is a small dict (file index, byte offset or row, document number) from which reading resumes
exactly, which is what makes the stream's cursor checkpointable. Nothing is held in memory beyond one
document (one Parquet row group).

Bad input never stops a run: it is counted by reason in a `SkipCounts` and skipped. Reasons:
malformed_json, missing_field (absent, null or not a string), invalid_utf8, empty, too_long (over
data.max_document_bytes), truncated_bin (.bin shorter than its .idx says); the episode builder adds
too_short (no site fits) and bad_token_id.
"""

from __future__ import annotations

import collections
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np

from rntp_megatron.config import SourceConfig

Position = dict[str, int]
Reader = Callable[[Position], Iterator[tuple["Document", Position]]]

SKIP_REASONS = ("malformed_json", "missing_field", "invalid_utf8", "empty", "too_long", "truncated_bin",
                "too_short", "bad_token_id")


class DataError(ValueError):
    """Data cannot be read at all (no files, nothing usable, an incompatible cursor); the message says why."""


@dataclass
class Document:
    """One document: text, or token ids (Megatron source); `labels` are per-character classes (synthetic)."""

    doc_id: str
    text: Optional[str] = None
    token_ids: Optional[np.ndarray] = None
    labels: Optional[Sequence[str]] = None


class SkipCounts(collections.Counter):
    """Skipped inputs by reason (see module docstring)."""

    def add(self, reason: str, n: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r} (known: {', '.join(SKIP_REASONS)})")
        self[reason] += n

    def report(self) -> str:
        """'3 malformed_json, 1 empty' or 'none'."""
        return ", ".join(f"{n} {r}" for r, n in sorted(self.items()) if n) or "none"


def source_name(src: SourceConfig) -> str:
    return f"{src.kind}:{src.path}" if src.path else src.kind


def list_files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, the files under a folder with one of `suffixes` (recursive), or a glob; sorted by path."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes)]
    else:
        files = [Path(f) for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"no {'/'.join(suffixes)} files at {path!r} (a file, a folder or a glob)")
    return sorted(files)


def _read_record(f: BinaryIO, limit: int) -> tuple[Optional[bytes], bool]:
    """The next line of `f` (without its newline), never holding more than limit+1 bytes: (line, too_long).
    line is None at end of file."""
    line = f.readline(limit + 1)
    if not line:
        return None, False
    if len(line) > limit and not line.endswith(b"\n"):
        while True:  # drain the rest of the over-long line in bounded pieces
            rest = f.readline(1 << 20)
            if not rest or rest.endswith(b"\n"):
                break
        return b"", True
    return line.rstrip(b"\r\n"), False


def _decode(raw: bytes, skips: SkipCounts) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        skips.add("invalid_utf8")
        return None
    if not text.strip():
        skips.add("empty")
        return None
    return text


def _text_field(value: Any, skips: SkipCounts) -> Optional[str]:
    if not isinstance(value, str):
        skips.add("missing_field")
        return None
    if not value.strip():
        skips.add("empty")
        return None
    return value


def jsonl_reader(src: SourceConfig, dp_rank: int, dp_size: int, max_bytes: int, skips: SkipCounts) -> Reader:
    """One JSON object per line; the document is its `src.text_field` string."""
    files = list_files(src.path, (".jsonl", ".json", ".jsonl.txt"))

    def read(pos: Position) -> Iterator[tuple[Document, Position]]:
        file_i, offset, n = pos.get("file", 0), pos.get("offset", 0), pos.get("ordinal", 0)
        for fi in range(file_i, len(files)):
            with open(files[fi], "rb") as f:
                f.seek(offset if fi == file_i else 0)
                while True:
                    raw, too_long = _read_record(f, max_bytes)
                    if raw is None:
                        break
                    mine, n = n % dp_size == dp_rank, n + 1
                    if not mine:
                        continue
                    if too_long:
                        skips.add("too_long")
                        continue
                    text = _decode(raw, skips)
                    if text is None:
                        continue
                    try:
                        obj = json.loads(text)
                    except ValueError:
                        skips.add("malformed_json")
                        continue
                    value = obj.get(src.text_field) if isinstance(obj, dict) else None
                    text = _text_field(value, skips)
                    if text is not None:
                        yield Document(f"{files[fi].name}:{n - 1}", text), {"file": fi, "offset": f.tell(),
                                                                            "ordinal": n}
    return read


def text_reader(src: SourceConfig, dp_rank: int, dp_size: int, max_bytes: int, skips: SkipCounts) -> Reader:
    """Plain text files: one document a file (`text_unit: file`) or a paragraph (`paragraph`, split at
    blank lines)."""
    files = list_files(src.path, (".txt", ".md", ".text"))

    def whole_files(pos: Position) -> Iterator[tuple[Document, Position]]:
        for fi in range(pos.get("file", 0), len(files)):
            if fi % dp_size != dp_rank:
                continue
            with open(files[fi], "rb") as f:
                raw = f.read(max_bytes + 1)
            if len(raw) > max_bytes:
                skips.add("too_long")
                continue
            text = _decode(raw, skips)
            if text is not None:
                yield Document(files[fi].name, text), {"file": fi + 1}

    def paragraphs(pos: Position) -> Iterator[tuple[Document, Position]]:
        file_i, offset, n = pos.get("file", 0), pos.get("offset", 0), pos.get("ordinal", 0)
        for fi in range(file_i, len(files)):
            with open(files[fi], "rb") as f:
                f.seek(offset if fi == file_i else 0)
                lines: list[bytes] = []
                size, too_long = 0, False
                while True:
                    raw, long_line = _read_record(f, max_bytes)
                    if raw is not None and (long_line or raw.strip()):
                        size += len(raw) + 1
                        too_long = too_long or long_line or size > max_bytes
                        if not too_long:
                            lines.append(raw)
                        continue
                    if lines or too_long:  # a blank line or the end of the file closes a paragraph
                        mine, n = n % dp_size == dp_rank, n + 1
                        if mine and too_long:
                            skips.add("too_long")
                        elif mine:
                            text = _decode(b"\n".join(lines), skips)
                            if text is not None:
                                yield Document(f"{files[fi].name}:{n - 1}", text), {
                                    "file": fi, "offset": f.tell(), "ordinal": n}
                        lines, size, too_long = [], 0, False
                    if raw is None:
                        break
    return whole_files if src.text_unit == "file" else paragraphs


def parquet_reader(src: SourceConfig, dp_rank: int, dp_size: int, max_bytes: int, skips: SkipCounts) -> Reader:
    """Parquet files read one row group at a time; the document is column `src.text_field`."""
    import pyarrow.parquet as pq

    files = list_files(src.path, (".parquet",))

    def read(pos: Position) -> Iterator[tuple[Document, Position]]:
        file_i, group_i, row_i = pos.get("file", 0), pos.get("group", 0), pos.get("row", 0)
        n = pos.get("ordinal", 0)
        for fi in range(file_i, len(files)):
            pf = pq.ParquetFile(files[fi])
            has_field = src.text_field in pf.schema_arrow.names
            for gi in range(group_i if fi == file_i else 0, pf.num_row_groups):
                start = row_i if (fi, gi) == (file_i, group_i) else 0
                rows = pf.metadata.row_group(gi).num_rows
                column = pf.read_row_group(gi, columns=[src.text_field]).column(0) if has_field else None
                for ri in range(start, rows):
                    mine, n = n % dp_size == dp_rank, n + 1
                    if not mine:
                        continue
                    value = column[ri].as_py() if column is not None else None
                    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
                    if isinstance(raw, bytes) and len(raw) > max_bytes:
                        skips.add("too_long")
                        continue
                    text = _decode(raw, skips) if isinstance(value, bytes) else _text_field(value, skips)
                    if text is not None:
                        yield Document(f"{files[fi].name}:{gi}:{ri}", text), {
                            "file": fi, "group": gi, "row": ri + 1, "ordinal": n}
    return read


def megatron_prefix(path: str) -> str:
    """The dataset prefix of a Megatron .bin/.idx path (either file, or the prefix itself)."""
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def check_megatron_vocab(src: SourceConfig, vocab_size: int) -> None:
    """Refuse a dataset that prepare-data tokenized with a different vocabulary (its PREFIX.json says)."""
    info = Path(megatron_prefix(src.path) + ".json")
    if info.is_file():
        written = json.loads(info.read_text()).get("vocab_size")
        if written is not None and written != vocab_size:
            raise DataError(f"Megatron dataset {src.path!r} was tokenized with vocab_size={written} "
                            f"({info}), this run's tokenizer has vocab_size={vocab_size}")


def megatron_reader(src: SourceConfig, dp_rank: int, dp_size: int, max_bytes: int, skips: SkipCounts) -> Reader:
    """A Megatron indexed dataset (`src.path` is the prefix of .bin/.idx), read with megatron.core.datasets;
    documents are token ids. Documents that lie past the end of a truncated .bin are counted and skipped."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = megatron_prefix(src.path)
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise DataError(f"Megatron dataset {prefix!r}: {prefix + suffix} does not exist")
    bin_size = os.path.getsize(prefix + ".bin")
    if bin_size == 0:
        raise DataError(f"Megatron dataset {prefix!r}: {prefix}.bin is empty (truncated?)")
    try:
        dataset = IndexedDataset(prefix)
    except (ValueError, AssertionError, OSError) as e:
        raise DataError(f"Megatron dataset {prefix!r} cannot be opened: {e}") from e
    index = dataset.index
    itemsize = np.dtype(index.dtype).itemsize
    # One sequence a document is what prepare-data writes; a multi-sequence document is read as a whole.
    doc_bounds = index.document_indices
    num_docs = len(doc_bounds) - 1

    def read(pos: Position) -> Iterator[tuple[Document, Position]]:
        first = pos.get("ordinal", 0)
        first += (dp_rank - first) % dp_size
        for d in range(first, num_docs, dp_size):
            seqs = range(int(doc_bounds[d]), int(doc_bounds[d + 1]))
            ends = [int(index.sequence_pointers[s]) + int(index.sequence_lengths[s]) * itemsize for s in seqs]
            if any(e > bin_size for e in ends):
                skips.add("truncated_bin")
                continue
            if sum(int(index.sequence_lengths[s]) for s in seqs) > max_bytes:  # a token is >= 1 byte of text
                skips.add("too_long")
                continue
            # A copy: the dataset unmaps its .bin when it is collected, and views would dangle.
            ids = np.concatenate([dataset.get(s) for s in seqs]).astype(np.int64)
            if ids.size == 0:
                skips.add("empty")
                continue
            yield Document(f"{Path(prefix).name}:{d}", token_ids=ids), {"ordinal": d + 1}
    return read


def pydoc_reader(src: SourceConfig, dp_rank: int, dp_size: int, max_bytes: int, skips: SkipCounts) -> Reader:
    """Real English reference prose shipped with every Python (`pydoc_data.topics`), one document a topic."""
    from pydoc_data.topics import topics

    keys = sorted(topics)

    def read(pos: Position) -> Iterator[tuple[Document, Position]]:
        for i in range(pos.get("ordinal", 0), len(keys)):
            if i % dp_size == dp_rank:
                text = _text_field(topics[keys[i]], skips)
                if text is not None:
                    yield Document(f"pydoc:{keys[i]}", text), {"ordinal": i + 1}
    return read


def synthetic_reader(src: SourceConfig, dp_rank: int, dp_size: int, max_bytes: int, skips: SkipCounts) -> Reader:
    """The synthetic RNTP corpus: `rntp_megatron.data.synthetic.synthetic_documents(seed, split)` yields dicts
    with "text" and optional per-character "labels"; `src.seed` and `src.split` choose the stream."""

    def read(pos: Position) -> Iterator[tuple[Document, Position]]:
        from rntp_megatron.data.synthetic import synthetic_documents, synthetic_spec

        spec, kinds = synthetic_spec(src.synthetic)
        start = pos.get("ordinal", 0)
        for n, item in enumerate(synthetic_documents(src.seed, src.split, spec, kinds)):
            if n < start or n % dp_size != dp_rank:
                continue
            text = _text_field(item.get("text") if isinstance(item, dict) else None, skips)
            if text is not None:
                yield Document(f"synthetic:{src.split}:{n}", text, labels=item.get("labels")), {"ordinal": n + 1}
    return read


READERS: dict[str, Callable[[SourceConfig, int, int, int, SkipCounts], Reader]] = {
    "jsonl": jsonl_reader,
    "text": text_reader,
    "parquet": parquet_reader,
    "megatron": megatron_reader,
    "pydoc": pydoc_reader,
    "synthetic": synthetic_reader,
}


def open_source(src: SourceConfig, dp_rank: int, dp_size: int, max_bytes: int, skips: SkipCounts) -> Reader:
    """The reader of this rank's shard of `src`; skipped inputs are counted into `skips`."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
    if src.kind not in ("pydoc", "synthetic") and not src.path:
        raise DataError(f"source kind {src.kind!r} needs a path")
    return READERS[src.kind](src, dp_rank, dp_size, max_bytes, skips)
