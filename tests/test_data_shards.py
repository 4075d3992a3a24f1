"""Sharded reads (each rank reads only its units: bytes read over all ranks ~ the corpus), bad input of every
format counted by reason, and elastic resume of the stream at another data-parallel size."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rntp_megatron.config import SourceConfig, build_config
from rntp_megatron.data.sources import DataError, SkipCounts, bytes_read, open_source
from rntp_megatron.data.stream import EpisodeStream
from rntp_megatron.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
DP = 64


def _docs(n):
    return [f"doc {i}: " + " ".join(f"w{(i * 7 + j) % 101}" for j in range(10 + i % 13)) for i in range(n)]


def _corpus(tmp_path, kind):
    """A multi-file corpus of `kind`; its SourceConfig and its size in bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / kind
    root.mkdir()
    docs = _docs(6000)
    if kind == "jsonl":
        for f in range(6):
            (root / f"{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[f::6]))
    elif kind == "paragraph":
        for f in range(6):
            (root / f"{f}.txt").write_text("\n\n".join(docs[f::6]) + "\n")
    elif kind == "parquet":  # many files: a unit is a file
        for f in range(80):
            pq.write_table(pa.table({"text": docs[f::80]}), root / f"{f:03d}.parquet")
    else:
        import torch
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(str(root / "ds.bin"), dtype=np.uint16)
        for d in docs:
            builder.add_document(torch.tensor(TOK.encode(d), dtype=torch.int64).to(torch.uint16), [len(d)])
        builder.finalize(str(root / "ds.idx"))
        return SourceConfig(kind="megatron", path=str(root / "ds")), sum(p.stat().st_size for p in root.iterdir())
    unit = "paragraph" if kind == "paragraph" else "file"
    src = SourceConfig(kind="text" if kind == "paragraph" else kind, path=str(root), text_unit=unit)
    return src, sum(p.stat().st_size for p in root.iterdir())


@pytest.mark.parametrize("kind", ["jsonl", "paragraph", "parquet", "megatron"])
def test_dp64_ranks_read_the_corpus_about_once_and_every_document_once(tmp_path, kind):
    src, size = _corpus(tmp_path, kind)
    shard_bytes = 8192  # 60-120 units: about one or two for each of the 64 ranks
    per_rank, ids = [], []
    for rank in range(DP):
        source = open_source(src, 1 << 20, SkipCounts(), shard_bytes)
        before = bytes_read()
        ids += [d.doc_id for u in range(rank, source.num_units, DP) for d, _ in source.read(u, {})]
        per_rank.append(bytes_read() - before)
    whole = open_source(src, 1 << 20, SkipCounts(), shard_bytes)
    assert sorted(ids) == sorted(d.doc_id for d in whole.documents()) and len(ids) == len(set(ids)) == 6000
    assert sum(per_rank) <= 1.1 * size, (sum(per_rank) / size, per_rank)
    assert sum(1 for b in per_rank if b) >= DP * 3 // 4  # the work is spread, not all on a few ranks


def _write_bad_inputs(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [json.dumps({"text": d}) for d in _docs(6)]
    (root / "j").mkdir()
    (root / "j" / "good.jsonl").write_text("\n".join(good) + "\n")
    (root / "j" / "array.json").write_text(json.dumps([{"text": "an array"}], indent=2))
    (root / "j" / "empty.jsonl").write_bytes(b"")
    with gzip.open(root / "j" / "zipped.jsonl.gz", "wt") as f:
        f.write("\n".join(good[:2]) + "\n")
    (root / "j" / "cut.jsonl.gz").write_bytes(gzip.compress(("\n".join(good) + "\n").encode())[:40])
    (root / "j" / "vanishes.jsonl").write_text(good[0] + "\n")
    (root / "q").mkdir()
    pq.write_table(pa.table({"text": _docs(3)}), root / "q" / "good.parquet")
    pq.write_table(pa.table({"body": _docs(3)}), root / "q" / "no_text.parquet")
    data = (root / "q" / "good.parquet").read_bytes()
    (root / "q" / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (root / "q" / "garbage.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 3)
    (root / "q" / "empty.parquet").write_bytes(b"")
    (root / "q" / "vanishes.parquet").write_bytes(data)


def test_bad_input_of_every_format_is_counted_by_reason_and_the_run_goes_on(tmp_path):
    _write_bad_inputs(tmp_path)
    cfg = build_config({"data": {"sources": [{"kind": "jsonl", "path": str(tmp_path / "j")},
                                             {"kind": "parquet", "path": str(tmp_path / "q")}],
                                 "context_len": 32, "min_context": 4, "prefetch_documents": 2}}).data
    stream = EpisodeStream(cfg, TOK)
    (tmp_path / "j" / "vanishes.jsonl").unlink()  # listed, then gone from the filesystem: unreadable
    (tmp_path / "q" / "vanishes.parquet").unlink()
    eps = stream.take(200)
    docs = {e.doc_id.split(":")[0] for e in eps}
    assert docs == {"good.jsonl", "zipped.jsonl.gz", "good.parquet"}
    skipped = {k.split("/")[-1]: v for k, v in stream.metrics().items() if k.startswith("data/skipped/")}
    for reason in ("json_array", "empty_file", "corrupt_file", "unreadable_file", "missing_column"):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)
    stream.close()


def test_a_source_that_yields_nothing_is_an_error_naming_it(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x" * 100}], indent=1))
    (tmp_path / "b.jsonl").write_bytes(b"")
    cfg = build_config({"data": {"sources": [{"kind": "pydoc"}, {"kind": "jsonl", "path": str(tmp_path)}],
                                 "context_len": 32, "min_context": 4}}).data
    with pytest.raises(DataError, match=f"source jsonl:{tmp_path} gave no usable episode.*1 empty_file, "
                                        "1 json_array"):
        EpisodeStream(cfg, TOK).take(400)


# JSON that parses into text no tokenizer can take, or does not parse: alongside random bytes
BAD_JSON = (b'{"text": "a \\ud800 b"}', b'{"text": "\\udc00"}', b"[" * 5000 + b"]" * 5000,
            b'{"text": ' + b"{" * 3000 + b"}" * 3000 + b"}", b'{"text": "ok text \\u00e9 here"}', b'{"text": NaN}')


@pytest.mark.parametrize("suffix, unit", [(".parquet", "file"), (".jsonl.gz", "file"), (".json", "file"),
                                          (".jsonl", "file"), (".txt", "file"), (".txt", "paragraph")])
@given(lines=st.lists(st.one_of(st.binary(max_size=80), st.sampled_from(BAD_JSON)), max_size=6),
       cut=st.integers(0, 400))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_in_every_format_are_counted_never_raised(tmp_path, suffix, unit, lines, cut):
    """read -> tokenize -> episodes over random bytes and bad JSON in every file format: documents become episodes
    or are counted by reason; nothing raises."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rntp_megatron.data.episodes import EpisodeBuilder

    data = b"\n".join(lines)
    path = tmp_path / f"r{suffix}"
    if suffix == ".parquet":  # a real file with random bytes written over part of it, or cut short
        pq.write_table(pa.table({"text": [data.decode("latin-1")] * 3}), path)
        raw = bytearray(path.read_bytes())
        raw[cut % len(raw): cut % len(raw) + len(data)] = data[: len(raw)]
        path.write_bytes(bytes(raw[: max(cut, 1) if cut % 2 else len(raw)]))
    elif suffix == ".jsonl.gz":
        path.write_bytes(gzip.compress(data)[: cut or None] if cut % 3 else data)
    else:
        path.write_bytes(data)
    kind = {".parquet": "parquet", ".txt": "text"}.get(suffix, "jsonl")
    skips = SkipCounts()
    source = open_source(SourceConfig(kind=kind, path=str(path), text_unit=unit), 64, skips, 32)
    docs = [d for u in range(source.num_units) for d, _ in source.read(u, {})]
    assert docs or skips or not data.strip()
    assert all(d.text.strip() and len(d.text.encode()) <= 64 for d in docs)
    builder = EpisodeBuilder(build_config({"data": {"context_len": 16, "min_context": 2}}).data, TOK)
    rng = np.random.Generator(np.random.PCG64(0))
    for d in docs:
        for e in builder.episodes(d, rng, skips):
            assert 2 <= e.site and len(e.continuation_ids) == 1 and e.prompt_ids[-1] == TOK.encode("<think>")[-1]


def _run_phases(cfg, phases):
    """Each phase (dp_size, [episodes per rank]): fresh streams resumed from all cursors of the phase before;
    returns [(doc_id, epoch)] of every episode handed out, then the final streams."""
    seen, states, streams = [], None, []
    for dp, counts in phases:
        streams = [EpisodeStream(cfg, TOK, r, dp) for r in range(dp)]
        for r, stream in enumerate(streams):
            if states is not None:
                stream.resume(states)
            seen += [(e.doc_id, e.meta["epoch"]) for e in stream.take(counts[r])]
        states = [s.state_dict() for s in streams]
    return seen, streams


@given(st.lists(st.tuples(st.integers(1, 8), st.lists(st.integers(0, 40), min_size=8, max_size=8)),
                min_size=1, max_size=4))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_elastic_resume_reads_every_document_once_an_epoch(tmp_path_factory, phases):
    root = tmp_path_factory.mktemp("elastic")
    docs = [f"d{i:03d} xyz abc" for i in range(60)]  # one chunk each: exactly 2 episodes a document
    for f in range(3):
        (root / f"{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[f::3]))
    cfg = build_config({"data": {"sources": [{"kind": "jsonl", "path": str(root)}], "context_len": 24,
                                 "min_context": 4, "sites_per_chunk": 2, "shard_bytes": 100,
                                 "prefetch_documents": 0}}).data
    seen, streams = _run_phases(cfg, [(dp, counts[:dp]) for dp, counts in phases])
    for stream in streams:  # drain epoch 0: a rank reads units in increasing order, so its first epoch-1
        while True:         # episode means it has nothing of epoch 0 left
            e = next(stream)
            seen.append((e.doc_id, e.meta["epoch"]))
            if e.meta["epoch"] >= 1:
                break
    handed_out = {}
    for doc, epoch in seen:
        if epoch == 0:
            handed_out[doc] = handed_out.get(doc, 0) + 1
    whole = open_source(cfg.sources[0], 1 << 20, SkipCounts(), cfg.shard_bytes)
    assert set(handed_out) == {d.doc_id for d in whole.documents()}, "a document was lost"
    # 2 episodes a document; 1 when a layout change came between them (the rest is dropped, never re-read)
    assert all(n in (1, 2) for n in handed_out.values()), "a document was read twice"
    if len({dp for dp, _ in phases}) == 1:
        assert set(handed_out.values()) == {2}  # the same layout resumes exactly: nothing dropped


def _rntp(rank: int, world_size: int, argv: list[str]) -> int:
    from rntp_megatron.cli import main

    return main(argv)


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_resumes_a_dp2_checkpoint_at_dp1(tmp_path):
    import torch

    from rntp_megatron.checkpoint import latest_checkpoint
    from rntp_megatron.runtime.spawn import run_ranks

    def argv(steps):
        sets = ["model.card=tiny", "model.vocab_size=262", "rl.objective=ntp", "schedule.global_batch_size=4",
                "schedule.micro_batch_size=2", f"schedule.train_steps={steps}", "schedule.seq_length=64",
                "data.context_len=64", "data.min_context=8", "checkpoint.save_interval=1",
                f"logging.dir={tmp_path}", "logging.progress=false"]
        return ["train"] + [a for s in sets for a in ("--set", s)]

    assert run_ranks(_rntp, 2, (argv(1),)) == [0, 0]
    assert run_ranks(_rntp, 1, (argv(2),)) == [0]  # world 1: DP 1 takes over both ranks' cursors
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert [r["data/episodes"] for r in records] == [2, 2 + 2 + 4]  # rank 0 logs; DP1 took over both counts
    [rank0] = [torch.load(p, weights_only=True) for p in
               sorted((latest_checkpoint(tmp_path / "checkpoints") / "trainer_state").glob("rank_*.pt"))]
    cursor = rank0["data"]
    assert cursor["dp_size"] == 1 and cursor["at_document"]["generation"] == 1  # translated once
    assert cursor["episodes_emitted"] == 2 * 4  # 1 step x 2 ranks x 2 rows, then 1 step x 4 rows


def _small_jsonl(tmp_path, n=40):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"d{i:03d} " + "abc " * (3 + i % 5)}) + "\n" for i in range(n)))
    return build_config({"data": {"sources": [{"kind": "jsonl", "path": str(path)}], "context_len": 24,
                                  "min_context": 4, "prefetch_documents": 0}}).data


def _epoch0_docs(stream) -> list[str]:
    """The documents of stream's first pass, in order (its first epoch-1 episode ends it)."""
    docs = []
    while True:
        e = next(stream)
        if e.meta["epoch"] > 0:
            return docs
        if not docs or docs[-1] != e.doc_id:
            docs.append(e.doc_id)


def test_a_one_unit_file_at_dp4_is_dealt_by_document_disjoint_and_resumes_exactly(tmp_path):
    """One small JSONL file is one unit: four ranks read disjoint documents of it in an epoch, which together are
    the file; a cursor saved mid-document resumes exactly, and at another DP size no document is read twice."""
    cfg = _small_jsonl(tmp_path)
    assert open_source(cfg.sources[0], 1 << 20, SkipCounts(), cfg.shard_bytes).num_units == 1
    per_rank = [_epoch0_docs(EpisodeStream(cfg, TOK, r, 4)) for r in range(4)]
    assert all(per_rank), per_rank
    everything = [d for docs in per_rank for d in docs]
    assert len(everything) == len(set(everything)) == 40, "two ranks read the same document in one epoch"
    for r in range(4):  # exact resume of every rank from a cursor in the middle of a document
        stream = EpisodeStream(cfg, TOK, r, 4)
        stream.take(5)
        state = stream.state_dict()
        want = [(e.doc_id, e.site) for e in stream.take(12)]
        again = EpisodeStream(cfg, TOK, r, 4)
        again.load_state_dict(state)
        assert [(e.doc_id, e.site) for e in again.take(12)] == want
    streams = [EpisodeStream(cfg, TOK, r, 4) for r in range(4)]  # elastic: 4 ranks -> 2, within epoch 0
    before = {e.doc_id for s in streams for e in s.take(3)}
    states = [s.state_dict() for s in streams]
    after = []
    for r in range(2):
        stream = EpisodeStream(cfg, TOK, r, 2)
        stream.resume(states)
        after += _epoch0_docs(stream)
    assert len(after) == len(set(after)) and not before & set(after), "a document was read twice after re-layout"
    assert before | set(after) == set(everything), "a document was lost in the re-layout"


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "abc \\ud800 def"}', "lone_surrogate"),
    (b'{"text": "\\udfff"}', "lone_surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
    (b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "malformed_json"),
    (b'{"text": "x", "n": ' + b"1" * 5000 + b"}", "malformed_json"),
])
def test_bad_json_is_counted_and_skipped_before_the_tokenizer(tmp_path, line, reason):
    """Half a surrogate pair, nesting past the parser's stack, an integer too long to convert: counted, skipped."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(line + b"\n" + json.dumps({"text": "good text here " * 4}).encode() + b"\n")
    cfg = build_config({"data": {"sources": [{"kind": "jsonl", "path": str(path)}], "context_len": 24,
                                 "min_context": 4, "prefetch_documents": 0}}).data
    stream = EpisodeStream(cfg, TOK)
    eps = stream.take(6)
    assert all(e.doc_id.endswith(f":{len(line) + 1}") for e in eps)
    assert stream.skips[reason] >= 1, dict(stream.skips)
