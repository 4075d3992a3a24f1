"""Rows fit: validation refuses a config whose longest prompt plus rollout.max_new_tokens overflows
schedule.seq_length + 1 (naming the values), the template is counted by a bound no tokenizer of the project
exceeds, and a prompt still too long loses context from the left instead of failing the step."""

from __future__ import annotations

import pytest

from rntp_megatron.config import ConfigError, build_config, template_token_bound
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.fit import CUT_KEY, cut_prompt_left
from rntp_megatron.data.tokenizer import ByteTokenizer


def test_the_defaults_fit_and_an_overflow_names_the_three_values():
    cfg = build_config()
    d = cfg.data
    assert d.context_len - d.answer_horizon + 1 + cfg.rollout.max_new_tokens <= cfg.schedule.seq_length + 1
    message = (r"data.context_len=256 .* 1 tokens of data.prompt_template \+ rollout.max_new_tokens=32 = 288 "
               r"does not fit schedule.seq_length \+ 1 = 257")
    with pytest.raises(ConfigError, match=message):
        build_config({}, ["data.context_len=256"])
    build_config({}, ["data.context_len=256", "schedule.seq_length=287"])  # exactly fits
    with pytest.raises(ConfigError, match="schedule.seq_length"):
        build_config({}, ["data.context_len=256", "schedule.seq_length=286"])
    build_config({}, ["data.context_len=256", "rl.objective=ntp"])  # no rollouts: no row to fit


def test_the_template_bound_counts_tags_as_one_token_and_other_text_by_bytes():
    template = {"data": {"prompt_template": "Text: {context}\n<think>é", "context_len": 216}}
    cfg = build_config(template)  # 215 + 10 + 32 = 257: fits
    tok = ByteTokenizer()
    before, after = cfg.data.prompt_template.split("{context}")
    assert template_token_bound(cfg.data) == len(tok.encode(before)) + len(tok.encode(after)) == 6 + 1 + 1 + 2
    with pytest.raises(ConfigError, match="at most 10 tokens of data.prompt_template"):
        build_config(template, ["data.context_len=217"])


def test_an_overlong_prompt_is_cut_from_the_left_keeping_the_template():
    prefix, context, suffix = [1, 2], list(range(10, 30)), [99]
    ep = Episode(prompt_ids=prefix + context + suffix, context_ids=context, continuation_ids=[30],
                 continuation_text="x", site=20, meta={"chunk": 0})
    assert cut_prompt_left(ep, 23, prefix_len=2) is ep  # fits: unchanged
    cut = cut_prompt_left(ep, 15, prefix_len=2)
    assert cut.prompt_ids == prefix + list(range(18, 30)) + suffix and cut.context_ids == list(range(18, 30))
    assert cut.meta == {"chunk": 0, CUT_KEY: 8} and cut.continuation_ids == [30] and ep.meta == {"chunk": 0}
    with pytest.raises(ValueError, match="template alone is too long"):
        cut_prompt_left(ep, 3, prefix_len=2)
