"""Errors that say the fix: configs broken one way each; every ConfigError names the field, the value, and a
value that would work, and that value does work."""

from __future__ import annotations

import re

import pytest

from rntp_megatron.config import ConfigError, build_config, validate
from rntp_megatron.data.tokenizer import ByteTokenizer, check_model_vocab

# (overrides that break one thing, the field the message names, the fix it proposes, that fix as overrides)
BROKEN = [
    (["rl.group_size=many"], "rl.group_size", "rl.group_size: 8", ["rl.group_size=8"]),
    (["rl.advantage=grop"], "rl.advantage", "rl.advantage: grpo", ["rl.advantage=grpo"]),
    (["data.think_open=1"], "data.think_open", "data.think_open: '1'", ["data.think_open='1'"]),
    (["data.sources=[{kind: jsn}]"], "data.sources[0].kind", "data.sources[0].kind: jsonl",
     ["data.sources=[{kind: jsonl}]"]),
    (["data.logprob_window=[1]"], "data.logprob_window", "data.logprob_window: [-4.5, -1.0]",
     ["data.logprob_window=[-4.5, -1.0]"]),
    (["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size",
     "parallel.tensor_model_parallel_size: 1", ["parallel.tensor_model_parallel_size=1"]),
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size",
     "parallel.tensor_model_parallel_size: one of [1, 2]", ["parallel.tensor_model_parallel_size=2"]),
    (["model.num_query_groups=3"], "model.num_query_groups", "model.num_query_groups: one of [1, 2, 4]",
     ["model.num_query_groups=4"]),
    (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size",
     "parallel.pipeline_model_parallel_size: one of [1, 2]", ["parallel.pipeline_model_parallel_size=2"]),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel", "parallel.sequence_parallel: false",
     ["parallel.sequence_parallel=false"]),
    (["model.fp8=mxfp8", "model.transformer_impl=local"], "model.fp8", "model.fp8: null",
     ["model.transformer_impl=local"]),
    (["schedule.micro_batch_size=0"], "schedule.micro_batch_size", "schedule.micro_batch_size: 1",
     ["schedule.micro_batch_size=1"]),
    (["schedule.global_batch_size=6", "schedule.micro_batch_size=4"], "schedule.global_batch_size",
     "schedule.global_batch_size: 8", ["schedule.global_batch_size=8", "schedule.micro_batch_size=4"]),
    (["schedule.lr=-0.001"], "schedule.lr", "schedule.lr: 0.001", ["schedule.lr=0.001"]),
    (["rl.group_size=0"], "rl.group_size", "rl.group_size: 8", ["rl.group_size=8"]),
    (["rl.advantage=rloo", "rl.group_size=1"], "rl.group_size", "rl.group_size: 2 or more",
     ["rl.advantage=rloo", "rl.group_size=2"]),
    (["data.answer_horizon=0"], "data.answer_horizon", "data.answer_horizon: 1", ["data.answer_horizon=1"]),
    (["data.min_context=0"], "data.min_context", "data.min_context: 16", ["data.min_context=16"]),
    (["data.context_len=10"], "data.context_len", "data.context_len: 18", ["data.context_len=18"]),
    (["data.logprob_window=[-1, -4]"], "data.logprob_window", "data.logprob_window: [-4.0, -1.0]",
     ["data.logprob_window=[-4.0, -1.0]"]),
    (["data.prompt_template=<think>"], "data.prompt_template", "data.prompt_template: '{context}<think>'",
     ["data.prompt_template='{context}<think>'"]),
    (["data.sites_per_chunk=0"], "data.sites_per_chunk", "data.sites_per_chunk: 1", ["data.sites_per_chunk=1"]),
    (["data.max_document_bytes=0"], "data.max_document_bytes", "data.max_document_bytes: 4194304",
     ["data.max_document_bytes=4194304"]),
    (["data.sources=[{weight: 0}]"], "data.sources[0].weight", "data.sources[0].weight: 1.0",
     ["data.sources=[{weight: 1.0}]"]),
    (["rollout.off_policy_steps=2"], "rollout.off_policy_steps", "rollout.off_policy_steps: 0",
     ["rollout.off_policy_steps=0"]),
    (["rollout.placement=separate"], "rollout.placement", "rollout.placement: colocated",
     ["rollout.placement=colocated"]),
    (["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
      "rollout.off_policy_steps=1"], "rollout.off_policy_steps", "rl.tis_cap",
     ["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
      "rollout.off_policy_steps=1", "rl.tis_cap=2.0"]),
    (["rollout.engine=sglang", "rollout.sglang.weight_sync=distributed"], "rollout.sglang.weight_sync",
     "rollout.sglang.weight_sync: tensor", ["rollout.engine=sglang", "rollout.sglang.weight_sync=tensor"]),
    (["model.card=gpt5"], "model.card", "model.card: one of those", ["model.card=tiny"]),
    (["nonsense"], "override", "--set rl.group_size=16", ["rl.group_size=16"]),
]


@pytest.mark.parametrize("overrides, field, fix, fixed", BROKEN, ids=[" ".join(b[0]) for b in BROKEN])
def test_each_config_error_names_field_value_and_a_fix_that_works(overrides, field, fix, fixed):
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    message = str(err.value)
    assert message.startswith(field), message
    value = re.findall(r"[\w.<>-]+", overrides[-1].split("=", 1)[-1])[-1]  # the last scalar written
    assert value in message, f"the value {value!r} is not named: {message}"
    assert fix in message.split("fix:", 1)[1], message
    build_config({}, fixed)  # the proposed value passes


def test_unknown_key_says_rename_and_lists_known_keys():
    with pytest.raises(ConfigError, match=r"'rl.grop_size'; did you mean 'rl.group_size'\? fix: rename.*group_size"):
        build_config({"rl": {"grop_size": 3}})


def test_world_size_errors_propose_sizes_that_divide():
    cfg = build_config({"parallel": {"tensor_model_parallel_size": 2}, "schedule": {"global_batch_size": 6}})
    with pytest.raises(ConfigError, match=r"fix: launch a multiple of 2 processes, or choose TP\*PP\*CP among "
                                          r"\[1, 5\]"):
        validate(cfg, world_size=5)
    with pytest.raises(ConfigError, match=r"fix: schedule.global_batch_size: 8$"):
        validate(cfg, world_size=8)
    validate(build_config({"parallel": {"tensor_model_parallel_size": 2}, "schedule": {"global_batch_size": 8}}),
             world_size=8)


def test_vocab_error_proposes_the_smallest_padded_vocab_that_holds_the_tokenizer():
    """The tiny card (256) with the byte tokenizer (256 bytes + 4 tags + eos + pad = 262 ids): 384 at TP 1
    (262 rounded up to 128), 512 at TP 2 (to 128 * 2)."""
    vocab = ByteTokenizer().vocab_size
    assert vocab == 262
    for tp, padded in ((1, 384), (2, 512)):
        cfg = build_config({"model": {"card": "tiny"}, "parallel": {"tensor_model_parallel_size": tp}})
        with pytest.raises(ConfigError, match=rf"model.vocab_size: 256 is smaller.*262 ids.*fix: model.vocab_size: "
                                              rf"{padded} "):
            check_model_vocab(cfg, vocab)
        fixed = build_config({"model": {"card": "tiny", "vocab_size": padded},
                              "parallel": {"tensor_model_parallel_size": tp}})
        check_model_vocab(fixed, vocab)
        smaller = build_config({"model": {"card": "tiny", "vocab_size": padded - 128 * tp},
                                "parallel": {"tensor_model_parallel_size": tp}})
        if padded - 128 * tp < vocab:  # the proposal is the smallest multiple that holds it
            with pytest.raises(ConfigError):
                check_model_vocab(smaller, vocab)


def test_group_split_error_proposes_a_batch_that_splits(tmp_path):
    """Trainer-time rule: a GRPO group stays on one DP rank; 12 rollouts at G=8 cannot, 16 can."""
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    cfg = build_config({"model": {"card": "tiny", "vocab_size": 384}, "logging": {"dir": str(tmp_path)}},
                       ["schedule.global_batch_size=12", "schedule.micro_batch_size=2", "rl.group_size=8"])
    try:
        with pytest.raises(ConfigError, match=r"^schedule.global_batch_size: 12 rollouts .* rl.group_size=8 .*"
                                              r"fix: schedule.global_batch_size: 16$"):
            Trainer(cfg)
    finally:
        destroy_distributed()


def test_every_validation_rule_carries_a_fix():
    """Every `need(...)` in config.validate passes its fix (a new rule must say how to satisfy it)."""
    import ast
    import inspect

    from rntp_megatron import config

    tree = ast.parse(inspect.getsource(config.validate))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "need"]
    assert len(calls) > 20 and all(len(c.args) + len(c.keywords) == 4 for c in calls)
