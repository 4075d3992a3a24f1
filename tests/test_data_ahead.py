"""Episodes built ahead on a background thread: the same stream as built inline, exact resume while the
worker is ahead, errors raised where they happen, and a step's wall time about max(data, train)."""

from __future__ import annotations

import time

import pytest

from rntp_megatron.config import build_config
from rntp_megatron.data.episodes import EpisodeBuilder
from rntp_megatron.data.sources import DataError
from rntp_megatron.data.stream import EpisodeStream
from rntp_megatron.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def cfg(depth, kind="synthetic"):
    return build_config({"data": {"sources": [{"kind": kind}], "context_len": 64, "min_context": 8,
                                  "sites_per_chunk": 2, "prefetch_documents": depth}}).data


class SlowBuilder(EpisodeBuilder):
    """One episode a document, after `delay` seconds (a slow file system or tokenizer)."""

    def __init__(self, data_cfg, delay):
        super().__init__(data_cfg, TOK)
        self.delay = delay

    def episodes(self, doc, rng, skips):
        time.sleep(self.delay)
        return super().episodes(doc, rng, skips)[:1]


def test_built_ahead_is_the_inline_stream_and_resumes_exactly():
    inline = EpisodeStream(cfg(0), TOK, 1, 2).take(300)
    ahead = EpisodeStream(cfg(8), TOK, 1, 2)
    assert ahead.take(120) == inline[:120]
    time.sleep(0.2)  # let the worker run ahead: the cursor is still the consumer's
    state = ahead.state_dict()
    assert ahead.take(60) == inline[120:180]
    ahead.close()  # stops the worker and rewinds what it built ahead: the stream goes on exactly
    assert ahead.take(120) == inline[180:]
    for depth in (0, 3):
        resumed = EpisodeStream(cfg(depth), TOK, 1, 2)
        resumed.load_state_dict(state)
        assert resumed.take(180) == inline[120:]
        resumed.close()
    ahead.close()


def test_a_worker_error_is_raised_to_the_consumer(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "tiny"}\n')
    data = build_config({"data": {"sources": [{"kind": "jsonl", "path": str(tmp_path)}], "context_len": 64,
                                  "prefetch_documents": 4}}).data
    stream = EpisodeStream(data, TOK)
    for _ in range(2):  # and again: the worker is gone, the error stays
        with pytest.raises(DataError, match="no usable episode"):
            next(stream)


def test_a_step_takes_about_the_longer_of_data_and_training():
    data_s, train_s, steps = 0.03, 0.06, 8

    def step_time(depth):
        stream = EpisodeStream(cfg(depth), TOK, builder=SlowBuilder(cfg(depth), data_s))
        stream.take(1)
        time.sleep(train_s)
        start = time.perf_counter()
        for _ in range(steps):
            stream.take(1)
            time.sleep(train_s)  # training: torch kernels release the GIL as a sleep does
        stream.close()
        return (time.perf_counter() - start) / steps

    inline, ahead = step_time(0), step_time(4)
    assert inline >= data_s + train_s * 0.95
    assert ahead < train_s + data_s / 3, (inline, ahead)
