"""Benchmark: can an online proxy choose entropy sites as fast as RL steps consume them? Side by side, one process.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_site_supply.py [--steps 4] [--episodes 64]

1. Consumption: real `rntp train` steps (the Trainer: in-process Megatron engine generating G thoughts per site,
   likelihood-free `prefix` reward, GRPO loss, AdamW) of the demo card on pydoc text with site_selection=entropy
   scored online by a proxy of ~1/4 of the policy's parameters; episodes per second of step time.
2. Supply: the same EpisodeStream (documents -> chunks -> proxy forward through megatron's schedule -> sites),
   alone, with that proxy and with a proxy as large as the policy (the default when data.proxy is unset: the
   reference weights); episodes per second.
The target: supply >= 10x consumption with the 1/4 proxy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import parse_args, write_json  # noqa: E402

DATA = {"sources": [{"kind": "pydoc"}], "context_len": 256, "min_context": 16, "answer_horizon": 4,
        "sites_per_chunk": 4, "site_selection": "entropy", "entropy_threshold": 1.0}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def supply(cfg, tokenizer, model, n: int) -> float:
    """Episodes/s of a fresh EpisodeStream whose sites are scored by `model` (first document warms up)."""
    from rntp_megatron.data.proxy import ProxyScorer
    from rntp_megatron.data.stream import EpisodeStream

    scorer = ProxyScorer(model, tokenizer.vocab_size, cfg.data.entropy_top_k, tokenizer.pad_id,
                         cfg.schedule.micro_batch_size)
    stream = EpisodeStream(cfg.data, tokenizer, scorer=scorer)
    stream.take(1)
    start = time.perf_counter()
    stream.take(n)
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="RL steps (the first one warms up)")
    parser.add_argument("--episodes", type=int, default=64, help="episodes drawn per supply measurement")
    parser.add_argument("--rollouts", type=int, default=64, help="rollouts per RL step (schedule.global_batch_size)")
    parser.add_argument("--group", type=int, default=8, help="rl.group_size")
    parser.add_argument("--new-tokens", type=int, default=32, help="rollout.max_new_tokens")
    args = parse_args(parser, smoke={"steps": 2, "episodes": 32, "rollouts": 8, "group": 4, "new_tokens": 4})
    import torch

    torch.set_num_threads(1)
    from rntp_megatron.checkpoint import save_checkpoint
    from rntp_megatron.config import build_config, load_card
    from rntp_megatron.model.frozen import build_frozen, card_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / "proxy.yaml"  # the demo card at half the width: ~1/4 of its parameters
        card.write_text(yaml.safe_dump({**load_card("demo"), "hidden_size": 64, "ffn_hidden_size": 176}))
        cfg = build_config({
            "model": {"card": "demo"},
            "data": {**DATA, "proxy": {"card": str(card), "load": f"{tmp}/proxy/iter_0000000"}},
            "rollout": {"max_new_tokens": args.new_tokens, "temperature": 1.0}, "reward": {"name": "prefix"},
            "rl": {"group_size": args.group},
            "schedule": {"train_steps": args.steps, "global_batch_size": args.rollouts,
                         "micro_batch_size": min(16, args.rollouts),
                         "seq_length": 320, "lr": 1e-4},
            "logging": {"dir": f"{tmp}/run", "progress": False, "plot": False}})
        init_distributed(cfg.parallel, cfg.seed)
        try:
            proxy_cfg = card_config(str(card), "proxy")
            save_checkpoint(f"{tmp}/proxy", 0, [build_model(proxy_cfg, cfg.parallel)], None, {"step": 0}, {})
            trainer = Trainer(cfg)
            trainer.run()
            records = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")][1:]
            step_s = sum(r["step_time_s"] for r in records) / len(records)
            consume = cfg.schedule.global_batch_size / cfg.rl.group_size / step_s
            small = build_frozen(proxy_cfg, cfg.parallel, f"{tmp}/proxy/iter_0000000", "proxy")
            rows = [{"name": "policy (demo card)", "params": params(trainer.model), "step_s": step_s,
                     "rollouts": cfg.schedule.global_batch_size, "episodes_per_s": consume}]
            for name, model in (("proxy 1/4", small), ("proxy = policy size", trainer.model)):
                rate = supply(cfg, trainer.tokenizer, model, args.episodes)
                rows.append({"name": name, "params": params(model), "episodes_per_s": rate,
                             "x_consumption": rate / consume})
        finally:
            destroy_distributed()
    print("| what | size | rate | vs consumption |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params']:,} params | {r['episodes_per_s']:.2f} episodes/s | "
              f"{r.get('x_consumption', 1.0):.0f}x |")
    write_json(args.json, "bench_site_supply", rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
