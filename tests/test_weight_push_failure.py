"""A weight push that fails part-way on rank 0 reaches every rank as an error, promptly: at PP2 over gloo, the
engine fails after its first tensor while stage 1 still has its buckets to send; rank 0 goes on through the
weight stream (the sends stage 1 is blocked in) and every rank raises. The engine is a stand-in only for the
fault; the model, the parallel layout, the placement and the weight stream are the real ones. The two ranks
report different host names, as ranks on two hosts (or on GPUs) do, so the weights travel through the stream's
pipeline sends rather than the one-host shared-memory mirror."""

from __future__ import annotations

import time

import pytest

from rntp_megatron.rollout.engine import RolloutEngine

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


class _PushFailsAfterOneTensor(RolloutEngine):
    """An engine whose server dies in the middle of a weight push (after it took one tensor)."""

    def generate(self, prompts, sampling):
        raise NotImplementedError

    def update_weights(self, named_tensors, version):
        for _ in named_tensors:
            raise ConnectionResetError("the server died in the middle of the weight push")


def _push_on_two_hosts(rank: int, world_size: int, run_dir: str) -> tuple[str, float]:
    """(the error this rank raised from push_weights, seconds it took) with rank 0's engine failing part-way."""
    import socket

    from rntp_megatron.config import build_config
    from rntp_megatron.data.tokenizer import tokenizer_for
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rollout.placement import EnginePlacement
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    socket.gethostname = lambda: f"node{rank}"  # each rank a host of its own: no shared-memory mirror
    cfg = build_config({}, ["model.card=tiny", "model.vocab_size=262", "parallel.pipeline_model_parallel_size=2",
                            "parallel.distributed_timeout_minutes=5", "rollout.engine=sglang",
                            "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
                            "rollout.weight_bucket_mb=1"])
    init_distributed(cfg.parallel, cfg.seed)
    try:
        model = build_model(cfg.model, cfg.parallel)
        placement = EnginePlacement(cfg, model, tokenizer_for(cfg.data), run_dir, engine=_PushFailsAfterOneTensor())
        assert placement.mirror is None
        t0 = time.monotonic()
        try:
            placement.push_weights(1)
        except Exception as e:
            return repr(e), time.monotonic() - t0
        return "no error", time.monotonic() - t0
    finally:
        destroy_distributed()


def test_a_push_failing_part_way_reaches_every_rank(tmp_path):
    from rntp_megatron.runtime.spawn import run_ranks

    (first, t_first), (second, t_second) = run_ranks(_push_on_two_hosts, 2, args=(str(tmp_path),), timeout_s=240)
    assert "server died in the middle of the weight push" in first, first
    assert "rank 0 failed to push weight version 1" in second, second
    assert max(t_first, t_second) < 60, (t_first, t_second)  # not a process-group timeout (5 minutes here)
