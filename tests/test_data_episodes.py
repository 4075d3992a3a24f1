"""Chunking, site selection, prompt building and packing (pure data; no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rntp_megatron.config import build_config
from rntp_megatron.data.episodes import EpisodeBuilder, chunk_tokens
from rntp_megatron.data.packing import attention_mask, pack_sequences
from rntp_megatron.data.sites import draw_sites, entropy_keep, logprob_window_keep, topk_entropy
from rntp_megatron.data.sources import DataError, Document, SkipCounts
from rntp_megatron.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def data_cfg(**kw):
    return build_config({"data": {"sources": [{"kind": "pydoc"}], **kw}}).data


@given(n_tokens=st.integers(0, 700), context_len=st.integers(8, 64), min_context=st.integers(1, 6),
       horizon=st.integers(1, 4), k=st.integers(1, 5), seed=st.integers(0, 2**31))
@settings(max_examples=150, deadline=None)
def test_episodes_respect_chunks_sites_and_template(n_tokens, context_len, min_context, horizon, k, seed):
    if context_len <= min_context + horizon:
        return
    cfg = data_cfg(context_len=context_len, min_context=min_context, answer_horizon=horizon, sites_per_chunk=k,
                   prompt_template="Text: {context}<think>")
    rng = np.random.default_rng(seed)
    text = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, n_tokens))
    skips = SkipCounts()
    eps = EpisodeBuilder(cfg, TOK).episodes(Document("d", text), np.random.default_rng(seed), skips)
    ids = TOK.encode(text)
    n_chunks = sum(1 for i in range(0, len(ids), context_len) if len(ids[i:i + context_len]) >= min_context + horizon)
    assert (skips == {"too_short": 1}) == (n_chunks == 0)
    per_chunk: dict[int, list[int]] = {}
    for e in eps:
        c = e.meta["chunk"]
        chunk = ids[c * context_len:(c + 1) * context_len]
        assert min_context <= e.site <= len(chunk) - horizon
        assert e.context_ids == chunk[:e.site]
        assert e.continuation_ids == chunk[e.site:e.site + horizon]
        assert e.continuation_text == text[c * context_len + e.site:][:horizon]
        assert e.prompt_ids == TOK.encode("Text: ") + e.context_ids + [256]  # <think> is one id
        per_chunk.setdefault(c, []).append(e.site)
    for c, sites in per_chunk.items():
        chunk_len = len(ids[c * context_len:(c + 1) * context_len])
        assert sites == sorted(set(sites))
        assert len(sites) == min(k, chunk_len - horizon - min_context + 1)
    assert len(per_chunk) == n_chunks


def test_chunk_tokens_drops_only_a_short_tail():
    chunks = chunk_tokens(np.arange(25), 10, 6)
    assert [c.tolist() for c in chunks] == [list(range(10)), list(range(10, 20))]
    assert len(chunk_tokens(np.arange(26), 10, 6)) == 3


def test_labels_give_the_token_class_of_the_site():
    cfg = data_cfg(context_len=32, min_context=2, answer_horizon=1, sites_per_chunk=30)
    text, labels = "é=4;b=é+1;b?5", "TTTTTTTTTTTTC"
    eps = EpisodeBuilder(cfg, TOK).episodes(Document("d", text, labels=labels), np.random.default_rng(0),
                                            SkipCounts())
    for e in eps:
        prefix = TOK.decode(e.context_ids)
        assert e.token_class == labels[len(prefix)], (prefix, e.token_class)
    assert eps[-1].continuation_text == "5" and eps[-1].token_class == "C"
    only_c = data_cfg(context_len=32, min_context=2, sites_per_chunk=30, site_classes=["C"])
    eps = EpisodeBuilder(only_c, TOK).episodes(Document("d", text, labels=labels), np.random.default_rng(0),
                                               SkipCounts())
    assert [(e.continuation_text, e.token_class) for e in eps] == [("5", "C")]
    with pytest.raises(DataError, match="needs labelled documents"):
        EpisodeBuilder(only_c, TOK).episodes(Document("d", text), np.random.default_rng(0), SkipCounts())


def test_token_documents_out_of_vocab_are_counted():
    cfg = data_cfg(context_len=32, min_context=2)
    skips = SkipCounts()
    assert EpisodeBuilder(cfg, TOK).episodes(Document("d", token_ids=np.array([1, 2, 999, 4])),
                                             np.random.default_rng(0), skips) == []
    assert skips == {"bad_token_id": 1}


def test_site_filters_use_the_scores():
    rng = np.random.default_rng(0)
    ent = np.array([np.nan, 0.1, 2.0, 0.5, 3.0, 2.5, 0.0, 9.0])
    assert draw_sites(entropy_keep(ent, 1.0), 10, 2, 2, rng) == [2, 4, 5]  # t <= 8 - 2 = 6
    lp = np.array([np.nan, -2.0, -0.5, -3.0, -5.0, -1.0, -4.5, -2.0])
    assert draw_sites(logprob_window_keep(lp, -4.5, -1.0), 10, 1, 1, rng) == [1, 3, 5, 6, 7]
    assert len(draw_sites(logprob_window_keep(lp, -4.5, -1.0), 2, 1, 1, rng)) == 2
    assert draw_sites(entropy_keep(ent, 1.0), 10, 0, 1, rng) == [2, 4, 5, 7]  # NaN at 0 is never a site
    draws = [tuple(draw_sites(np.ones(50, bool), 3, 5, 1, np.random.default_rng(s))) for s in range(200)]
    assert all(5 <= t <= 49 for d in draws for t in d) and len(set(draws)) > 150


def test_topk_entropy_matches_closed_forms():
    flat = torch.zeros(3, 100)
    assert torch.allclose(topk_entropy(flat, 16), torch.full((3,), math.log(16), dtype=torch.float64))
    peaked = torch.tensor([[50.0] + [0.0] * 99])
    assert topk_entropy(peaked, 16).item() < 1e-18
    two = torch.tensor([[math.log(3.0), 0.0, -1e9, -1e9]])
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert torch.allclose(topk_entropy(two, 2), -(p * p.log()).sum())


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(40, 64))
@settings(max_examples=100, deadline=None)
def test_packing_places_every_sequence_once(lengths, row_length):
    seqs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
    batch = pack_sequences(seqs, row_length, pad_id=-1)
    assert batch.tokens.shape[1] == row_length
    assert batch.tokens.shape[0] >= math.ceil(sum(lengths) / row_length)
    assert [t.tolist() for t in batch.unpack(batch.tokens, lengths)] == seqs
    assert [p.tolist() for p in batch.unpack(batch.position_ids, lengths)] == [list(range(n)) for n in lengths]
    assert int((batch.tokens != -1).sum()) == sum(lengths)
    for r, cu in enumerate(batch.cu_seqlens):
        segs = batch.segment_ids[r]
        assert cu[-1] == int((segs > 0).sum()) and all(int(segs[a]) == i + 1 for i, a in enumerate(cu[:-1]))


def test_attention_mask_is_block_diagonal_causal():
    batch = pack_sequences([[1, 2], [3, 4, 5]], 6, pad_id=0)
    mask = attention_mask(batch.segment_ids)[0, 0]
    allowed = (~mask).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],  # 3-token sequence first
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]  # then 2 tokens, 1 pad
    with pytest.raises(ValueError, match="do not fit"):
        pack_sequences([[1] * 7], 6, 0)


def test_entropy_bounds_and_entropy_weighted_draws():
    """data.entropy_max leaves out the sites above it; entropy_weighted draws a site with probability
    proportional to its entropy (12,000 draws, within 0.02: ~4.5 standard errors)."""
    import numpy as np

    from rntp_megatron.data.sites import draw_weighted_sites, entropy_keep

    h = np.array([np.nan, 0.5, 1.5, 2.5, 3.5])
    assert entropy_keep(h, 1.0).tolist() == [False, False, True, True, True]
    assert entropy_keep(h, 1.0, 3.0).tolist() == [False, False, True, True, False]
    weight = np.array([np.nan, 1.0, 2.0, 0.0, 3.0, 9.0])  # the last is past the horizon; 3 has weight 0
    rng = np.random.Generator(np.random.PCG64(0))
    counts = np.zeros(6)
    for _ in range(12_000):
        (t,) = draw_weighted_sites(weight, 1, 1, 2, rng)
        counts[t] += 1
    assert counts[0] == counts[3] == counts[5] == 0
    np.testing.assert_allclose(counts[[1, 2, 4]] / 12_000, [1 / 6, 2 / 6, 3 / 6], atol=0.02)
    assert draw_weighted_sites(weight, 5, 1, 2, rng) == [1, 2, 4]  # fewer candidates than k: all of them
