"""Expert parallelism: the RNTP loss hook's loss, metrics and gradients of one step (with the load-balancing aux
loss on) are the same at EP2 (over two DP ranks) and at TP2 (sequence parallel) x EP2 x DP2 as in one process at
EP1, float32 on gloo, and the aux loss is logged. Experts are compared by global expert number (EP rank r holds r * E/EP + j)."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks
from rntp_megatron.model.hf_mapping import split_tp_shard
from tests.test_rl_loss_parallel import RTOL, loss_step

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MICRO = 4  # rows per micro-batch at every layout: the aux loss is per micro-batch, so its tokens must match


def run_layout(rank: int, world: int, parallel: dict, ckpt: str, save: bool) -> dict:
    """One forward/backward of the RNTP loss at a layout; metrics and this rank's grads by global name."""
    from rntp_megatron.config import build_config
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "tiny_qwen3_moe", "moe_aux_loss_coeff": 0.01}, "parallel": parallel,
                        "rl": {"objective": "ntp"},  # the model only: loss_step builds the RNTP loss from RL
                        "reward": {"ntp_weight": 0.5}})
    init_distributed(cfg.parallel, seed=1234)
    try:
        return loss_step(cfg, ckpt, save, MICRO)
    finally:
        destroy_distributed()


def test_expert_parallel_loss_and_grads_match_ep1(tmp_path):
    (tmp_path / "weights").mkdir()
    ckpt = str(tmp_path / "weights")
    (ref,) = run_ranks(run_layout, 1, args=({}, ckpt, True))
    assert ref["metrics"]["moe_load_balancing_loss"] > 0
    assert sum(1 for n in ref["grads"] if ".mlp.experts." in n) == 2 * 8 * 2  # layers x experts x (fc1, fc2)
    tp2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    for world, parallel in ((2, {"expert_model_parallel_size": 2}), (4, {"expert_model_parallel_size": 2, **tp2})):
        for rank, res in enumerate(run_ranks(run_layout, world, args=(parallel, ckpt, False))):
            what = f"{parallel} rank {rank}"
            for name in ("loss", "pg_loss", "ntp_loss", "kl", "entropy", "moe_load_balancing_loss"):
                a, b = res["metrics"][name], ref["metrics"][name]
                assert abs(a - b) <= RTOL * max(abs(b), 1e-6), f"{what}: metric {name} {a} vs EP1 {b}"
            assert sum(1 for n in res["grads"] if ".mlp.experts." in n) == 2 * 8 * 2 // 2  # half the experts
            for name, (grad, dim) in res["grads"].items():
                full = ref["grads"][name][0]
                expected = full if dim is None else split_tp_shard(name, full, res["tp"], res["tp_rank"])
                err = ((grad - expected).norm() / expected.norm().clamp(min=1e-12)).item()
                assert err <= RTOL, f"{what}: grad {name} relative error {err:.2e}"
