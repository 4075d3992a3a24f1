"""The RNTP loss hook through megatron's real get_forward_backward_func: loss and gradients of one step are the
same (fp32, relative 1e-5) in one micro-batch, in four, over two DP ranks, at TP2 (with and without sequence
parallelism) and at PP2 (1F1B).

The objective exercises every cross-micro-batch dependency at once: the mixed objective (token-mean policy
loss plus a next-token term, rescaled by step-wide counts), KL to a reference, TIS, and a sampling temperature.
The layouts of one world run in one process group, re-initialising megatron's parallel state between them.
"""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROWS, SEQ, VOCAB = 8, 16, 256
RTOL = 1e-5
RL = {"objective": "mixed", "train_on": "thought_and_answer", "kl_coef": 0.05, "tis_cap": 2.0, "clip_eps_high": 0.28, "logprob_chunk_size": 16}


def global_batch():
    """The step's 8 rows: context (ntp) / thought / answer spans of varied lengths, then padding."""
    from rntp_megatron.rl.batch import RLBatch, with_global_counts

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
    thought, answer, ntp = (torch.zeros(ROWS, SEQ) for _ in range(3))
    for i in range(ROWS):
        c, t, a = 3 + i % 4, 2 + i % 3, 1 + i % 2
        ntp[i, :c], thought[i, c:c + t], answer[i, c + t:c + t + a] = 1, 1, 1
    # near a random model's log-probs (about -log 256), so ratios are near 1 and some clip
    old = -5.55 + 0.1 * torch.randn(ROWS, SEQ, generator=g)
    batch = RLBatch(tokens=tokens[:, :-1], position_ids=torch.arange(SEQ).expand(ROWS, SEQ).contiguous(),
                    labels=tokens[:, 1:], thought_mask=thought, answer_mask=answer, ntp_mask=ntp, old_logprobs=old,
                    rollout_logprobs=old + 0.2 * torch.randn(ROWS, SEQ, generator=g),
                    ref_logprobs=old + 0.1 * torch.randn(ROWS, SEQ, generator=g),
                    advantages=torch.randn(ROWS, generator=g), rewards=torch.rand(ROWS, generator=g))
    return with_global_counts(batch, "thought_and_answer")


def loss_step(cfg, ckpt: str, save: bool, micro_batch_size: int) -> dict:
    """One forward/backward of the RNTP loss on global_batch() at cfg's layout (parallel state initialised), the
    weights saved to (save) or loaded from ckpt: reduced metrics (with the MoE aux loss of an MoE model) and this
    rank's grads by global name (global layer and expert numbers) with their TP partition dim."""
    from megatron.core import dist_checkpointing, parallel_state

    from rntp_megatron.config import RLConfig, from_dict
    from rntp_megatron.model.moe import moe_metrics
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import wrap_ddp
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.step import forward_backward, reduce_logged
    from rntp_megatron.weights.export import global_named_parameters

    model = build_model(cfg.model, cfg.parallel)
    if save:
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    ddp = wrap_ddp(model, cfg.parallel)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mbs_list = global_batch().data_parallel_shard(dp_rank, dp).microbatches(micro_batch_size)
    # the loss alone: its reference log-probs come in the batch (a run would need a reference model)
    loss = RNTPLoss(from_dict(RLConfig, RL), temperature=0.7, ntp_weight=cfg.reward.ntp_weight)
    ddp.zero_grad_buffer()
    logged = forward_backward([ddp], loss.forward_step, mbs_list, len(mbs_list), SEQ, micro_batch_size)
    metrics = {**reduce_logged(logged), **moe_metrics(model.config, len(mbs_list))}
    grads = {n: (p.main_grad.detach().clone(), p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
             for n, p in global_named_parameters(model)}
    return {"metrics": metrics, "grads": grads, "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank()}


def run_layouts(rank: int, world: int, layouts: list[tuple[dict, int]], ckpt: str, save: bool) -> list[dict]:
    """For each (parallel sizes, micro-batch size): one forward/backward of the RNTP loss; loss and local grads."""
    from megatron.core import parallel_state

    from rntp_megatron.config import build_config
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    out = []
    for parallel, mbs in layouts:
        cfg = build_config({"model": {"card": "tiny"}, "parallel": parallel, "reward": {"ntp_weight": 0.5},
                            "rl": {"objective": "ntp"}})  # the model only: loss_step builds the RNTP loss from RL
        init_distributed(cfg.parallel, seed=1234)
        out.append(loss_step(cfg, ckpt, save, mbs))
        save = False
        parallel_state.destroy_model_parallel()
    destroy_distributed()
    return out


def _shard(full: torch.Tensor, dim, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor (SwiGLU fc1 is split per half: each rank holds [gate_r; up_r])."""
    if dim is None:
        return full
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def _assert_same(result: dict, ref: dict, what: str) -> None:
    for name in ("loss", "pg_loss", "ntp_loss", "kl", "pg_clipfrac", "entropy"):
        a, b = result["metrics"][name], ref["metrics"][name]
        assert abs(a - b) <= RTOL * max(abs(b), 1e-6), f"{what}: metric {name} {a} vs single-process {b}"
    for name, (grad, dim) in result["grads"].items():
        expected = _shard(ref["grads"][name][0], dim, name, result["tp"], result["tp_rank"])
        err = ((grad - expected).norm() / expected.norm().clamp(min=1e-12)).item()
        assert err <= RTOL, f"{what}: grad {name} (tp rank {result['tp_rank']}) relative error {err:.2e}"


def test_loss_and_grads_are_split_invariant(tmp_path):
    (tmp_path / "weights").mkdir()
    ckpt = str(tmp_path / "weights")
    one_mb, four_mb = run_ranks(run_layouts, 1, args=([({}, ROWS), ({}, ROWS // 4)], ckpt, True))[0]
    assert one_mb["metrics"]["pg_clipfrac"] > 0, "no token clipped: the test would not see clipping"
    assert one_mb["metrics"]["ntp_loss"] > 0 and one_mb["metrics"]["kl"] != 0
    _assert_same(four_mb, one_mb, "4 micro-batches")
    layouts = [({}, 2), ({"tensor_model_parallel_size": 2}, 4),
               ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, 4),
               ({"pipeline_model_parallel_size": 2}, 2)]
    names = ["DP2", "TP2", "TP2 sequence parallel", "PP2"]
    per_rank = run_ranks(run_layouts, 2, args=(layouts, ckpt, False))
    for i, name in enumerate(names):
        for rank, results in enumerate(per_rank):
            _assert_same(results[i], one_mb, f"{name} rank {rank}")
