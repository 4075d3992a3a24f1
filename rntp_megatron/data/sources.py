"""Streamed document sources: JSONL (and .jsonl.gz), Parquet, plain text, Megatron .bin/.idx, pydoc prose, the
synthetic corpus.

A source is a sequence of units, each read on its own: a newline-aligned byte range of a JSONL or text file
(`data.shard_bytes` long; a gzip'd file is one unit, a text file read whole is one unit), a Parquet row group
(a whole Parquet file when the source has PARQUET_FILE_UNITS files or more, so that no rank reads every
footer), a range of documents of a Megatron dataset, one pydoc topic, one synthetic document (endless).
Units are numbered 0, 1, ... in a fixed order (files sorted by name) that does not depend on the
data-parallel layout; shards.py deals them out to the ranks, so a rank opens and reads only its own units.
`read(unit, position)` yields (Document, next_position); the position is a small dict (byte offset, row
group and row, document number) from which the unit's reading resumes exactly. A document belongs to the
unit where it starts: a line or paragraph that starts inside a byte range is read whole by that range's
reader (which reads on past the range's end to finish it), and the next range skips it.

Bad input never stops a run: it is counted by reason in a `SkipCounts` and skipped. Per document:
malformed_json (also nesting too deep to parse), missing_field (absent, null or not a string), invalid_utf8,
lone_surrogate (a JSON string escaping half a UTF-16 pair, `"\\ud800"`: no UTF-8 text), empty, too_long (over
data.max_document_bytes), truncated_bin (.bin shorter than its .idx says). Per file, counted once (by the
unit at the file's start): empty_file (0 bytes), unreadable_file (cannot be opened), corrupt_file (a Parquet
or gzip file that does not decode), missing_column (Parquet without the text column), json_array (a JSON
array file, not JSONL). The episode builder adds too_short (no site fits) and bad_token_id.

Files are read through `open_counted`, so `bytes_read()` is what this process has read from disk; the
Megatron reader maps its files and counts the index entries and tokens it touches.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

import numpy as np

from rntp_megatron.config import SourceConfig

Position = dict[str, int]

SKIP_REASONS = ("malformed_json", "missing_field", "invalid_utf8", "empty", "too_long", "truncated_bin",
                "empty_file", "unreadable_file", "corrupt_file", "missing_column", "json_array",
                "too_short", "bad_token_id", "lone_surrogate")
PARQUET_FILE_UNITS = 64  # from this many Parquet files on, a unit is a file (footers are read by its reader)
_WHITESPACE = frozenset(b" \t\r\n\x0b\x0c")  # what bytes.strip() strips
_READ = [0]  # bytes read from disk by this process (open_counted)


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


class _CountedFile(io.FileIO):
    """A file whose reads add to this process's byte count."""

    def readinto(self, buffer: Any) -> Optional[int]:
        n = super().readinto(buffer)
        _READ[0] += n or 0
        return n

    def readall(self) -> bytes:
        data = super().readall()
        _READ[0] += len(data)
        return data


def open_counted(path: str | Path, buffer_size: int = 1 << 16) -> io.BufferedReader:
    """`path` opened for buffered binary reading, its reads counted in bytes_read()."""
    return io.BufferedReader(_CountedFile(path, "rb"), buffer_size)


def bytes_read() -> int:
    """Bytes this process has read from disk through the sources (a counter; take differences)."""
    return _READ[0]


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


def _read_record(f: BinaryIO, limit: int) -> tuple[Optional[bytes], bool, bool]:
    """The next line of `f` without its newline, never holding more than limit+1 bytes: (line, too_long,
    blank). line is None at end of file, b"" when too long (drained in bounded pieces); blank: all whitespace."""
    line = f.readline(limit + 1)
    if not line:
        return None, False, True
    if len(line) > limit and not line.endswith(b"\n"):
        blank = not line.strip()
        while True:
            rest = f.readline(1 << 20)
            blank = blank and not rest.strip()
            if not rest or rest.endswith(b"\n"):
                return b"", True, blank
    line = line.rstrip(b"\r\n")
    return line, False, not line.strip()


def _next_line_start(f: BinaryIO, start: int) -> int:
    """The offset of the first line of `f` that starts at or after byte `start` > 0 (f is left there)."""
    f.seek(start - 1)
    while True:
        piece = f.readline(1 << 16)
        if not piece or piece.endswith(b"\n"):
            return f.tell()


def _previous_line_blank(f: io.BufferedReader, at: int) -> bool:
    """Whether the line ending with the newline at byte at-1 is all whitespace: scanned backwards in small
    reads (not a buffer's worth each), stopping at its last non-whitespace byte."""
    pos, block = at - 1, 64
    while pos > 0:
        low = max(0, pos - block)
        data = os.pread(f.fileno(), pos - low, low)
        _READ[0] += len(data)
        for b in reversed(data):
            if b == 0x0A:
                return True
            if b not in _WHITESPACE:
                return False
        pos, block = low, block * 2
    return True


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
    try:  # JSON may escape half a surrogate pair: a str no tokenizer can encode
        value.encode("utf-8")
    except UnicodeEncodeError:
        skips.add("lone_surrogate")
        return None
    return value


class Source:
    """A source as units read on their own (module docstring); `num_units` is None for an endless one."""

    num_units: Optional[int] = None

    def __init__(self, src: SourceConfig, max_bytes: int, skips: SkipCounts) -> None:
        self.src, self.max_bytes, self.skips = src, max_bytes, skips

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        """Documents of `unit` from position `pos` ({}: its start), each with the position after it."""
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        """One pass over all units in order (a finite source)."""
        for unit in range(self.num_units or 0):
            for doc, _ in self.read(unit, {}):
                yield doc


class FileRangeSource(Source):
    """Files cut into consecutive units of `unit_size` coordinates each (bytes; None: a file is one unit)."""

    suffixes: tuple[str, ...] = ()

    def __init__(self, src: SourceConfig, max_bytes: int, skips: SkipCounts, unit_size: Optional[int]) -> None:
        super().__init__(src, max_bytes, skips)
        self.files = list_files(src.path, self.suffixes)
        self.lengths = [self.file_length(f) for f in self.files]
        counts = [1 if not unit_size or n <= 0 or self.whole(f) else -(-n // unit_size)
                  for f, n in zip(self.files, self.lengths)]
        self.unit_size = unit_size
        self._first = np.cumsum([0] + counts).tolist()
        self.num_units = self._first[-1]

    def file_length(self, path: Path) -> int:
        """The file's length in its coordinate (-1: cannot be read)."""
        try:
            return os.path.getsize(path)
        except OSError:
            return -1

    def whole(self, path: Path) -> bool:
        """Whether a file is read as one unit whatever its size."""
        return False

    def locate(self, unit: int) -> tuple[int, int, int]:
        """unit -> (file index, start, stop) in the file's coordinate."""
        fi = bisect.bisect_right(self._first, unit) - 1
        n = self.lengths[fi]
        if not self.unit_size or self.whole(self.files[fi]) or n <= 0:
            return fi, 0, max(n, 0)
        start = (unit - self._first[fi]) * self.unit_size
        return fi, start, min(start + self.unit_size, n)

    def open_unit(self, fi: int, start: int, stop: int) -> Optional[io.BufferedReader]:
        """The file of a byte-range unit, or None (an empty or unreadable file: counted by its first unit)."""
        reason = {0: "empty_file", -1: "unreadable_file"}.get(self.lengths[fi])
        if reason is None:
            try:
                return open_counted(self.files[fi], max(256, min(1 << 20, (stop - start) // 64)))
            except OSError:
                reason = "unreadable_file"
        if start == 0:
            self.skips.add(reason)
        return None


class JsonlSource(FileRangeSource):
    """One JSON object per line; the document is its `text_field` string. `.gz` files are decompressed (one
    unit each: a gzip stream cannot be entered in the middle); a JSON array file is counted and skipped."""

    suffixes = (".jsonl", ".json", ".jsonl.txt", ".jsonl.gz", ".json.gz")

    def whole(self, path: Path) -> bool:
        return path.name.endswith(".gz")

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        fi, start, stop = self.locate(unit)
        path = self.files[fi]
        raw = self.open_unit(fi, start, stop)
        if raw is None:
            return
        gz = path.name.endswith(".gz")
        with raw, (gzip.GzipFile(fileobj=raw) if gz else raw) as f:
            try:
                reason = self._file_problem(f, path)
                if reason is not None:
                    if start == 0:
                        self.skips.add(reason)
                    return
                offset = pos.get("offset")
                if offset is None:
                    offset = _next_line_start(f, start) if start else 0
                f.seek(offset)
                while gz or f.tell() < stop:  # lines that start in [start, stop)
                    line_start = f.tell()
                    line, too_long, _ = _read_record(f, self.max_bytes)
                    if line is None:
                        return
                    doc = self._document(line, too_long, f"{path.name}:{line_start}")
                    if doc is not None:
                        yield doc, {"offset": f.tell()}
            except (OSError, EOFError, zlib.error):  # a gzip stream that is corrupt or cut short
                self.skips.add("corrupt_file")

    @staticmethod
    def _file_problem(f: BinaryIO, path: Path) -> Optional[str]:
        """json_array (a `.json` file opening with `[`, or a file whose first line is `[` alone), empty_file
        (a gzip stream of nothing), or None."""
        if isinstance(f, gzip.GzipFile):
            head = f.read(64)
            f.seek(0)
            if not head:
                return "empty_file"
        else:  # 64 bytes, not a buffer's worth: every unit of the file looks
            head = os.pread(f.fileno(), 64, 0)
            _READ[0] += len(head)
        first_line = head.split(b"\n", 1)[0].strip()
        array = head.lstrip().startswith(b"[") and (path.name.endswith((".json", ".json.gz")) or first_line == b"[")
        return "json_array" if array else None

    def _document(self, line: bytes, too_long: bool, doc_id: str) -> Optional[Document]:
        if too_long:
            self.skips.add("too_long")
            return None
        text = _decode(line, self.skips)
        if text is None:
            return None
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            self.skips.add("malformed_json")
            return None
        text = _text_field(obj.get(self.src.text_field) if isinstance(obj, dict) else None, self.skips)
        return Document(doc_id, text) if text is not None else None


class TextFileSource(FileRangeSource):
    """Plain text files, one document a file (`text_unit: file`)."""

    suffixes = (".txt", ".md", ".text")

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        fi, start, stop = self.locate(unit)
        if pos.get("offset"):
            return
        f = self.open_unit(fi, start, stop)
        if f is None:
            return
        with f:
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            self.skips.add("too_long")
            return
        text = _decode(data, self.skips)
        if text is not None:
            yield Document(self.files[fi].name, text), {"offset": 1}


class ParagraphSource(FileRangeSource):
    """Plain text files cut into paragraphs at blank (all-whitespace) lines (`text_unit: paragraph`); a
    paragraph belongs to the byte range its first line starts in."""

    suffixes = TextFileSource.suffixes

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        fi, start, stop = self.locate(unit)
        f = self.open_unit(fi, start, stop)
        if f is None:
            return
        with f:
            offset = pos.get("offset")
            if offset is None:
                offset = self._first_boundary(f, start, stop)
            f.seek(offset)
            lines: list[bytes] = []
            size, too_long, first = 0, False, -1
            while True:
                line_start = f.tell()
                line, long_line, blank = _read_record(f, self.max_bytes)
                if line is not None and not blank:
                    if first < 0:
                        if line_start >= stop:
                            return
                        first = line_start
                    size += len(line) + 1
                    too_long = too_long or long_line or size > self.max_bytes
                    if not too_long:
                        lines.append(line)
                    continue
                if first >= 0:  # a blank line or the end of the file closes a paragraph
                    text = None
                    if too_long:
                        self.skips.add("too_long")
                    else:
                        text = _decode(b"\n".join(lines), self.skips)
                    if text is not None:
                        yield Document(f"{self.files[fi].name}:{first}", text), {"offset": f.tell()}
                    lines, size, too_long, first = [], 0, False, -1
                if line is None or line_start >= stop:
                    return

    def _first_boundary(self, f: BinaryIO, start: int, stop: int) -> int:
        """The first offset >= start between paragraphs: a paragraph running into the range is skipped."""
        if start == 0:
            return 0
        offset = _next_line_start(f, start)
        if offset >= stop or _previous_line_blank(f, offset):
            return offset
        f.seek(offset)
        while True:
            line, _, blank = _read_record(f, self.max_bytes)
            if line is None or blank:
                return f.tell()


class ParquetSource(FileRangeSource):
    """Parquet files; the document is column `text_field`. With fewer than PARQUET_FILE_UNITS files a unit is a
    row group (every rank reads the footers once, then only its row groups' column chunks); from that many on
    a unit is a file (read whole when it is at most WHOLE_PARQUET_BYTES, else footer and column chunks)."""

    suffixes = (".parquet",)
    WHOLE_PARQUET_BYTES = 4 << 20

    def __init__(self, src: SourceConfig, max_bytes: int, skips: SkipCounts) -> None:
        self._by_file = len(list_files(src.path, self.suffixes)) >= PARQUET_FILE_UNITS
        self._metadata: dict[Path, Any] = {}
        super().__init__(src, max_bytes, skips, unit_size=None if self._by_file else 1)

    def file_length(self, path: Path) -> int:
        """Row groups, from the footer (1 when units are files, or the footer cannot be read)."""
        if self._by_file:
            return 1
        try:
            with open_counted(path) as f:
                pf = _parquet_file(f)
        except OSError:
            return 1
        if pf is None:
            return 1
        self._metadata[path] = pf.metadata
        return max(1, pf.num_row_groups)

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        import pyarrow as pa

        fi, start, stop = self.locate(unit)
        path, first = self.files[fi], start == 0
        try:
            size = path.stat().st_size
            f = open_counted(path) if size else None
        except OSError:
            if first:
                self.skips.add("unreadable_file")
            return
        if f is None:
            if first:
                self.skips.add("empty_file")
            return
        with f:
            whole = self._by_file and size <= self.WHOLE_PARQUET_BYTES
            pf = _parquet_file(pa.BufferReader(f.read()) if whole else f, self._metadata.get(path))
            reason = "corrupt_file" if pf is None else (
                "missing_column" if self.src.text_field not in pf.schema_arrow.names else None)
            if reason is not None:
                if first:
                    self.skips.add(reason)
                return
            stop = pf.num_row_groups if self._by_file else min(stop, pf.num_row_groups)
            for g in range(pos.get("group", start), stop):
                try:
                    column = pf.read_row_group(g, columns=[self.src.text_field]).column(0)
                    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                        # as bytes: Arrow does not check UTF-8 on read, a damaged page decodes here, counted
                        column = column.cast(pa.large_binary())
                except (pa.ArrowException, OSError, ValueError):
                    self.skips.add("corrupt_file")
                    return
                for r in range(pos.get("row", 0) if g == pos.get("group", start) else 0, len(column)):
                    doc = self._document(column[r].as_py(), f"{path.name}:{g}:{r}")
                    if doc is not None:
                        yield doc, {"group": g, "row": r + 1}

    def _document(self, value: Any, doc_id: str) -> Optional[Document]:
        if not isinstance(value, bytes):
            self.skips.add("missing_field")
            return None
        if len(value) > self.max_bytes:
            self.skips.add("too_long")
            return None
        text = _decode(value, self.skips)
        return Document(doc_id, text) if text is not None else None


def _parquet_file(f: Any, metadata: Any = None) -> Any:
    """A pyarrow ParquetFile over an open file (its footer already read: `metadata`), None when it does not
    decode."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f, metadata=metadata)
    except (pa.ArrowException, OSError, ValueError):
        return None


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


class MegatronSource(Source):
    """A Megatron indexed dataset (`path` is the prefix of .bin/.idx) read with megatron.core.datasets; a unit
    is a range of documents holding about `unit_bytes` of tokens; documents are token ids. Documents that lie
    past the end of a truncated .bin are counted and skipped."""

    def __init__(self, src: SourceConfig, max_bytes: int, skips: SkipCounts, unit_bytes: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        super().__init__(src, max_bytes, skips)
        prefix = megatron_prefix(src.path)
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise DataError(f"Megatron dataset {prefix!r}: {prefix + suffix} does not exist")
        self.bin_size = os.path.getsize(prefix + ".bin")
        if self.bin_size == 0:
            raise DataError(f"Megatron dataset {prefix!r}: {prefix}.bin is empty (truncated?)")
        try:
            self.dataset = IndexedDataset(prefix)
        except (ValueError, AssertionError, OSError) as e:
            raise DataError(f"Megatron dataset {prefix!r} cannot be opened: {e}") from e
        self.name = Path(prefix).name
        self.index = self.dataset.index
        self.itemsize = np.dtype(self.index.dtype).itemsize
        # One sequence a document is what prepare-data writes; a multi-sequence document is read as a whole.
        self.num_docs = len(self.index.document_indices) - 1
        self.docs_per_unit = max(1, unit_bytes * self.num_docs // self.bin_size)
        self.num_units = max(1, -(-self.num_docs // self.docs_per_unit))

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        bounds, index = self.index.document_indices, self.index
        stop = min((unit + 1) * self.docs_per_unit, self.num_docs)
        for d in range(pos.get("doc", unit * self.docs_per_unit), stop):
            seqs = range(int(bounds[d]), int(bounds[d + 1]))
            lengths = [int(index.sequence_lengths[s]) for s in seqs]
            ends = [int(index.sequence_pointers[s]) + n * self.itemsize for s, n in zip(seqs, lengths)]
            _READ[0] += 8 + 12 * len(seqs)  # its document and sequence index entries
            if any(e > self.bin_size for e in ends):
                self.skips.add("truncated_bin")
                continue
            if sum(lengths) > self.max_bytes:  # a token is >= 1 byte of text
                self.skips.add("too_long")
                continue
            # A copy: the dataset unmaps its .bin when it is collected, and views would dangle.
            ids = np.concatenate([self.dataset.get(s) for s in seqs]).astype(np.int64)
            _READ[0] += sum(lengths) * self.itemsize
            if ids.size == 0:
                self.skips.add("empty")
                continue
            yield Document(f"{self.name}:{d}", token_ids=ids), {"doc": d + 1}


class PydocSource(Source):
    """Real English reference prose shipped with every Python (`pydoc_data.topics`), one document (and unit)
    a topic."""

    def __init__(self, src: SourceConfig, max_bytes: int, skips: SkipCounts) -> None:
        from pydoc_data.topics import topics

        super().__init__(src, max_bytes, skips)
        self.topics = topics
        self.keys = sorted(topics)
        self.num_units = len(self.keys)

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        if not pos:
            text = _text_field(self.topics[self.keys[unit]], self.skips)
            if text is not None:
                yield Document(f"pydoc:{self.keys[unit]}", text), {"done": 1}


class SyntheticSource(Source):
    """The synthetic RNTP corpus (rntp_megatron.data.synthetic), endless, one document a unit: document n of
    (`src.seed`, `src.split`) is generated on its own, with text and per-character labels."""

    def __init__(self, src: SourceConfig, max_bytes: int, skips: SkipCounts) -> None:
        from rntp_megatron.data.synthetic import SyntheticSpec, synthetic_spec

        super().__init__(src, max_bytes, skips)
        self.spec, kinds = synthetic_spec(src.synthetic)
        self.spec.validate()
        self.weights = kinds if kinds is not None else self.spec.kind_weights
        SyntheticSpec(kind_weights=self.weights).validate()

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        from rntp_megatron.data.synthetic import synthetic_document

        if not pos:
            item = synthetic_document(self.src.seed, self.src.split, unit, self.spec, self.weights)
            text = _text_field(item.get("text"), self.skips)
            if text is not None:
                yield Document(f"synthetic:{self.src.split}:{unit}", text, labels=item.get("labels")), {"done": 1}


def open_source(src: SourceConfig, max_bytes: int, skips: SkipCounts, shard_bytes: int = 16 << 20) -> Source:
    """`src` as units (byte ranges of `shard_bytes`); skipped inputs are counted into `skips`."""
    if src.kind not in ("pydoc", "synthetic") and not src.path:
        raise DataError(f"source kind {src.kind!r} needs a path")
    makers: dict[str, Callable[[], Source]] = {
        "jsonl": lambda: JsonlSource(src, max_bytes, skips, shard_bytes),
        "text": lambda: (ParagraphSource(src, max_bytes, skips, shard_bytes) if src.text_unit == "paragraph"
                         else TextFileSource(src, max_bytes, skips, None)),
        "parquet": lambda: ParquetSource(src, max_bytes, skips),
        "megatron": lambda: MegatronSource(src, max_bytes, skips, shard_bytes),
        "pydoc": lambda: PydocSource(src, max_bytes, skips),
        "synthetic": lambda: SyntheticSource(src, max_bytes, skips),
    }
    return makers[src.kind]()
