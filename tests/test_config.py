"""The config tree: YAML + dotted overrides, model cards, and errors that name the field."""

from __future__ import annotations

import pytest

from rntp_megatron.config import ConfigError, build_config, load_config, to_dict, validate


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = build_config()
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_dotted_overrides_are_typed():
    cfg = build_config({"rl": {"group_size": 4}}, ["rl.group_size=16", "schedule.lr=3e-4", "rl.icepop=[0.5, 2]",
                                                   "parallel.sequence_parallel=false"])
    assert cfg.rl.group_size == 16 and cfg.schedule.lr == 3e-4 and cfg.rl.icepop == (0.5, 2.0)


def test_model_card_fills_defaults_and_keys_override_it():
    cfg = build_config({"model": {"card": "qwen3_8b", "num_layers": 4}})
    assert cfg.model.hidden_size == 4096 and cfg.model.qk_layernorm and cfg.model.num_layers == 4
    with pytest.raises(ConfigError, match="model.card: no model card 'gpt5'.*tiny"):
        build_config({"model": {"card": "gpt5"}})


@pytest.mark.parametrize("data, overrides, message", [
    ({"rl": {"grop_size": 3}}, [], r"unknown config key 'rl.grop_size'; did you mean 'rl.group_size'"),
    ({}, ["rll.group_size=3"], r"unknown config key 'rll'; did you mean 'rl'"),
    ({}, ["rl.group_size=many"], r"rl.group_size: expected an integer, got 'many'"),
    ({}, ["rl.advantage=grop"], r"rl.advantage: 'grop' is not one of .*did you mean 'grpo'"),
    ({}, ["parallel.tensor_model_parallel_size=3"], r"TP=3 must divide model.num_attention_heads=4"),
    ({"model": {"num_attention_heads": 8, "num_query_groups": 2}}, ["parallel.tensor_model_parallel_size=4"],
     r"TP=4 must divide model.num_query_groups \(KV heads\)=2"),
    ({}, ["parallel.pipeline_model_parallel_size=3"], r"PP=3 must divide model.num_layers=2"),
    ({}, ["schedule.global_batch_size=6", "schedule.micro_batch_size=4"], r"6 is not divisible by micro_batch_size=4"),
    ({}, ["parallel.sequence_parallel=true"], r"parallel.sequence_parallel: true needs TP > 1"),
    ({}, ["parallel.context_parallel_size=2"], r"parallel.context_parallel_size: 2 is not supported: .*Transformer "
     r"Engine's attention"),
    ({}, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "schedule.seq_length=255",
          "data.context_len=128"], r"schedule.seq_length: 255 must be a multiple of TP=2"),
    ({}, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
     r"rollout.engine: the in-process 'megatron' engine decodes one token a step"),
    ({}, ["model.fp8=mxfp8", "model.transformer_impl=local"], r"model.fp8: FP8 recipe 'mxfp8' needs"),
    ({}, ["data.logprob_window=[-1, -4]"], r"data.logprob_window: low -1.0 must be below high -4.0"),
    ({}, ["nonsense"], r"override 'nonsense' must look like section.key=value"),
])
def test_errors_name_the_field(data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(data, overrides)


def test_world_size_rules():
    cfg = build_config({"parallel": {"tensor_model_parallel_size": 2}, "schedule": {"global_batch_size": 6}})
    validate(cfg, world_size=6)  # DP = 3 divides 6 micro-batches
    with pytest.raises(ConfigError, match=r"world size 5 is not divisible by TP\*PP\*CP = 2\*1\*1"):
        validate(cfg, world_size=5)
    with pytest.raises(ConfigError, match=r"6 is not divisible by micro_batch_size \* data-parallel size = 1 \* 4"):
        validate(cfg, world_size=8)


@pytest.mark.parametrize("reward", ["info_gain", "loglik", "prob", "vrcli"])
def test_likelihood_rewards_train_the_thought_by_default(tmp_path, reward):
    """A reward that scores the true continuation reads no answer: unset, rl.train_on resolves to `thought` in what
    load_config returns and in the plain config the run logs; a value given in the YAML or an override wins."""
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"reward": {"name": reward}}))
    cfg = load_config(path)
    assert cfg.rl.train_on == "thought" and to_dict(cfg)["rl"]["train_on"] == "thought"
    assert load_config(path, ["rl.train_on=thought_and_answer"]).rl.train_on == "thought_and_answer"
    path.write_text(yaml.safe_dump({"reward": {"name": reward}, "rl": {"train_on": "thought_and_answer"}}))
    assert load_config(path).rl.train_on == "thought_and_answer"


def test_string_rewards_train_thought_and_answer_by_default():
    """The answer is what a string reward reads, so its tokens train too, unless told otherwise."""
    assert build_config({"reward": {"name": "prefix"}}).rl.train_on == "thought_and_answer"
    assert build_config({"reward": {"name": "exact"}, "rl": {"train_on": "thought"}}).rl.train_on == "thought"
