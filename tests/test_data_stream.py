"""The episode stream: exact resume from the cursor (in this process and in new processes), blends, epochs,
data-parallel shards from megatron parallel_state, clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rntp_megatron.config import build_config
from rntp_megatron.data.sources import DataError
from rntp_megatron.data.stream import EpisodeStream
from rntp_megatron.data.tokenizer import ByteTokenizer
from rntp_megatron.runtime.spawn import run_ranks

TOK = ByteTokenizer()


def write_jsonl(path, n_docs=12, bad=True):
    lines = []
    for i in range(n_docs):
        lines.append(json.dumps({"text": f"Record {i}: " + " ".join(f"w{i * j % 97}" for j in range(5 + 9 * i))}))
        if bad and i % 4 == 1:
            lines += ['{"text": broken', '{"other": 1}', "", '{"text": "tiny"}']
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def blend_cfg(jsonl_path, **kw):
    data = {"sources": [{"kind": "jsonl", "path": jsonl_path, "weight": 2.0}, {"kind": "pydoc", "weight": 1.0}],
            "context_len": 64, "min_context": 8, "answer_horizon": 2, "sites_per_chunk": 3, "seed": 7, **kw}
    return build_config({"data": data}).data


def test_resume_at_any_point_gives_the_uninterrupted_stream(tmp_path):
    cfg = blend_cfg(write_jsonl(tmp_path / "a.jsonl"))
    full_stream = EpisodeStream(cfg, TOK, dp_rank=1, dp_size=2)
    full = full_stream.take(700)
    assert {e.meta["source"] for e in full} == {0, 1}
    for cut in (0, 1, 2, 37, 531, 600, 699):
        first = EpisodeStream(cfg, TOK, dp_rank=1, dp_size=2)
        assert first.take(cut) == full[:cut]
        state = json.loads(json.dumps(first.state_dict()))  # the cursor is plain data
        resumed = EpisodeStream(cfg, TOK, dp_rank=1, dp_size=2)
        resumed.load_state_dict(state)
        assert resumed.take(700 - cut) == full[cut:], cut
        assert resumed.metrics() == full_stream.metrics()
    metrics = full_stream.metrics()  # rank 1 of 2 reads odd lines: a missing field and a too-short text
    assert metrics["data/epoch/0"] >= 1  # the small jsonl source cycled
    assert metrics["data/skipped/missing_field"] > 0 and metrics["data/skipped/too_short"] > 0


def test_epochs_cycle_and_resume_across_the_boundary(tmp_path):
    cfg = build_config({"data": {"sources": [{"kind": "jsonl", "path": write_jsonl(tmp_path / "a.jsonl", 3, False)}],
                                 "context_len": 32, "min_context": 4, "sites_per_chunk": 1}}).data
    stream = EpisodeStream(cfg, TOK)
    eps = stream.take(60)
    epochs = [e.meta["epoch"] for e in eps]
    assert epochs == sorted(epochs) and epochs[-1] >= 2
    first_epoch = [e.doc_id for e in eps if e.meta["epoch"] == 0]
    assert [e.doc_id for e in eps if e.meta["epoch"] == 1] == first_epoch
    cut = epochs.index(1) - 1
    again = EpisodeStream(cfg, TOK)
    again.take(cut)
    resumed = EpisodeStream(cfg, TOK)
    resumed.load_state_dict(again.state_dict())
    assert resumed.take(60 - cut) == eps[cut:]


def test_blend_follows_the_weights(tmp_path):
    cfg = blend_cfg(write_jsonl(tmp_path / "a.jsonl", bad=False), sources=[
        {"kind": "pydoc", "weight": 3.0}, {"kind": "jsonl", "path": str(tmp_path / "a.jsonl"), "weight": 1.0}])
    eps = EpisodeStream(cfg, TOK).take(3000)
    from_pydoc = sum(e.meta["source"] == 0 for e in eps)
    assert 0.7 < from_pydoc / len(eps) < 0.8  # 3:1, up to one document's worth of episodes


def test_changed_layout_or_sources_are_refused(tmp_path):
    cfg = blend_cfg(write_jsonl(tmp_path / "a.jsonl"))
    stream = EpisodeStream(cfg, TOK, 0, 2)
    stream.take(5)
    with pytest.raises(DataError, match="rank 0 of 2.*rank 0 of 4"):
        EpisodeStream(cfg, TOK, 0, 4).load_state_dict(stream.state_dict())
    other = build_config({"data": {"sources": [{"kind": "pydoc"}], "context_len": 64, "min_context": 8}}).data
    with pytest.raises(DataError, match="saved for sources"):
        EpisodeStream(other, TOK, 0, 2).load_state_dict(stream.state_dict())


def test_a_source_with_nothing_usable_is_an_error_not_an_empty_run(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "short"}\nnot json\n{"x": 1}\n\xff\xfe\n')
    cfg = build_config({"data": {"sources": [{"kind": "jsonl", "path": str(path)}], "context_len": 64}}).data
    with pytest.raises(DataError, match=r"no usable episode.*1 invalid_utf8, 1 malformed_json, 1 missing_field, "
                                        r"1 too_short"):
        next(EpisodeStream(cfg, TOK))


def test_megatron_dataset_with_another_vocab_is_refused(tmp_path):
    (tmp_path / "d.bin").write_bytes(b"\0" * 8)
    (tmp_path / "d.idx").write_bytes(b"")
    (tmp_path / "d.json").write_text(json.dumps({"vocab_size": 50000}))
    cfg = build_config({"data": {"sources": [{"kind": "megatron", "path": str(tmp_path / "d")}]}}).data
    with pytest.raises(DataError, match="vocab_size=50000.*vocab_size=262"):
        EpisodeStream(cfg, TOK)


def _take_on_megatron_dp_rank(rank, world_size, cfg, n, state):
    """On a gloo rank with megatron parallel_state: this DP rank's stream restored from state[rank]; next n
    episodes."""
    from rntp_megatron.config import ParallelConfig
    from rntp_megatron.data.stream import data_parallel_stream
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=1)
    try:
        stream = data_parallel_stream(cfg, ByteTokenizer())
        stream.load_state_dict(state[rank])
        return stream.take(n), stream.state_dict()
    finally:
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_in_new_processes_on_data_parallel_ranks(tmp_path):
    cfg = blend_cfg(write_jsonl(tmp_path / "a.jsonl"))
    first = []
    for rank in range(2):  # saved here, restored in fresh processes whose DP rank comes from parallel_state
        stream = EpisodeStream(cfg, TOK, rank, 2)
        first.append((stream.take(25), stream.state_dict()))
    second = run_ranks(_take_on_megatron_dp_rank, 2, (cfg, 30, [s for _, s in first]))
    for rank in range(2):
        uninterrupted = EpisodeStream(cfg, TOK, rank, 2).take(55)
        assert first[rank][0] + second[rank][0] == uninterrupted
    docs = [{e.doc_id for e in first[r][0] + second[r][0]} for r in range(2)]
    assert docs[0] and docs[1] and not docs[0] & docs[1]


def test_synthetic_source_gives_labelled_episodes_and_resumes():
    cfg = build_config({"data": {"sources": [{"kind": "synthetic", "seed": 3}], "context_len": 96,
                                 "min_context": 8, "sites_per_chunk": 8}}).data
    eps = EpisodeStream(cfg, TOK, 1, 2).take(300)
    classes = {e.token_class for e in eps}
    assert {"T", "C", "I"} <= classes
    assert all(e.continuation_text.isdigit() for e in eps if e.token_class == "C")
    assert all(int(e.doc_id.rsplit(":", 1)[1]) % 2 == 1 for e in eps)  # rank 1 of 2: odd documents
    first = EpisodeStream(cfg, TOK, 1, 2)
    first.take(123)
    resumed = EpisodeStream(cfg, TOK, 1, 2)
    resumed.load_state_dict(first.state_dict())
    assert resumed.take(177) == eps[123:]
    kept = {k: v for k, v in cfg.__dict__.items() if k not in ("sources", "tokenizer", "proxy")}
    only_c = build_config({"data": {**kept,
                                    "sources": [{"kind": "synthetic", "seed": 3}], "site_classes": ["C"]}}).data
    c_eps = EpisodeStream(only_c, TOK).take(50)
    assert all(e.token_class == "C" and e.continuation_text.isdigit() for e in c_eps)


@given(st.lists(st.binary(max_size=120), min_size=1, max_size=12))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_stream_over_random_lines_yields_episodes_or_a_clear_error(tmp_path, lines):
    path = tmp_path / "random.jsonl"
    path.write_bytes(b"\n".join(json.dumps({"text": line.decode("latin-1")}).encode() if i % 2 else line
                                for i, line in enumerate(lines)))
    cfg = build_config({"data": {"sources": [{"kind": "jsonl", "path": str(path)}], "context_len": 16,
                                 "min_context": 2}}).data
    stream = EpisodeStream(cfg, TOK)
    try:
        eps = stream.take(20)
    except DataError as e:
        assert "no usable episode" in str(e)
        return
    assert all(2 <= e.site <= 15 and len(e.continuation_ids) == 1 for e in eps)
