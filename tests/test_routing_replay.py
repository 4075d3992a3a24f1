"""Routing replay (rl.routing_replay) on Megatron-Core's RouterReplay, tiny_qwen3_moe in one process, at TP2
under sequence parallelism (each TP rank routes, records and replays its own part of the sequence) and at PP2
under the 1F1B schedule (each stage records and replays its own layer's experts per micro-batch).

At the recording weights, the replayed forward-only pass gives the recording pass's log-probs bit for bit, and so
does the training forward (every PPO ratio exactly 1), with no routing mismatch. Then layer 0's router is changed
so that its natural routing differs while the recorded experts' gate logits stay the same: expert E is made a
never-chosen expert before the recording (its router row the mean of experts 0 and 1, with expert 3's row
w0 + w1 - w2, so two experts always score at least as high), and is flipped and scaled after it (row * -30).
Without replay the tokens now go to other experts (mismatch > 0) and the log-probs change; with replay they equal
the recording exactly, and the metric reports the decisions the router would have made differently.
"""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.config import ConfigError, build_config
from rntp_megatron.runtime.spawn import run_ranks

MICRO, SEQ = 4, 16


def _replay_checks(rank: int, world: int, parallel: dict) -> dict:
    from functools import partial

    from megatron.core import parallel_state

    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import wrap_ddp
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.rl.routing_replay import RoutingReplay, differing_decisions, fed_tokens, logprob_step
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.step import forward_backward, reduce_logged
    from tests.test_rl_loss_parallel import global_batch

    cfg = build_config({"model": {"card": "tiny_qwen3_moe"}, "parallel": parallel, "rl": {"routing_replay": True},
                        "rollout": {"engine": "sglang"}})  # the model only (the megatron engine refuses SP)
    init_distributed(cfg.parallel, seed=5)
    try:
        model = build_model(cfg.model, cfg.parallel)
        replay = RoutingReplay(model)
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        router = next(m for m in model.modules() if type(m).__name__ == "TopKRouter")  # this stage's first
        w, never = router.weight.data, cfg.model.num_moe_experts - 1
        if first:  # layer 0
            w[3], w[never] = w[0] + w[1] - w[2], (w[0] + w[1]) / 2
        ddp = wrap_ddp(model, cfg.parallel)
        loss = RNTPLoss(cfg.rl, temperature=0.7, vocab_size=cfg.model.vocab_size)
        batch = global_batch()
        microbatches = batch.microbatches(MICRO)
        policy = [(mb.thought_mask + mb.answer_mask) > 0 for mb in microbatches]

        def logprobs(items, step) -> list[torch.Tensor]:
            out = forward_backward([ddp], step(partial(logprob_step, loss)), items, len(items), SEQ, MICRO,
                                   forward_only=True)
            return [o["logp"][p] for o, p in zip(out, policy)]

        def mismatch(a, b) -> float:
            counts = sum(differing_decisions(x.topk, y.topk, fed_tokens(x.batch, replay.sequence_parallel))
                         for x, y in zip(a, b))
            torch.distributed.all_reduce(counts)  # TP ranks' halves of the sequence, PP stages' layers: as the metric
            return (counts[0] / counts[1]).item()

        items = replay.record([ddp], loss, microbatches, SEQ, MICRO)
        recorded = [item.batch.old_logprobs[p] for item, p in zip(items, policy)]
        out = {"last_stage": last,
               "never_chosen": sum(int((item.topk[0] == never).sum()) for item in items) if first else 0,
               "same_weights_replay_equal": all(map(torch.equal, logprobs(items, replay.replaying), recorded)),
               "same_weights_mismatch": replay.mismatch()}
        logged = forward_backward([ddp], replay.replaying(loss.forward_step), items, len(items), SEQ, MICRO)
        out["train_ratio"], out["train_clipfrac"] = (reduce_logged(logged)[k] for k in ("ratio", "pg_clipfrac"))
        out["train_mismatch"] = replay.mismatch()

        if first:
            w[never] *= -30.0  # now the top expert of many tokens; no recorded gate logit reads this row
        free = replay.record([ddp], loss, microbatches, SEQ, MICRO)  # natural routing at the new weights
        out["free_mismatch"] = mismatch(free, items)
        out["free_equal"] = all(torch.equal(f.batch.old_logprobs[p], r) for f, p, r in zip(free, policy, recorded))
        out["replay_equal"] = all(map(torch.equal, logprobs(items, replay.replaying), recorded))
        out["replay_metric"] = replay.mismatch()
        return out
    finally:
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.slow
def test_replayed_forward_reproduces_the_recorded_log_probs_exactly():
    [one] = run_ranks(_replay_checks, 1, ({},))
    _check(one)
    # TP2: each TP rank routes its half of the sequence; PP2 (1F1B): each stage records and replays its layer
    for parallel in ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, {"pipeline_model_parallel_size": 2}):
        for out in run_ranks(_replay_checks, 2, (parallel,)):
            _check(out)
            assert abs(out["replay_metric"] - one["replay_metric"]) <= 0.01, (parallel, out, one)  # <= a decision apart


def _check(out: dict) -> None:
    assert out["never_chosen"] == 0, "the test's expert must be unused by the recording pass"
    assert out["same_weights_mismatch"] == 0.0, out
    assert out["train_ratio"] == 1.0 and out["train_clipfrac"] == 0.0 and out["train_mismatch"] == 0.0, out
    assert out["free_mismatch"] > 0.05, out  # the perturbation moves natural routing ...
    assert 0 < out["replay_metric"] <= out["free_mismatch"], out  # what the router would have chosen instead
    if out["last_stage"]:  # where the log-probs are
        assert out["same_weights_replay_equal"] and not out["free_equal"], out
        assert out["replay_equal"], out  # ... and replay undoes it, bit for bit


def _cfg(**over):
    base = {"model": {"card": "tiny_qwen3_moe"}, "rl": {"routing_replay": True}}
    for key, value in over.items():
        section, name = key.split("__")
        base.setdefault(section, {})[name] = value
    return build_config(base)


@pytest.mark.parametrize("over, words", [
    ({"model__card": "tiny"}, "mixture-of-experts"),
    ({"rl__objective": "ntp"}, "rl.objective='ntp'"),
])
def test_routing_replay_refusals_name_the_field(over, words):
    with pytest.raises(ConfigError, match="rl.routing_replay") as err:
        _cfg(**over)
    assert words in str(err.value)


def test_routing_replay_validates_for_moe():
    assert _cfg().rl.routing_replay
