"""Interleaved episodes (rl/interleaved.py): sites grouped per chunk, segment views, masks and per-segment advantages
against hand-built rollouts, and `rntp train` with data.episode_format=interleaved (the real in-process engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rntp_megatron.config import ConfigError, DataConfig, build_config
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.episodes import EpisodeBuilder
from rntp_megatron.data.sources import Document, SkipCounts
from rntp_megatron.data.tokenizer import ByteTokenizer
from rntp_megatron.rl.advantages import compute_advantages
from rntp_megatron.rl.interleaved import pack_interleaved, segment_views, view_order
from rntp_megatron.rollout.engine import Rollout

TOK = ByteTokenizer()
E = TOK.encode


def test_a_chunks_sites_become_one_episode_with_segments_in_order():
    cfg = DataConfig(context_len=32, min_context=4, answer_horizon=2, sites_per_chunk=3, episode_format="interleaved")
    text = "The quick brown fox jumps over the lazy dog again."
    eps = EpisodeBuilder(cfg, TOK).episodes(Document("d", text), np.random.default_rng(0), SkipCounts())
    chunk = E(text)[:32]
    assert len(eps) == 2  # two chunks, one episode each
    ep = eps[0]
    sites = [s["site"] for s in ep.meta["segments"]]
    assert len(sites) == 3 and sites == sorted(sites) and ep.site == sites[0]
    assert ep.prompt_ids == chunk[:sites[0]] + E("<think>") and ep.meta["segments"][0]["text_ids"] == []
    # the prompt's context and the fed texts rebuild the chunk up to the last site
    fed = sum((s["text_ids"] for s in ep.meta["segments"]), [])
    assert ep.context_ids + fed == chunk[:sites[-1]]
    assert [s["continuation_ids"] for s in ep.meta["segments"]] == [chunk[t:t + 2] for t in sites]


def _hand_built():
    """One episode 'ab|cd|e' with sites 2 and 4 (horizon 1), G=2 rollouts of two turns each."""
    segs = [{"site": 2, "text_ids": [], "continuation_ids": E("c"), "continuation_text": "c", "token_class": None},
            {"site": 4, "text_ids": E("cd"), "continuation_ids": E("e"), "continuation_text": "e", "token_class": None}]
    ep = Episode(E("ab<think>"), E("ab"), E("c"), "c", 2, "doc", None, {"segments": segs})
    rollouts = []
    for first, second in (("x</think><answer>c</answer>", "</think><answer>e</answer>"),
                          ("</think><answer>q</answer>", "yz</think><answer>e</answer>")):
        ids = E(first) + E("cd<think>") + E(second)
        n1, n2 = len(E(first)), len(E(second))
        start2 = n1 + len(E("cd<think>"))
        rollouts.append(Rollout(ep.prompt_ids, ids, "", [-1.0] * n1 + [0.0] * 3 + [-2.0] * n2, "stop",
                                segments=[[0, n1, 1], [start2, start2 + n2, 1]]))
    return ep, rollouts


def test_segment_views_are_single_site_episodes_in_site_major_order():
    ep, rollouts = _hand_built()
    assert view_order([ep], rollouts) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    v_eps, v_ros = segment_views([ep], rollouts, TOK)
    assert [r.text for r in v_ros] == ["x</think><answer>c</answer>", "</think><answer>q</answer>",
                                       "</think><answer>e</answer>", "yz</think><answer>e</answer>"]
    # site 2's prompt is the first turn plus the fed text: a b <think> x </think> <answer> c </answer> c d <think>
    assert v_eps[2].prompt_ids == E("ab<think>x</think><answer>c</answer>cd<think>")
    assert [e.continuation_text for e in v_eps] == ["c", "c", "e", "e"]
    assert [r.prompt_index for r in v_ros] == [0, 1, 2, 3] and v_ros[3].logprobs == [-2.0] * 6


def test_masks_and_per_segment_advantages():
    ep, rollouts = _hand_built()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])  # site 1: rollout 0 right; site 2: rollout 0 right, 1 wrong
    adv = compute_advantages(rewards, 2, "dr_grpo")  # r - group mean: [0.5, -0.5, 0.5, -0.5]
    b = pack_interleaved([ep], rollouts, adv, rewards, E("</think>"), 40, TOK.pad_id)
    # row 0: prompt a b <think> (3 tokens), turn 1 x </think> <answer> c </answer> (5), fed c d <think> (3),
    # turn 2 </think> <answer> e </answer> (4); label position of the token at index k is k - 1
    assert b.thought_mask[0].nonzero().flatten().tolist() == [2, 3] + [10]
    assert b.answer_mask[0].nonzero().flatten().tolist() == [4, 5, 6] + [11, 12, 13]
    assert b.ntp_mask[0].nonzero().flatten().tolist() == [0] + [7, 8]  # b; then the fed c, d
    assert b.advantages[0, 2:7].tolist() == [0.5] * 5 and b.advantages[0, 10:14].tolist() == [0.5] * 4
    assert b.advantages[0, 7:10].abs().sum() == 0  # the fed text and <think> carry no advantage
    # row 1: turn 1 </think> <answer> q </answer> (4), fed (3), turn 2 y z </think> <answer> e </answer> (6)
    assert b.thought_mask[1].nonzero().flatten().tolist() == [2] + [9, 10, 11]
    assert b.advantages[1, 2:6].tolist() == [-0.5] * 4 and b.advantages[1, 9:15].tolist() == [-0.5] * 6
    assert b.rewards.tolist() == [1.0, 0.0]  # mean over each rollout's sites
    assert b.rollout_logprobs[0, 7:10].abs().sum() == 0 and b.rollout_logprobs[1, 9:15].tolist() == [-2.0] * 6


def test_validation():
    with pytest.raises(ConfigError, match="data.episode_format"):
        build_config({}, ["data.episode_format=interleaved", "rl.objective=ntp"])
    with pytest.raises(ConfigError, match="rl.dynamic_sampling"):
        build_config({}, ["data.episode_format=interleaved", "rl.dynamic_sampling=true"])


@pytest.mark.slow
def test_rntp_train_with_interleaved_episodes(tmp_path, monkeypatch):
    """Two steps of `rntp train` (in process): every row holds 2 turns, each site's advantage on its own tokens."""
    from rntp_megatron import trainer as trainer_module
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    batches = []
    monkeypatch.setattr(trainer_module, "pack_interleaved",
                        lambda *a, **k: batches.append(pack_interleaved(*a, **k)) or batches[-1])

    cfg = build_config({}, [
        "model.card=tiny", "model.vocab_size=262", "rl.group_size=2", "rl.objective=mixed", "reward.ntp_weight=0.5",
        "reward.name=prefix", "data.episode_format=interleaved", "data.sites_per_chunk=2", "data.answer_horizon=2",
        "schedule.global_batch_size=4", "schedule.micro_batch_size=2", "schedule.train_steps=2",
        "schedule.seq_length=64", "data.context_len=40", "data.min_context=8", "rollout.max_new_tokens=6",
        "rollout.temperature=1.0", f"logging.dir={tmp_path}", "logging.progress=false", "logging.plot=false"])
    trainer = Trainer(cfg)
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
        destroy_distributed()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and all(r["flops_rollout"] > 0 for r in records)
    assert len(batches) == 2
    gaps = []
    for b in batches:
        assert b.advantages.dim() == 2
        policy = (b.thought_mask + b.answer_mask) > 0
        assert (b.advantages[~policy] == 0).all()
        for row in policy:  # a row's policy tokens: one run per turn, separated by fed text
            idx = row.nonzero().flatten()
            gaps.append(int((idx[1:] - idx[:-1] > 1).sum()))
    assert max(gaps) == 1 and gaps.count(1) >= len(gaps) // 2  # two sites in most chunks (a short last chunk: one)
