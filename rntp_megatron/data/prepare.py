"""`rntp prepare-data`: tokenize streamed sources into a Megatron indexed dataset (.bin/.idx).

    rntp prepare-data --source jsonl:corpus/ --source pydoc --tokenizer byte --output data/corpus --workers 2

The main process streams documents (counting bad input by reason), worker processes tokenize batches of
them, and the main process writes the results in source order with megatron.core's IndexedDatasetBuilder,
so the output is identical for any number of workers. `<output>.json` records the tokenizer, vocab size
and counts; the `megatron` source checks it against the run's tokenizer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from rntp_megatron.config import SourceConfig, TokenizerConfig
from rntp_megatron.data.corpora import DICTD_ROOT, ENCYCLOPEDIA, write_splits
from rntp_megatron.data.sources import DataError, SkipCounts, open_source, source_name
from rntp_megatron.data.tokenizer import DEFAULT_TAGS, Tokenizer, build_tokenizer, train_tokenizer

BATCH_DOCS = 64  # documents per worker task: large enough to amortize pickling, small enough to stream


@dataclass
class PrepareReport:
    output: str
    documents: int
    tokens: int
    skipped: dict[str, int]
    seconds: float
    workers: int
    vocab_size: int
    tokenizer: dict = field(default_factory=dict)

    def summary(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return (f"wrote {self.output}.bin/.idx: {self.documents} documents, {self.tokens} tokens in "
                f"{self.seconds:.1f}s ({rate:,.0f} tokens/s, {self.workers} workers); skipped: {skipped}")


def parse_source(spec: str, text_field: str = "text", text_unit: str = "file") -> SourceConfig:
    """'kind:path' (or 'pydoc') -> SourceConfig."""
    kind, _, path = spec.partition(":")
    if kind not in ("jsonl", "parquet", "text", "megatron", "pydoc"):
        raise DataError(f"--source {spec!r}: kind must be jsonl, parquet, text, megatron or pydoc (kind:path)")
    return SourceConfig(kind=kind, path=path, text_field=text_field, text_unit=text_unit)  # type: ignore[arg-type]


def stream_texts(sources: Sequence[SourceConfig], max_bytes: int, skips: SkipCounts) -> Iterator[str]:
    """Texts of all sources in order (one pass, rank 0 of 1)."""
    for src in sources:
        if src.kind == "megatron":
            raise DataError(f"source {source_name(src)} is already tokenized; prepare-data reads text sources")
        for doc in open_source(src, max_bytes, skips).documents():
            yield doc.text or ""


_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(cfg: TokenizerConfig, tags: tuple[str, ...]) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(cfg, tags)


def _tokenize_batch(args: tuple[list[str], bool]) -> list[np.ndarray]:
    texts, append_eos = args
    tok = _WORKER_TOKENIZER
    assert tok is not None
    eos = [tok.eos_id] if append_eos else []
    return [np.asarray(tok.encode(t) + eos, dtype=np.int64) for t in texts]


def prepare_data(sources: Sequence[SourceConfig], tokenizer: TokenizerConfig, output: str, workers: int = 1,
                 append_eos: bool = False, max_document_bytes: int = 4 << 20, train_vocab_size: int = 0,
                 tags: Sequence[str] = DEFAULT_TAGS, progress: bool = True) -> PrepareReport:
    """Tokenize `sources` into `output`.bin/.idx with `workers` processes; train the tokenizer first when
    kind is `trained` and its folder has none yet (train_vocab_size ids)."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    start = time.perf_counter()  # after the imports: the report measures the data work
    tags = tuple(tags)
    if tokenizer.kind == "trained" and tokenizer.path and not (Path(tokenizer.path) / "tokenizer.json").exists():
        if train_vocab_size <= 0:
            raise DataError(f"tokenizer folder {tokenizer.path!r} has no tokenizer.json; give --train-vocab-size "
                            f"to train one on the sources")
        train_tokenizer(stream_texts(sources, max_document_bytes, SkipCounts()), tokenizer.path,
                        train_vocab_size, tags)
    vocab_size = build_tokenizer(tokenizer, tags).vocab_size
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32
    skips = SkipCounts()
    texts = stream_texts(sources, max_document_bytes, skips)
    batches = ((list(b), append_eos) for b in iter(lambda: list(itertools.islice(texts, BATCH_DOCS)), []))
    # Fork: workers inherit the imports; they only tokenize (no torch threads are running yet).
    pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer, tags))
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(f"{output}.bin", dtype=dtype)
        documents = tokens = 0
        bar = tqdm(unit="doc", disable=not progress, desc="prepare-data", file=sys.stderr)
        for arrays in pool.imap(_tokenize_batch, batches):
            for ids in arrays:
                if ids.size == 0:
                    skips.add("empty")
                    continue
                builder.add_document(torch.from_numpy(ids.astype(dtype)), [int(ids.size)])
                documents += 1
                tokens += int(ids.size)
            bar.update(len(arrays))
            bar.set_postfix(tokens=tokens, skipped=sum(skips.values()))
        bar.close()
    finally:
        pool.close()
        pool.join()
    if documents == 0:
        raise DataError(f"no usable document in {[source_name(s) for s in sources]} (skipped: {skips.report()})")
    builder.finalize(f"{output}.idx")
    report = PrepareReport(output, documents, tokens, dict(skips), time.perf_counter() - start, workers,
                           vocab_size, {**asdict(tokenizer), "tags": list(tags)})
    Path(f"{output}.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", default=[],
                        help="kind:path with kind jsonl | parquet | text, or 'pydoc'; repeat for several")
    parser.add_argument("--recipe", choices=["encyclopedia"],
                        help="a built-in corpus instead of --source: 'encyclopedia' = FOLDOC + Jargon File prose "
                             "(tools/install_corpus.sh), written as OUTPUT/{train,heldout}.jsonl/.bin/.idx split "
                             "by document (data/corpora.py)")
    parser.add_argument("--dictd-root", default="data/dictd", help="--recipe encyclopedia: the dictd databases")
    parser.add_argument("--heldout-percent", type=float, default=5.0, help="--recipe: documents held out")
    parser.add_argument("--thought-chars", type=int, default=0,
                        help="--recipe: the format examples' thoughts restate up to this many characters (0: empty)")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--tokenizer", choices=["byte", "hf", "trained"], default="byte")
    parser.add_argument("--tokenizer-path", help="folder of an hf tokenizer, or where a trained one lives")
    parser.add_argument("--train-vocab-size", type=int, default=0,
                        help="train a byte-level BPE of this size into --tokenizer-path when it has none")
    parser.add_argument("--text-field", default="text", help="JSONL key / Parquet column of the text")
    parser.add_argument("--text-unit", choices=["file", "paragraph"], default="file",
                        help="text sources: a document is a whole file or a paragraph")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--append-eos", action="store_true", help="end every document with the eos token")
    parser.add_argument("--max-document-bytes", type=int, default=4 << 20)
    parser.add_argument("--no-progress", action="store_true")


def prepare_encyclopedia(out_dir: str | Path, tokenizer: TokenizerConfig, workers: int = 1,
                         root: str = DICTD_ROOT, heldout_percent: float = 5.0, progress: bool = True,
                         thought_chars: int = 0) -> str:
    """The `encyclopedia` recipe (data/corpora.py): JSONL splits of FOLDOC + Jargon File, each tokenized into
    DIR/<split>.bin/.idx; returns a summary line per split."""
    out = Path(out_dir)
    counts = write_splits([db for db, _ in ENCYCLOPEDIA], out, heldout_percent, root, thought_chars=thought_chars)
    lines = []
    for split, c in counts.items():
        report = prepare_data([SourceConfig(kind="jsonl", path=str(out / f"{split}.jsonl"))], tokenizer,
                              str(out / split), workers, progress=progress)
        lines.append(f"{split}: {c['documents']} documents, {c['bytes'] / 1e6:.2f} MB of text; {report.summary()}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.recipe:
            print(prepare_encyclopedia(args.output, TokenizerConfig(kind=args.tokenizer, path=args.tokenizer_path),
                                       args.workers, args.dictd_root, args.heldout_percent,
                                       progress=not args.no_progress, thought_chars=args.thought_chars))
            return 0
        if not args.source:
            raise DataError("give --source (one or more) or --recipe")
        report = prepare_data(
            [parse_source(s, args.text_field, args.text_unit) for s in args.source],
            TokenizerConfig(kind=args.tokenizer, path=args.tokenizer_path), args.output, args.workers,
            args.append_eos, args.max_document_bytes, args.train_vocab_size, progress=not args.no_progress)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"prepare-data: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
