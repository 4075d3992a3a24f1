"""FLOP accounting (rntp_megatron/flops.py) against counts worked out by hand, `rntp plan` on the same formulas, and
the trainer's per-step metrics against the rollouts it actually trained on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rntp_megatron.config import ModelConfig, build_config
from rntp_megatron.flops import (FlopMeter, TokenTally, forward_flops, non_embedding_params, record_scoring,
                                 record_scoring_spans, rollout_tally, take_scoring, training_flops)
from rntp_megatron.plan import make_plan

# L=2, h=8, 2 heads of 4 (a=8), 1 KV group, ffn 16, V=10
CARD = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
                   vocab_size=10)


def test_dense_card_by_hand():
    # per layer: q 8x8 + o 8x8 + k 8x4 + v 8x4 = 192; MLP 3 x 8 x 16 = 384; 2 layers -> 1152
    assert non_embedding_params(CARD) == 1152
    # 3 tokens from scratch, logits at all 3: matmuls 2*1152*3 = 6912; query-key pairs 1+2+3 = 6, attention
    # 4 * L * a * 6 = 4*2*8*6 = 384; output layer 2 * V * h * 3 = 480
    assert forward_flops(CARD, TokenTally().add(3)) == 6912 + 384 + 480
    assert training_flops(CARD, TokenTally().add(3)) == 3 * 7776
    # 2 tokens after 4 cached ones, 1 logit: pairs 5+6 = 11 -> 2*1152*2 + 4*2*8*11 + 2*10*8*1
    assert forward_flops(CARD, TokenTally().add(2, past=4, logits=1)) == 4608 + 704 + 160


def test_rollout_prefills_once_per_prompt_and_decodes_against_the_cache():
    # a prompt of 3 tokens, two samples of 2 tokens: prefill pairs 6, no logits; each sample pairs 4+5, 2 logits
    t = rollout_tally([3], [[2, 2]])
    assert (t.tokens, t.pairs, t.logits) == (3 + 2 + 2, 6 + 9 + 9, 4)
    assert forward_flops(CARD, t) == 2 * 1152 * 7 + 4 * 2 * 8 * 24 + 2 * 10 * 8 * 4


def test_moe_card_counts_the_router_and_the_active_experts():
    moe = SimpleNamespace(**{**vars(CARD), "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 6})
    # per layer: attention 192; router 8x4 = 32; 2 active experts of 3 x 8 x 6 = 144 each -> 512 per layer
    assert non_embedding_params(moe) == 2 * (192 + 32 + 288)
    dense = SimpleNamespace(**{**vars(CARD), "num_moe_experts": None})
    assert non_embedding_params(dense) == non_embedding_params(CARD)


def test_scoring_passes_are_recorded_and_drained():
    take_scoring()
    record_scoring([4, 2], [1, 3])  # rows fed 4 and 4 tokens, logits at 1 and 3
    t = take_scoring()
    assert (t.tokens, t.pairs, t.logits) == (8, 10 + 10, 4)
    assert take_scoring().tokens == 0


def test_meter_totals_accumulate_and_restore():
    meter = FlopMeter(CARD)
    meter.count_train([3], [3])
    record_scoring([2], [1])  # 2 tokens fed, pairs 3, 1 logit
    out = meter.end()
    assert out["step_flops_train"] == 3 * 7776
    assert out["step_flops_scoring"] == 2 * 1152 * 2 + 4 * 2 * 8 * 3 + 2 * 10 * 8
    assert out["flops_total"] == out["flops_train"] + out["flops_rollout"] + out["flops_scoring"]
    again = FlopMeter(CARD)
    again.load_state_dict(meter.state_dict())
    again.count_train([3], [3])
    assert again.end()["flops_train"] == 2 * 3 * 7776


def test_shared_context_spans_count_the_context_once():
    meter = FlopMeter(CARD)
    # a context of 4 tokens, then branches of 2 and 3 tokens after it, 5 logits read
    meter.count_train_spans([(4, 0), (2, 4), (3, 4)], 5)
    assert (meter.train.tokens, meter.train.pairs, meter.train.logits) == (9, 10 + 11 + 18, 5)
    record_scoring_spans([(4, 0), (2, 4)], 2)
    assert (take_scoring().tokens, take_scoring().tokens) == (6, 0)


def test_plan_uses_the_same_formulas():
    # one chunk of 6 text tokens, one site, G=2 thoughts of 2 tokens
    p = make_plan(CARD, gpus=1, gpu="H100", context_len=6, thought_len=2, group_size=2, token_budget=6,
                  sites_per_chunk=1, global_batch_size=2, mfu=0.5, decode_tokens_per_s_per_gpu=1.0)
    assert p.rollout_flops == forward_flops(CARD, rollout_tally([6], [[2, 2]]))
    assert p.training_flops == 2 * training_flops(CARD, TokenTally().add(8, 0, 2))


@pytest.mark.slow
def test_trainer_logs_the_flops_of_its_rollouts_rows_and_scoring(tmp_path):
    """One RNTP step with a likelihood reward: the logged FLOPs match the rollouts it trained on, counted by hand
    (shared-context rows; two scoring passes: policy [prompt + thought + <answer>] per rollout and baseline
    [prompt + </think><answer>] per site)."""
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    cfg = build_config({}, [
        "model.card=tiny", "model.vocab_size=262", "rl.group_size=2", "schedule.global_batch_size=4",
        "schedule.micro_batch_size=2", "schedule.train_steps=1", "schedule.seq_length=64", "data.context_len=40",
        "data.min_context=8", "rollout.max_new_tokens=6", "rollout.temperature=1.0", "reward.name=prob",
        f"logging.dir={tmp_path}", "logging.progress=false", "logging.plot=false"])
    trainer = Trainer(cfg)
    seen = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda prompts, sampling: seen.append(generate(prompts, sampling)) or seen[-1]
    logged = []
    log = trainer.metrics.log
    trainer.metrics.log = lambda step, values: logged.append(values) or log(step, values)
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
        destroy_distributed()
    m, (rollouts,), (values,) = cfg.model, seen, logged
    width = m.hidden_size  # tiny card: heads * head_dim == hidden
    n, vh, L = non_embedding_params(m), m.vocab_size * m.hidden_size, m.num_layers

    def fwd(tokens: int, past: int, logits: int) -> float:
        return 2 * n * tokens + 4 * L * width * sum(range(past + 1, past + tokens + 1)) + 2 * vh * logits

    prompts = {r.prompt_index: len(r.prompt_ids) for r in rollouts}
    rollout = sum(fwd(p, 0, 0) for p in prompts.values()) + sum(
        fwd(len(r.token_ids), len(r.prompt_ids), len(r.token_ids)) for r in rollouts)
    per_row = sum(3 * fwd(len(r.prompt_ids) + len(r.token_ids) - 1, 0, len(r.token_ids)) for r in rollouts)
    # rl.shared_context (on): each group's context (its prompt less one token) once, each rollout's branch of
    # g tokens after it; the row's padding tail is free
    train = sum(3 * fwd(p - 1, 0, 0) for p in prompts.values()) + sum(
        3 * fwd(len(r.token_ids), len(r.prompt_ids) - 1, len(r.token_ids)) for r in rollouts)
    assert train < per_row
    close, answer = trainer.think_close_ids, trainer.answer_open_ids
    k = cfg.data.answer_horizon
    # the policy pass on shared-context rows: [prompt + thought + <answer> + continuation] of a group share their
    # common prefix (at most the shortest prefix less one token), fed once; each rollout's rest after it
    full = {}
    for r in rollouts:
        full.setdefault(r.prompt_index, []).append(r.prompt_ids + trainer._thought_ids(r) + answer + [0] * k)
    scoring = 0.0
    for seqs in full.values():
        c = min(len(q) for q in seqs) - k - 1
        c = min([c] + [next((i for i, (a, b) in enumerate(zip(seqs[0], q)) if a != b), len(q)) for q in seqs[1:]])
        scoring += fwd(c, 0, 0) + sum(fwd(len(q) - 1 - c, c, k) for q in seqs)
    # the no-thought baseline: once per site (its G rollouts share it)
    scoring += sum(fwd(p + len(close) + len(answer) + k - 1, 0, k) for p in prompts.values())
    assert values["step_flops_rollout"] == pytest.approx(rollout, rel=1e-12)
    assert values["step_flops_train"] == pytest.approx(train, rel=1e-12)
    assert values["step_flops_scoring"] == pytest.approx(scoring, rel=1e-12)
    assert values["flops_total"] == pytest.approx(rollout + train + scoring, rel=1e-12)


def test_interleaved_turns_re_prefill_the_rollout_so_far():
    """Each later turn of an interleaved rollout is a new engine call: its prompt so far is prefilled again."""
    from rntp_megatron.rollout.engine import Rollout

    meter = FlopMeter(CARD)
    # a 3-token prompt; turn 0 samples 2 tokens; 3 are fed (true text and <think>); turn 1 samples 2 more
    two = [Rollout([1, 2, 3], [0] * 7, "", [0.0] * 7, "stop", prompt_index=0, segments=[[0, 2, 1], [5, 7, 1]]),
           Rollout([1, 2, 3], [0] * 6, "", [0.0] * 6, "stop", prompt_index=0, segments=[[0, 1, 1], [4, 6, 1]])]
    meter.count_rollouts(two)
    # turn 0: one prefill of 3 for the group, then 2 and 1 tokens after it; turn 1: prefill 3 + 5 = 8 then 2
    # tokens after 8, and prefill 3 + 4 = 7 then 2 after 7; logits at the 2 + 1 + 2 + 2 sampled tokens
    expected = rollout_tally([3], [[2, 1]]).add(8, 0, 0).add(2, 8, 2).add(7, 0, 0).add(2, 7, 2)
    assert (expected.tokens, expected.logits) == (3 + 2 + 1 + 8 + 2 + 7 + 2, 7)
    assert meter.end()["step_flops_rollout"] == forward_flops(CARD, expected)
