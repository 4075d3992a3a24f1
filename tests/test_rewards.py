"""Rewards of docs/method.md section 3 on hand-made cases: leading/trailing spaces, multi-byte UTF-8, token
boundaries, empty answers, missing or repeated tags, answers longer than the horizon, and the shaping terms."""

from __future__ import annotations

import math

import pytest
import torch

from rntp_megatron.config import DataConfig, RewardConfig
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.tokenizer import ByteTokenizer
from rntp_megatron.rewards.compute import compute_rewards
from rntp_megatron.rewards.registry import RewardContext, get_reward
from rntp_megatron.rewards.answer import parse_answer
from rntp_megatron.rewards.shaping import overlong_penalty
from rntp_megatron.rollout.engine import Rollout

DATA = DataConfig()


class PieceTokenizer:
    """Greedy longest-match over a fixed list of byte pieces (multi-byte tokens, unlike the byte tokenizer)."""

    PIECES = [b" world", b" is", b" round", b" wor", b"ld", b"\xc3", b"\xa9", b"caf", b"\xc3\xa9", b"!", b" "]

    vocab_size, eos_id, pad_id = len(PIECES), 0, 0

    def encode(self, text: str) -> list[int]:
        data, ids = text.encode("utf-8"), []
        while data:
            best = max((i for i, p in enumerate(self.PIECES) if data.startswith(p)), key=lambda i: len(self.PIECES[i]))
            ids.append(best)
            data = data[len(self.PIECES[best]):]
        return ids

    def decode(self, ids) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.PIECES[token_id]


def episode(tok, continuation: str, meta=None) -> Episode:
    ids = tok.encode(continuation)
    return Episode(prompt_ids=[1], context_ids=[1], continuation_ids=ids, continuation_text=tok.decode(ids),
                   site=5, meta=meta or {})


def score(name, tok, continuation, answers, **params):
    eps = [episode(tok, continuation)] * len(answers)
    return get_reward(name).fn(eps, answers, RewardContext(tok, params)).tolist()


def test_prefix_token_boundaries_and_spaces():
    tok = PieceTokenizer()
    truth = " world is round"  # tokens: " world", " is", " round"
    answers = [" world", " world is", " wor", "world", " world ", " world is round", " world is round!", "", None]
    # " wor" is a byte prefix but ends inside the token " world"; "world" lacks the leading space;
    # " world " ends inside " is"; longer than the horizon cannot be verified; empty and missing get 0
    assert score("prefix", tok, truth, answers) == [1, 1, 0, 0, 0, 1, 0, 0, 0]


def test_prefix_multibyte_utf8():
    tok = PieceTokenizer()
    # "café" tokenized as "caf" + "\xc3\xa9": the boundary after "caf" and after the full "é" only
    assert score("prefix", tok, "café", ["caf", "café", "ca"]) == [1, 1, 0]
    # a horizon that ends in the middle of "é" (one byte of two): the full character is longer than the horizon
    eps = [Episode([1], [1], [7, 5], "caf\ufffd", 0)]
    assert get_reward("prefix").fn(eps, ["café"], RewardContext(tok)).tolist() == [0.0]
    assert get_reward("prefix").fn(eps, ["caf"], RewardContext(tok)).tolist() == [1.0]
    # byte tokenizer: every byte is a boundary, so a whole character matches and half of one cannot be written
    assert score("prefix", ByteTokenizer(), "é!", ["é", "é!", "e"]) == [1, 1, 0]


def test_exact_and_run():
    tok = PieceTokenizer()
    assert score("exact", tok, " world is", [" world", " world is", " wor", "", None]) == [1, 1, 0, 0, 0]
    assert score("run", tok, " world is round", [" world is", " world round", " is", None]) == pytest.approx(
        [2 / 3, 1 / 3, 0, 0])
    eps = [episode(tok, " world is round", meta={"ref_logprobs": [-1.0, -2.0, -5.0]})]
    ctx = RewardContext(tok, {"weighting": "surprisal"})
    assert get_reward("run").fn(eps, [" world is"], ctx).tolist() == pytest.approx([3 / 8])
    with pytest.raises(ValueError, match="needs episode.meta\\['ref_logprobs'\\] with 3 values"):
        get_reward("run").fn([episode(tok, " world is round")], ["x"], ctx)


def test_similarity_metrics():
    tok = ByteTokenizer()
    for metric in ("chrf", "bleu", "edit"):
        same, near, far, empty = score("similarity", tok, "the cat sat on the mat",
                                       ["the cat sat on the mat", "the cat sat on a mat", "zzz", ""], metric=metric)
        assert same == pytest.approx(1.0) and far < near < 1.0 and empty == 0.0, metric
    assert score("similarity", tok, "kitten", ["sitting"], metric="edit") == pytest.approx([1 - 3 / 7])
    with pytest.raises(ValueError, match="reward.params.metric: 'rouge' is not one of"):
        score("similarity", tok, "a", ["a"], metric="rouge")


def test_judge_hook_sees_only_answers():
    seen = []

    def fake_judge(answers, continuations, contexts):
        seen.append(list(answers))
        return [1.5 if a.strip() == c.strip() else 0.25 for a, c in zip(answers, continuations)]

    assert score("judge", ByteTokenizer(), " yes", [" yes", "no", None], judge=fake_judge) == [1.0, 0.25, 0.0]
    assert seen == [[" yes", "no"]]
    with pytest.raises(ValueError, match="must be a callable or 'module:function'"):
        score("judge", ByteTokenizer(), "a", ["a"], judge=3)


def test_calibrated_log_and_brier():
    tok = ByteTokenizer()
    r = score("calibrated", tok, " 7", [" 7 | 0.8", " 3 | 0.8", " 7", " 7 | 1.5"])
    assert r == pytest.approx([math.log(0.8), math.log(0.2), math.log(1e-4), math.log(1e-4)])
    assert score("calibrated", tok, " 7", [" 7 | 0.8", " 3 | 0.8"], rule="brier") == pytest.approx([-0.04, -0.64])


def test_likelihood_rewards():
    logp = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    base = torch.tensor([[-2.0, -2.0, -4.0], [-0.5, -0.6, 0.0]])
    fn = lambda name, **p: get_reward(name).fn(logp, mask, base, p).tolist()  # noqa: E731
    assert fn("loglik") == pytest.approx([-7 / 3, -0.5])
    assert fn("loglik", gamma=0.5) == pytest.approx([(-1 - 1 - 1) / 3, (-0.5 - 0.25) / 2])
    assert fn("info_gain") == pytest.approx([1 / 3, 0.05])
    assert fn("prob") == pytest.approx([math.exp(-1), math.exp(-0.5)])
    # row 0: PPL 10.3 -> 3.5 (I ~ 51 -> 1.0); row 1: exp(0.55) -> exp(0.5) (I ~ 4.9 -> 1.0); now a tiny gain
    assert fn("vrcli") == [1.0, 1.0]
    tiny = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -0.5, 0.0]]) - 0.0102  # I ~ 1.0: the 0.9 level
    assert get_reward("vrcli").fn(logp, mask, tiny, {}).tolist()[0] == pytest.approx(0.9)
    assert get_reward("vrcli").fn(logp, mask, logp, {}).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="needs the baseline model"):
        get_reward("info_gain").fn(logp, mask, None, {})


def test_parse_answer_tags():
    ok = parse_answer("a b</think> <answer> 42 </answer>", DATA)
    assert ok.answer == " 42 " and ok.format_ok
    assert parse_answer("x</think><answer>7", DATA, stopped=True).answer == "7"  # stop string stripped
    for bad in ("no tags at all", "x</think>y</think><answer>1</answer>", "x</think><answer>1</answer><answer>2</answer>",
                "x</think>junk<answer>1</answer>", "x</think><answer>1", "<answer>1</answer>"):
        p = parse_answer(bad, DATA)
        assert p.answer is None and not p.format_ok, bad


def test_compute_rewards_with_shaping():
    tok = ByteTokenizer()
    ep = Episode(prompt_ids=tok.encode("ab<think>"), context_ids=tok.encode("ab"), continuation_ids=tok.encode(" c"),
                 continuation_text=" c", site=2)

    def rollout(text, reason="stop"):
        ids = tok.encode(text)
        return Rollout(prompt_ids=ep.prompt_ids, token_ids=ids, text=text, logprobs=[-1.0] * len(ids),
                       finish_reason=reason)

    rollouts = [rollout("hm</think><answer> c</answer>"), rollout("hmmmmmmm</think><answer> c</answer>"),
                rollout("hm hm hm hm", "length")]
    cfg = RewardConfig(name="prefix", format_weight=0.5, length_cost=0.01, overlong_buffer=4)
    shaped = compute_rewards([ep], rollouts, tok, cfg, DATA, max_new_tokens=12)
    # lengths: 2 + 1 + 1 + 2 + 1 = 7 tokens; 13 tokens (overlong: 12 - 4 < 13 > 12 -> -1); 11 tokens (-3/4)
    assert shaped.terms["reward_base"].tolist() == [1, 1, 0]
    assert shaped.terms["reward_format"].tolist() == [0, 0, -0.5]
    assert shaped.terms["reward_length"].tolist() == pytest.approx([-0.02, -0.08, -0.11])
    assert shaped.terms["reward_overlong"].tolist() == pytest.approx([0, -1, -0.75])
    assert shaped.total.tolist() == pytest.approx([0.98, -0.08, -1.36])
    with pytest.raises(ValueError, match="pass the trainer's continuation log-probs"):
        compute_rewards([ep], rollouts, tok, RewardConfig(name="loglik"), DATA, 12)


def test_shuffled_rewards_are_a_seeded_permutation():
    """The shuffled-reward control keeps the batch's rewards but detaches them from their rollouts."""
    tok = ByteTokenizer()
    eps = [Episode(prompt_ids=tok.encode("x<think>"), context_ids=tok.encode("x"), continuation_ids=tok.encode(d),
                   continuation_text=d, site=1) for d in "0123456789"]
    answers = "01234xxxxx"  # the first five right, the last five wrong
    rollouts = [Rollout(prompt_ids=eps[i].prompt_ids, token_ids=tok.encode(t), text=t, logprobs=[0.0] * len(t),
                        finish_reason="stop", prompt_index=i)
                for i, t in enumerate(f"</think><answer>{a}</answer>" for a in answers)]
    plain = compute_rewards(eps, rollouts, tok, RewardConfig(), DATA, 16).total
    assert plain.tolist() == [1.0] * 5 + [0.0] * 5
    shuffled = [compute_rewards(eps, rollouts, tok, RewardConfig(shuffle=True), DATA, 16, shuffle_seed=s).total
                for s in (1, 1, 2)]
    assert sorted(shuffled[0].tolist()) == sorted(plain.tolist()) and shuffled[0].tolist() != plain.tolist()
    assert shuffled[0].tolist() == shuffled[1].tolist() and shuffled[0].tolist() != shuffled[2].tolist()
    with pytest.raises(ValueError, match="shuffle_seed"):
        compute_rewards(eps, rollouts, tok, RewardConfig(shuffle=True), DATA, 16)


def test_overlong_penalty_edges():
    assert [overlong_penalty(n, 10, 4) for n in (6, 7, 8, 10, 11)] == pytest.approx([0, -0.25, -0.5, -1, -1])
    assert overlong_penalty(100, 10, 0) == 0
