"""Validation of the side-model knobs: a run that needs a reference model and has none is refused naming
rl.reference and what needs it; data.proxy needs a card and weights, fits the layout, and is used; and which
models a valid run builds (config.side_model_needs)."""

from __future__ import annotations

import pytest

from rntp_megatron.config import ConfigError, build_config, side_model_needs

TINY = {"model": {"card": "tiny"}}


@pytest.mark.parametrize("extra, needle", [
    ({"rl": {"kl_coef": 0.1}}, "rl.kl_coef=0.1 needs a frozen reference model"),
    ({"data": {"site_selection": "entropy"}}, "data.site_selection='entropy' without data.proxy"),
    ({"reward": {"name": "info_gain", "baseline": "frozen"}}, "reward.baseline=frozen"),
    ({"reward": {"name": "run", "params": {"weighting": "surprisal"}}}, "without data.proxy"),
])
def test_a_run_that_needs_a_reference_without_one_is_refused(extra, needle):
    with pytest.raises(ConfigError, match="^rl.reference: ") as e:
        build_config({**TINY, **extra})
    assert needle in str(e.value) and "checkpoint.load" in str(e.value)
    build_config({**TINY, **extra, "checkpoint": {"load": "/ckpt/iter_0000000"}})  # a reference: valid
    build_config({**TINY, **extra, "rl": {**extra.get("rl", {}), "reference": "/ckpt/ref"}})


@pytest.mark.parametrize("proxy, extra, needle", [
    ({"card": "tiny"}, {"data": {"site_selection": "entropy"}}, "needs both card and load"),
    ({"card": "tiny", "load": "/p"}, {"data": {"site_selection": "uniform"}}, "nothing uses it"),
    ({"card": "demo", "load": "/p"}, {"parallel": {"tensor_model_parallel_size": 8}}, "does not split"),
])
def test_proxy_is_checked(proxy, extra, needle):
    data = {**extra.get("data", {"site_selection": "entropy"}), "proxy": proxy}
    model = {"card": "tiny", "num_attention_heads": 8, "num_query_groups": 8}
    with pytest.raises(ConfigError, match=f"^data.proxy.*{needle}"):
        build_config({**extra, "model": model, "data": data})


def test_ema_decay_range_and_which_models_a_run_builds():
    with pytest.raises(ConfigError, match="reward.ema_decay"):
        build_config({**TINY, "reward": {"ema_decay": 1.0}})
    load = {"checkpoint": {"load": "/c"}}
    assert side_model_needs(build_config(TINY)) == {
        "reference": False, "proxy": False, "ema": False, "frozen_baseline": False, "scores": False,
        "surprisal": False}
    assert side_model_needs(build_config({**TINY, "reward": {"name": "info_gain"}}))["ema"]  # RLP's default
    frozen = build_config({**TINY, **load, "reward": {"name": "vrcli", "baseline": "frozen"}})
    assert side_model_needs(frozen)["frozen_baseline"] and side_model_needs(frozen)["reference"]
    assert not side_model_needs(build_config({**TINY, "reward": {"baseline": "frozen"}}))["reference"]
    both = build_config({**TINY, **load, "rl": {"kl_coef": 0.01},
                         "data": {"site_selection": "entropy", "proxy": {"card": "tiny", "load": "/p"}}})
    assert side_model_needs(both) == {
        "reference": True, "proxy": True, "ema": False, "frozen_baseline": False, "scores": True,
        "surprisal": False}
    ntp = build_config({**TINY, "rl": {"objective": "ntp", "kl_coef": 0.1}, "data": {"site_selection": "entropy"}})
    assert not any(side_model_needs(ntp).values())  # pretraining on whole chunks needs none of them
