"""Data path pieces that run the Megatron GPTModel: the proxy scorer behind entropy / log-prob window site
selection, and packed rows (a packed forward must equal the forwards of its sequences one by one)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks


def _model_checks(rank: int, world_size: int) -> dict:
    from rntp_megatron.config import build_config
    from rntp_megatron.data.packing import attention_mask, pack_sequences
    from rntp_megatron.data.proxy import ProxyScorer
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.data.tokenizer import ByteTokenizer
    from rntp_megatron.flops import TokenTally, forward_flops, take_scoring, take_scoring_flops
    from rntp_megatron.model.frozen import freeze
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    tok = ByteTokenizer()
    cfg = build_config({"model": {"card": "tiny", "vocab_size": tok.vocab_size, "init_method_std": 0.3},
                        "data": {"sources": [{"kind": "pydoc"}], "context_len": 48, "min_context": 4,
                                 "sites_per_chunk": 2}})
    init_distributed(cfg.parallel, seed=3)
    try:
        model = freeze(build_model(cfg.model, cfg.parallel))
        scorer = ProxyScorer(model, tok.vocab_size, top_k=16, pad_id=tok.pad_id, micro_batch_size=3)
        rng = np.random.default_rng(0)
        chunks = [rng.integers(0, 256, n).tolist() for n in (48, 17, 33, 5)]
        take_scoring_flops(cfg.model)
        batched = scorer.score(chunks)
        want = TokenTally()
        for c in chunks:  # the scoring forward is counted: n - 1 tokens fed and read per chunk (flops.py)
            want.add(len(c) - 1, 0, len(c) - 1)
        assert vars(take_scoring()) == vars(want)
        other = dataclasses.replace(cfg.model, num_layers=7)  # a proxy of its own card is counted by that card
        ProxyScorer(model, tok.vocab_size, pad_id=tok.pad_id, card=other).score(chunks[:1])
        assert take_scoring_flops(cfg.model) == forward_flops(other, TokenTally().add(47, 0, 47))
        for chunk, (ent, lp) in zip(chunks, batched):
            alone_ent, alone_lp = scorer.score([chunk])[0]
            assert len(ent) == len(chunk) and np.isnan(ent[0]) and np.isnan(lp[0])
            np.testing.assert_allclose(ent[1:], alone_ent[1:], atol=1e-5)  # right padding does not leak
            np.testing.assert_allclose(lp[1:], alone_lp[1:], atol=1e-5)
            assert np.all(ent[1:] >= 0) and np.all(ent[1:] <= np.log(16) + 1e-9) and np.all(lp[1:] <= 0)
            with torch.no_grad():  # float64 reference over the tokenizer's vocab from a plain forward
                t = torch.tensor([chunk])
                logits = model(t, torch.arange(len(chunk))[None], None)[0, :, :tok.vocab_size].double()
            ref = torch.log_softmax(logits[:-1], -1).gather(-1, t[0, 1:, None]).squeeze(-1).numpy()
            np.testing.assert_allclose(lp[1:], ref, atol=1e-5)

        all_ent = np.concatenate([e[1:] for e, _ in batched])
        threshold = float(np.median(all_ent))
        kept = {}
        top = float(np.quantile(all_ent, 0.8))  # data.entropy_max: the top fifth of entropies is left out
        for selection, extra in (("entropy", {"entropy_threshold": threshold, "entropy_max": top}),
                                 ("entropy_weighted", {"entropy_max": top}),
                                 ("logprob_window", {"logprob_window": (-5.55, -5.4)})):
            # the data section alone: a whole run would also need the reference that scores (a checkpoint)
            data = dataclasses.replace(cfg.data, site_selection=selection, **extra)
            eps = EpisodeStream(data, tok, scorer=scorer).take(30)
            for e in eps:
                ent, lp = scorer.score([e.context_ids + e.continuation_ids[:1]])[0]
                if selection == "entropy":
                    assert threshold < ent[e.site] <= top, (ent[e.site], threshold, top)
                elif selection == "entropy_weighted":
                    assert 0 < ent[e.site] <= top, (ent[e.site], top)
                else:
                    assert -5.55 <= lp[e.site] <= -5.4, lp[e.site]
            kept[selection] = len(eps)

        lengths = [int(n) for n in rng.integers(3, 30, 9)]
        seqs = [rng.integers(0, 256, n).tolist() for n in lengths]
        batch = pack_sequences(seqs, 40, tok.pad_id)
        with torch.no_grad():
            packed = model(batch.tokens, batch.position_ids, attention_mask(batch.segment_ids))
            worst = 0.0
            for seq, got in zip(seqs, batch.unpack(packed, lengths)):
                alone = model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0]
                # float32 sums over rows of other lengths differ by ~1e-5; a leak across segments is O(0.1)
                torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)
                worst = max(worst, float((got - alone).abs().max()))
        # The check has teeth: without the mask, later sequences of a row see earlier ones.
        with torch.no_grad():
            leaky = model(batch.tokens, batch.position_ids, None)
            assert max(float((g - model(torch.tensor([q]), torch.arange(len(q))[None], None)[0]).abs().max())
                       for q, g in zip(seqs, batch.unpack(leaky, lengths))) > 1e-2
        return {"rows": batch.tokens.shape[0], "packed_max_abs_diff": worst, **kept}
    finally:
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.slow
def test_proxy_scorer_site_selection_and_packed_forward_on_gptmodel():
    (result,) = run_ranks(_model_checks, 1)
    assert result["entropy"] == result["entropy_weighted"] == result["logprob_window"] == 30
    assert result["rows"] < 9  # sequences were packed together
