"""Advantages against hand-computed values, and the zero-variance (dynamic sampling) filter."""

from __future__ import annotations

import math

import pytest
import torch

from rntp_megatron.rl.advantages import compute_advantages, zero_variance_filter

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4


def test_grpo_hand_values():
    a = compute_advantages(REWARDS, 4, "grpo")
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6)]
    assert a[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]], rel=1e-6)
    assert a[4:].tolist() == [0.0] * 4  # zero-variance group: no signal, no NaN


def test_dr_grpo_and_rloo_hand_values():
    assert compute_advantages(REWARDS, 4, "dr_grpo").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    r = torch.tensor([3.0, 1.0, 2.0])
    # leave-one-out: 3 - mean(1, 2) = 1.5, 1 - 2.5 = -1.5, 2 - 2 = 0
    assert compute_advantages(r, 3, "rloo").tolist() == pytest.approx([1.5, -1.5, 0.0])


def test_groups_never_mix():
    r = torch.tensor([0.0, 1.0, 10.0, 11.0])
    assert compute_advantages(r, 2, "dr_grpo").tolist() == [-0.5, 0.5, -0.5, 0.5]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="7 rewards do not split into groups of size 4"):
        compute_advantages(torch.zeros(7), 4, "grpo")
    with pytest.raises(ValueError, match="unknown advantage 'ppo'"):
        compute_advantages(torch.zeros(4), 4, "ppo")
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        compute_advantages(torch.zeros(4), 1, "rloo")


def test_zero_variance_filter():
    f = zero_variance_filter(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    assert f.keep.tolist() == [False, True, False]
    assert f.zero_variance_fraction == pytest.approx(2 / 3)
    assert f.sample_mask(2).tolist() == [False, False, True, True, False, False]
