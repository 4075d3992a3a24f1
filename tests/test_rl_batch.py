"""Packing rollouts into RLBatch rows: label-coordinate masks for context (ntp), thought and answer; splits."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.data.episode import Episode
from rntp_megatron.data.tokenizer import ByteTokenizer
from rntp_megatron.rl.batch import pack_rollouts, policy_mask, with_global_counts
from rntp_megatron.rollout.engine import Rollout

TOK = ByteTokenizer()


def _batch(seq_length=24):
    ep = Episode(prompt_ids=TOK.encode("abc<think>"), context_ids=TOK.encode("abc"),
                 continuation_ids=TOK.encode("d"), continuation_text="d", site=3)
    texts = ["xy</think><answer>d</answer>", "xyz"]  # the second never closes its thought
    rollouts = [Rollout(prompt_ids=ep.prompt_ids, token_ids=TOK.encode(t), text=t,
                        logprobs=[-0.5] * len(TOK.encode(t)), finish_reason="stop") for t in texts]
    return pack_rollouts([ep], rollouts, torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]),
                         TOK.encode("</think>"), seq_length, TOK.pad_id)


def test_masks_in_label_coordinates():
    b = _batch()
    # prompt a b c <think> (4 tokens); row 0 generates x y </think> <answer> d </answer> (6 tokens)
    assert b.tokens[0, :9].tolist() == TOK.encode("abc<think>xy</think><answer>d")
    assert b.labels[0, :9].tolist() == TOK.encode("bc<think>xy</think><answer>d</answer>")
    assert b.ntp_mask[0].nonzero().flatten().tolist() == [0, 1]  # labels b, c
    assert b.thought_mask[0].nonzero().flatten().tolist() == [3, 4, 5]  # labels x, y, </think>
    assert b.answer_mask[0].nonzero().flatten().tolist() == [6, 7, 8]  # <answer>, d, </answer>
    assert b.thought_mask[1].nonzero().flatten().tolist() == [3, 4, 5] and b.answer_mask[1].sum() == 0
    assert b.old_logprobs[0, 3:9].tolist() == [-0.5] * 6 and b.old_logprobs[0, 9:].abs().sum() == 0
    assert policy_mask(b, "thought").sum() == 6 and policy_mask(b, "thought_and_answer").sum() == 9


def test_global_counts_and_splits():
    b = with_global_counts(_batch(), "thought_and_answer")
    assert (b.global_policy_tokens, b.global_ntp_tokens, b.global_rows) == (9, 4, 2)
    halves = b.microbatches(1)
    assert [h.num_rows for h in halves] == [1, 1] and halves[1].global_policy_tokens == 9
    assert torch.equal(b.data_parallel_shard(1, 2).tokens, b.tokens[1:])
    with pytest.raises(ValueError, match="2 rows do not split into micro-batches of 3"):
        b.microbatches(3)


def test_too_long_rollout_is_an_error():
    with pytest.raises(ValueError, match="exceed seq_length \\+ 1 = 9"):
        _batch(seq_length=8)
