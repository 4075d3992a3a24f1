"""Benchmark: how often the in-process engine's routing (prefill, then KV-cache decode) differs from the
trainer's full forward over the same rows, for tiny_qwen3_moe with random weights, in float32 and bfloat16.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_routing_mismatch.py --prompts 4 --n 4 --length 48 --new 32

Every router records its top-k (Megatron-Core's RouterReplay in RECORD mode, the objects rl.routing_replay
attaches) during the engine's prefill and each decode step, and again during one forward over [prompt +
generated] rows, as the recording pass of rl.routing_replay runs it. Printed per dtype: the fraction of
(token, layer) decisions whose expert sets differ, over the prompt tokens (one prefill of [P, length] vs rows of
[P * n, length + new - 1]) and over the generated tokens (one decode step each), and the mean |log-prob
difference| of the sampled tokens (logp_abs_diff_rollout). rl.routing_replay replays the recording pass, so the
training forward routes as that pass did; the rollout's routing stays what it was.
"""

from __future__ import annotations

import argparse

import torch
from bench_io import parse_args, write_json
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from rntp_megatron.config import build_config
from rntp_megatron.data.tokenizer import ByteTokenizer
from rntp_megatron.model.provider import build_model
from rntp_megatron.rl.routing_replay import RoutingReplay, differing_decisions
from rntp_megatron.rollout.engine import SamplingParams
from rntp_megatron.rollout.megatron_engine import MegatronEngine
from rntp_megatron.runtime import destroy_distributed, init_distributed


def measure(dtype: str, prompts: int, n: int, length: int, new: int, seed: int) -> dict[str, float]:
    """Rollouts of `prompts` random byte prompts (n samples each, exactly `new` tokens) and one trainer forward."""
    cfg = build_config({"model": {"card": "tiny_qwen3_moe", "vocab_size": 262, "init_method_std": 0.2,
                                  "params_dtype": dtype}})
    init_distributed(cfg.parallel, seed=seed)
    try:
        model = build_model(cfg.model, cfg.parallel)
        replays = RoutingReplay(model).replays
        tok = ByteTokenizer()
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(32, 127, (prompts, length), generator=g).tolist()
        captured: list[list[torch.Tensor]] = []  # per forward, per layer: top-k[tokens, k] in [s, b] order
        hook = model.register_forward_hook(lambda *_: captured.append([r.get_recorded_indices() for r in replays]))
        for r in replays:
            r.set_router_replay_action(RouterReplayAction.RECORD)
        try:
            rollouts = MegatronEngine(model, tok, max_batch_size=prompts * n).generate(
                ids, SamplingParams(temperature=1.0, n=n, max_new_tokens=new, seed=seed))
            assert all(len(r.token_ids) == new for r in rollouts), "a row stopped early: its routing would be short"
            rows = torch.tensor([r.prompt_ids + r.token_ids[:-1] for r in rollouts])  # the trainer's inputs
            captured_engine, captured[:] = list(captured), []
            with torch.no_grad():
                logits = model(rows, torch.arange(rows.shape[1]).expand_as(rows), None)
        finally:
            hook.remove()
            for r in replays:
                r.clear_router_replay_action()
        (trainer,) = captured
        prefill, decode = captured_engine[0], captured_engine[1:]
        full = [t.view(rows.shape[1], rows.shape[0], -1) for t in trainer]  # per layer [s, rows, k]
        engine_prompt = [t.view(length, prompts, -1).repeat_interleave(n, dim=1) for t in prefill]
        engine_gen = [torch.stack([step[layer] for step in decode]) for layer in range(len(replays))]
        flat = lambda ts: [t.reshape(-1, t.shape[-1]) for t in ts]  # noqa: E731
        prompt = differing_decisions(flat(f[:length] for f in full), flat(engine_prompt),
                                     torch.ones(length * rows.shape[0], dtype=torch.bool))
        generated = differing_decisions(flat(f[length:] for f in full), flat(engine_gen),
                                        torch.ones((new - 1) * rows.shape[0], dtype=torch.bool))
        logp = torch.log_softmax(logits.float()[..., :tok.vocab_size], -1)
        sampled = torch.tensor([r.token_ids for r in rollouts])
        trainer_lp = logp[:, length - 1:].gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        engine_lp = torch.tensor([r.logprobs for r in rollouts])
        return {"prompt": (prompt[0] / prompt[1]).item(), "generated": (generated[0] / generated[1]).item(),
                "logp_abs_diff": (trainer_lp - engine_lp).abs().mean().item()}
    finally:
        destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--length", type=int, default=48)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3)
    args = parse_args(p, smoke={"prompts": 2, "n": 2, "length": 8, "new": 4, "seeds": 1})
    print(f"{'dtype':10s} {'seed':>4s} {'prompt mismatch':>16s} {'generated mismatch':>19s} {'|dlogp| sampled':>16s}")
    rows = []
    for dtype in ("float32", "bfloat16"):
        for seed in range(args.seeds):
            m = measure(dtype, args.prompts, args.n, args.length, args.new, seed)
            print(f"{dtype:10s} {seed:4d} {m['prompt']:16.4f} {m['generated']:19.4f} {m['logp_abs_diff']:16.2e}",
                  flush=True)
            rows.append({"name": f"{dtype} seed {seed}", "dtype": dtype, "seed": seed, **m})
    write_json(args.json, "bench_routing_mismatch", rows, args)


if __name__ == "__main__":
    main()
