"""Shared-context rows (rl/shared_context.py, model/attention.py) are exact: in float64 the loss and every
parameter gradient of a step on [context | y_1 | ... | y_G] rows equal those of the per-row step (relative error
<= 1e-10) at TP1, TP2 with sequence parallelism and PP2 (1F1B), through megatron's real schedules over gloo;
the policy tokens' log-probs of a forward-only scoring pass (reference, off-policy anchor) and the likelihood
rewards' continuation log-probs equal the per-row ones. Under expert parallelism the EP group's ranks pad to one
layout and the step equals the per-row one to float32 precision (megatron's router softmax)."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks

RTOL = 1e-10
G, VOCAB, SEQ, CLOSE = 3, 256, 24, 7
RL = {"objective": "mixed", "train_on": "thought_and_answer", "kl_coef": 0.05, "tis_cap": 2.0, "clip_eps_high": 0.28,
      "logprob_chunk_size": 16}


def rollouts_and_batch(prompts: tuple[int, ...] = (14, 9, 5)):
    """Three groups of G rollouts (prompts of 14, 9 and 5 tokens, the context inside; generated 1..7 tokens,
    some closing the thought) and their per-row batch, old / rollout / reference log-probs near a random model's."""
    from rntp_megatron.data.episode import Episode
    from rntp_megatron.rl.batch import pack_rollouts
    from rntp_megatron.rollout.engine import Rollout

    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(10, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    episodes, rollouts = [], []
    for e, p in enumerate(prompts):
        prompt = rand(p)
        episodes.append(Episode(prompt, prompt[2:p - 2], rand(3), "", 0))
        for j in range(G):
            tokens = rand(1 + 2 * j + e)
            if j != 1:
                tokens[min(j, len(tokens) - 1)] = CLOSE
            rollouts.append(Rollout(prompt, tokens, "", (-5.5 + 0.2 * torch.randn(len(tokens), generator=g)).tolist(),
                                    "stop", prompt_index=e))
    n = len(rollouts)
    old = [(torch.tensor(r.logprobs) + 0.1 * torch.randn(len(r.logprobs), generator=g)).tolist() for r in rollouts]
    batch = pack_rollouts(episodes, rollouts, torch.randn(n, generator=g), torch.rand(n, generator=g), [CLOSE], SEQ,
                          0, old_logprobs=old)
    batch.ref_logprobs = batch.old_logprobs + 0.1 * torch.randn(n, SEQ, generator=g)
    return rollouts, batch


def layouts(tp: int):
    """(per-row micro-batches, seq length, micro-batch size), then the same for the shared-context rows."""
    from rntp_megatron.rl.batch import with_global_counts
    from rntp_megatron.rl.shared_context import share_context

    rollouts, rows = rollouts_and_batch()
    shared, layout = share_context(rows, rollouts, row_length=40, pad_id=0, length_multiple=tp)
    # the context's next-token term counts once per group: the step-wide count is the shared rows' own
    rows, shared = with_global_counts(rows, "thought_and_answer"), with_global_counts(shared, "thought_and_answer")
    assert shared.global_ntp_tokens * G == rows.global_ntp_tokens
    # groups of 22, 20 and 19 tokens: two rows of 40, the second holding two groups, cut to 39 (a multiple of tp)
    assert (layout.rows, layout.length, shared.num_sequences) == (2, -(-39 // tp) * tp, 3 * G)
    return (rows.microbatches(3), SEQ, 3, None), (shared.microbatches(1), layout.length, 1, layout)


def run(rank: int, world: int, layouts_: list[dict], ckpt: str, save: bool) -> list:
    """For each parallel layout: loss, metrics and this rank's grads of the per-row and the shared step (the same
    float64 weights), and the policy log-probs of a scoring pass over both kinds of rows."""
    from megatron.core import dist_checkpointing, parallel_state

    from rntp_megatron.config import RLConfig, build_config, from_dict
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import wrap_ddp
    from rntp_megatron.rewards.scoring import continuation_logprobs
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.rl.routing_replay import score_policy_tokens
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.step import forward_backward, reduce_logged
    from rntp_megatron.weights.export import global_named_parameters

    torch.set_default_dtype(torch.float64)  # megatron's torch norms are built in the default dtype
    loss = RNTPLoss(from_dict(RLConfig, RL), temperature=0.7, ntp_weight=0.5, vocab_size=VOCAB)
    results = []
    for parallel in layouts_:
        cfg = build_config({"model": {"card": "tiny"}, "parallel": parallel, "rl": {"objective": "ntp"}})
        init_distributed(cfg.parallel, seed=1234)
        model = build_model(cfg.model, cfg.parallel, params_dtype=torch.float64, pipeline_dtype=torch.float64)
        if save:
            dist_checkpointing.save(model.sharded_state_dict(), ckpt)
        else:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
        ddp = wrap_ddp(model, cfg.parallel)
        out = []
        for mbs, seq, size, layout in layouts(cfg.parallel.tensor_model_parallel_size):
            ddp.zero_grad_buffer()
            metrics = reduce_logged(forward_backward([ddp], loss.forward_step, mbs, len(mbs), seq, size))
            grads = {n: p.main_grad.detach().clone() for n, p in global_named_parameters(model)}
            logp = score_policy_tokens([ddp], loss, mbs, seq, size)
            out.append({"metrics": metrics, "grads": grads, "logp": logp, "mbs": mbs, "layout": layout})
        # likelihood-reward scoring (rewards/scoring.py): [prompt + a thought] prefixes, continuations after them
        rollouts, _ = rollouts_and_batch()
        prefixes = [r.prompt_ids + r.token_ids[:1] for r in rollouts]
        conts = [r.token_ids[1:] + [11, 12] for r in rollouts]
        tp = cfg.parallel.tensor_model_parallel_size
        out[1]["likelihood"] = [continuation_logprobs([ddp], prefixes, conts, 3, 0, 0.7, tp, VOCAB, groups)
                                for groups in (None, [r.prompt_index for r in rollouts])]
        results.append(out)
        parallel_state.destroy_model_parallel()
    destroy_distributed()
    return results


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def check(per_row: dict, shared: dict, what: str) -> None:
    """Equal loss, metrics, grads and scored log-probs (mapped to per-row positions) within RTOL."""
    for name in ("loss", "pg_loss", "ntp_loss", "kl", "pg_clipfrac", "entropy", "policy_tokens"):
        a, b = shared["metrics"][name], per_row["metrics"][name]
        assert abs(a - b) <= RTOL * max(abs(b), 1e-6), f"{what}: metric {name} shared {a} vs per-row {b}"
    assert per_row["metrics"]["pg_clipfrac"] > 0 and per_row["metrics"]["ntp_loss"] > 0
    for name, grad in per_row["grads"].items():
        err = _rel(shared["grads"][name], grad)
        assert err <= RTOL and grad.norm() > 0, f"{what}: grad {name} relative error {err:.2e}"
    layout = shared["layout"]
    packed_policy = torch.cat([(mb.thought_mask + mb.answer_mask) for mb in shared["mbs"]])
    from_shared = layout.pack(per_row["logp"][:, :layout.index.shape[1]]) * packed_policy
    err = _rel(shared["logp"] * packed_policy, from_shared)
    assert err <= RTOL and packed_policy.sum() > 0, f"{what}: scored log-probs relative error {err:.2e}"
    (rows_logp, rows_mask), (shared_logp, shared_mask) = shared["likelihood"]
    assert torch.equal(rows_mask, shared_mask) and rows_mask.sum() > 3 * G
    err = _rel(shared_logp, rows_logp)  # the scoring pass hands back float32
    assert err <= 1e-6, f"{what}: likelihood log-probs relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.distributed
def test_shared_context_step_equals_per_row(tmp_path):
    (per_row, shared), = run_ranks(run, 1, args=([{}], str(tmp_path), True))[0]
    check(per_row, shared, "TP1")
    layouts_ = [{"tensor_model_parallel_size": 2, "sequence_parallel": True}, {"pipeline_model_parallel_size": 2}]
    for rank, results in enumerate(run_ranks(run, 2, args=(layouts_, str(tmp_path), False))):
        for parallel, (per_row, shared) in zip(layouts_, results):
            check(per_row, shared, f"{parallel} rank {rank}")


def run_expert_parallel(rank: int, world: int, ckpt: str) -> dict:
    """EP2 over two DP ranks holding different groups (rank 0's need two shared rows, rank 1's one): loss, metrics
    and this rank's grads of the per-row and the shared step from the same float64 MoE weights."""
    from megatron.core import dist_checkpointing, parallel_state

    from rntp_megatron.config import RLConfig, build_config, from_dict
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import wrap_ddp
    from rntp_megatron.rl.batch import with_global_counts
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.rl.shared_context import share_context
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.step import forward_backward, reduce_logged
    from rntp_megatron.weights.export import global_named_parameters

    torch.set_default_dtype(torch.float64)
    loss = RNTPLoss(from_dict(RLConfig, RL), temperature=0.7, ntp_weight=0.5, vocab_size=VOCAB)
    # no load-balancing loss: it averages over every fed token, and the two layouts feed different tokens
    cfg = build_config({"model": {"card": "tiny_qwen3_moe", "moe_aux_loss_coeff": 0.0},
                        "parallel": {"expert_model_parallel_size": 2}, "rl": {"objective": "ntp"}})
    init_distributed(cfg.parallel, seed=1234)
    model = build_model(cfg.model, cfg.parallel, params_dtype=torch.float64, pipeline_dtype=torch.float64)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt))
    ddp = wrap_ddp(model, cfg.parallel)
    rollouts, rows = rollouts_and_batch((14, 9, 5) if rank == 0 else (6, 4, 3))
    shared, layout = share_context(rows, rollouts, row_length=48, pad_id=0)  # groups of 22+20|19 and 14+15+17
    filled = int(layout.row.max()) + 1
    shapes = [None] * world  # unequal shapes would hang the first forward's token dispatch: fail here instead
    torch.distributed.all_gather_object(shapes, (layout.rows, layout.length))
    assert len(set(shapes)) == 1, f"EP ranks' shared rows (rows, length): {shapes}"
    rows, shared = with_global_counts(rows, "thought_and_answer"), with_global_counts(shared, "thought_and_answer")
    out = {"filled": filled, "rows": layout.rows, "length": layout.length}
    for name, mbs, seq, size in (("per_row", rows.microbatches(3), SEQ, 3),
                                 ("shared", shared.microbatches(1), layout.length, 1)):
        ddp.zero_grad_buffer()
        metrics = reduce_logged(forward_backward([ddp], loss.forward_step, mbs, len(mbs), seq, size))
        grads = {n: p.main_grad.detach().clone() for n, p in global_named_parameters(model)}
        out[name] = {"metrics": metrics, "grads": grads}
    parallel_state.destroy_model_parallel()
    destroy_distributed()
    return out


def save_moe(rank: int, world: int, ckpt: str) -> None:
    """The float64 EP1 weights every rank of the EP2 run loads (resharded on load)."""
    from megatron.core import dist_checkpointing

    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    torch.set_default_dtype(torch.float64)
    cfg = build_config({"model": {"card": "tiny_qwen3_moe", "moe_aux_loss_coeff": 0.0}, "rl": {"objective": "ntp"}})
    init_distributed(cfg.parallel, seed=1234)
    model = build_model(cfg.model, cfg.parallel, params_dtype=torch.float64, pipeline_dtype=torch.float64)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    destroy_distributed()


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_ranks_pad_to_one_shared_layout_and_equal_per_row(tmp_path):
    """Expert parallelism's forwards are collectives of the EP group: each rank pads its shared rows to the group's
    most rows and longest row (rank 1 fills one row and runs two), and the step stays exact against per-row."""
    run_ranks(save_moe, 1, args=(str(tmp_path),))
    ranks = run_ranks(run_expert_parallel, 2, args=(str(tmp_path),), timeout_s=300)
    assert [r["filled"] for r in ranks] == [2, 1] and ranks[0]["rows"] == ranks[1]["rows"] == 2
    assert ranks[0]["length"] == ranks[1]["length"]
    for rank, res in enumerate(ranks):
        per_row, shared = res["per_row"], res["shared"]
        for name in ("loss", "pg_loss", "ntp_loss", "kl", "pg_clipfrac", "entropy", "policy_tokens"):
            a, b = shared["metrics"][name], per_row["metrics"][name]
            assert abs(a - b) <= 1e-6 * max(abs(b), 1e-6), f"rank {rank}: metric {name} shared {a} vs per-row {b}"
        assert any(".mlp.experts." in n for n in per_row["grads"])
        for name, grad in per_row["grads"].items():
            # megatron-core's router takes its softmax in float32 (moe_utils), so the MoE layers agree to float32's
            # precision, not float64's: 2.7e-8 seen on the router's weight, 1.4e-9 on the norm before it
            err = _rel(shared["grads"][name], grad)
            assert err <= 1e-6 and grad.norm() > 0, f"rank {rank}: grad {name} relative error {err:.2e}"
