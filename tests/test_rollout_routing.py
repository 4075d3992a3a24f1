"""moe/rollout_routing_mismatch (rl/rollout_routing.py): a rollout's routed experts land at the positions that
predict its generated tokens, in the router's [s, b] order, and are compared with the recorded experts as sets.

Synthetic: the 'trainer' routes position t of row i to a random expert pair (3 layers of 8 experts, top 2);
the 'server' reports the same routing of its positions p - 1 .. p + g - 2. The mismatch is 0, and reading the
server's rows one position off (the position OF each generated token) makes it > 0.7.
Real: a trainer-started SGLang server of tiny_qwen3_moe routes as the recording pass at synced weights (0.0) and
clearly not once the trainer's routers differ from the pushed ones."""

from __future__ import annotations

import torch

from rntp_megatron.config import build_config
from rntp_megatron.data.episode import Episode
from rntp_megatron.rl.batch import pack_rollouts
from rntp_megatron.rl.rollout_routing import rollout_experts, rollout_routing_counts, routed_experts
from rntp_megatron.rl.routing_replay import Routed
from rntp_megatron.rollout.engine import Rollout
from tests.test_trainer_placement import _overrides, logged_metrics, sglang_test

SEQ, LAYERS, K, EXPERTS = 12, 3, 2, 8


def _routing(rows: int) -> torch.Tensor:
    """int32[rows, SEQ + 1, LAYERS, K]: a distinct expert pair for every (row, position, layer)."""
    g = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(rows * (SEQ + 1) * LAYERS)]
                       ).view(rows, SEQ + 1, LAYERS, K).int()


def _rollouts(truth: torch.Tensor, shift: int) -> list[Rollout]:
    """Rollouts with prompts of 3..6 tokens and 4..6 generated ones; the server's experts for generated token j
    are truth at position p - 1 + j + shift (the layer order reversed, k order flipped: sets are compared)."""
    out = []
    for i in range(truth.shape[0]):
        p, g = 3 + i, 4 + i % 3
        experts = truth[i, p - 1 + shift:p - 1 + shift + g].flip(2)
        out.append(Rollout(prompt_ids=list(range(1, p + 1)), token_ids=list(range(10, 10 + g)), text="",
                           logprobs=[0.0] * g, finish_reason="length", routed_experts=experts))
    return out


def _counts(rollouts: list[Rollout], truth: torch.Tensor, layers: list[int], micro: int) -> torch.Tensor:
    batch = pack_rollouts([Episode([1], [], [], "", 0)], rollouts, torch.zeros(len(rollouts)), torch.zeros(len(rollouts)), [],
                          SEQ, 0)
    items = []
    for m, mb in enumerate(batch.microbatches(micro)):  # recorded: [s, b] flattened, per layer
        rows = truth[m * micro:(m + 1) * micro, :SEQ]
        items.append(Routed(mb, [rows[:, :, l].transpose(0, 1).reshape(-1, K).long() for l in layers]))
    return rollout_routing_counts(items, rollouts, layers, sequence_parallel=False)


def test_experts_land_at_the_positions_predicting_the_generated_tokens():
    truth = _routing(2)
    rollouts = _rollouts(truth, 0)
    rollouts[1].routed_experts = None  # an engine that reported none: nothing compared
    experts, known = rollout_experts(rollouts, SEQ, [2, 0], torch.device("cpu"))
    assert experts.shape == (2, SEQ, 2, K) and experts.dtype == torch.int32
    assert known[0].nonzero().flatten().tolist() == [2, 3, 4, 5] and not known[1].any()
    assert torch.equal(experts[0, 2:6, 0], truth[0, 2:6, 2].flip(1)) and torch.equal(experts[0, 2:6, 1],
                                                                                      truth[0, 2:6, 0].flip(1))
    assert (experts[0, :2] == -1).all() and (experts[0, 6:] == -1).all()


def test_mismatch_is_zero_aligned_and_catches_an_off_by_one():
    truth = _routing(4)
    layers = [1, 2]  # a pipeline stage holding layers 1 and 2 of 3
    aligned = _counts(_rollouts(truth, 0), truth, layers, micro=2)
    generated = sum(4 + i % 3 for i in range(4))
    assert aligned.tolist() == [0.0, generated * len(layers)]
    shifted = _counts(_rollouts(truth, 1), truth, layers, micro=2)
    assert shifted[1] == aligned[1] and shifted[0] / shifted[1] > 0.7


def test_only_sglang_runs_with_routing_replay_ask_for_experts():
    base = {"model": {"card": "tiny_qwen3_moe"}, "rl": {"routing_replay": True}, "rollout": {"engine": "sglang"}}
    assert routed_experts(build_config(base)) == (2, 2)
    off = {**base, "rollout": {"engine": "sglang", "sglang": {"routed_experts": False}}}
    assert routed_experts(build_config(off)) is None
    assert routed_experts(build_config({**base, "rollout": {"engine": "megatron"}})) is None
    assert routed_experts(build_config({**base, "rl": {"routing_replay": False}})) is None



def _train_then_perturb_routers(rank: int, world_size: int, overrides: list[str]) -> list[dict]:
    """Train 2 steps; after step 0's weight push (version 1), the trainer's routers (not the server's) get noise."""
    from megatron.core.transformer.moe.router import TopKRouter

    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    trainer = Trainer(build_config({}, overrides))
    try:
        push = trainer.placement.push_weights

        def push_then_perturb(version):
            push(version)
            if version != 1:  # the pushes of the start (if any) and after step 1 stay exact
                return
            with torch.no_grad():
                for router in (m for m in trainer.model.modules() if isinstance(m, TopKRouter)):
                    router.weight.add_(torch.randn_like(router.weight) * router.weight.std())

        trainer.placement.push_weights = push_then_perturb
        assert trainer.run() == 0
    finally:
        trainer.close()
        destroy_distributed()
    return logged_metrics(trainer)


@sglang_test
def test_sglang_rollouts_route_as_the_trainer_only_at_synced_weights(tmp_path):
    """Two RL steps of tiny_qwen3_moe with routing replay through an SGLang server the trainer starts from its own
    weights: at step 0 the server routes the generated tokens as the recording pass does; at step 1 the trainer's
    routers differ from the pushed ones (noise after the push) and so do clearly many decisions."""
    from rntp_megatron.runtime.spawn import free_port, run_ranks

    overrides = _overrides(tmp_path / "run", ["model.card=tiny_qwen3_moe", "rl.routing_replay=true",
                                              "schedule.train_steps=2", f"rollout.sglang.port={free_port()}"])
    [metrics] = run_ranks(_train_then_perturb_routers, 1, (overrides,), timeout_s=600)
    synced, perturbed = (m["moe/rollout_routing_mismatch"] for m in metrics)
    print("moe/rollout_routing_mismatch", synced, perturbed)
    assert synced < 0.01 and perturbed > 0.2, (synced, perturbed)
