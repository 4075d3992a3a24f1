"""`rntp demo`: the embedded default job, from nothing, on a CPU.

1. pretrain a small Megatron GPTModel on the synthetic RNTP corpus (recipes/configs/demo_pretrain.yaml),
2. evaluate on held-out documents: per token class, accuracy without a thought, after a greedy thought, and
   after another episode's thought (the swap test),
3. run RNTP RL at computable and impossible sites with the in-process engine (recipes/configs/demo_rl.yaml),
4. evaluate again, print the before/after table, and write the reward and accuracy curves as a PNG.

Pass `--set phase.key=value` overrides as `--pretrain-set` / `--rl-set`, e.g. shorter runs for a smoke test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where checkpoints, metrics and the plot go")
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rl-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--eval-sites", type=int, default=96, help="held-out sites per evaluation")


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from rntp_megatron.checkpoint import latest_checkpoint
    from rntp_megatron.config import load_config
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.evaluate import evaluate, format_table, heldout_synthetic, save_table
    from rntp_megatron.metrics import plot_curves, read_metrics
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer
    from rntp_megatron.wandb_run import log_results

    run_dir = Path(args.run_dir)
    pre_cfg = load_config(RECIPES / "demo_pretrain.yaml",
                          [f"logging.dir={run_dir / 'pretrain'}", *args.pretrain_set])
    pretrain = Trainer(pre_cfg)
    if pretrain.run():
        return 1
    rl_cfg = load_config(RECIPES / "demo_rl.yaml", [
        f"logging.dir={run_dir / 'rl'}", f"checkpoint.load={latest_checkpoint(pretrain.ckpt_dir)}", *args.rl_set])
    rl = Trainer(rl_cfg)
    episodes = EpisodeStream(heldout_synthetic(rl_cfg.data), rl.tokenizer).take(args.eval_sites)
    max_new = rl_cfg.rollout.max_new_tokens
    tables = {"before RL": evaluate(rl.engine, [rl.ddp], rl.tokenizer, rl_cfg.data, episodes, max_new)}
    if rl.run():
        return 1
    tables["after RL"] = evaluate(rl.engine, [rl.ddp], rl.tokenizer, rl_cfg.data, episodes, max_new)
    if dist.get_rank() == 0:
        for title, table in tables.items():
            print("\n" + format_table(table, f"held-out synthetic sites, {title}"))
            save_table(table, str(run_dir / f"eval_{title.replace(' ', '_')}.json"))
        records = read_metrics(run_dir / "rl" / "metrics.jsonl")
        png = plot_curves(records, ["reward", "reward_base_C", "reward_base_I", "thought_len", "entropy"],
                          run_dir / "rl_curves.png", "RNTP RL on the synthetic corpus")
        log_results(rl_cfg.logging, rl_cfg.logging.dir, tables, {"rl_curves": png}, step=rl.step)
        summary = {k: {"no_thought": v["C"]["no_thought"], "thought": v["C"]["thought"], "swap": v["C"]["swap"]}
                   for k, v in tables.items() if "C" in v}
        print(f"\ncomputable (C) sites: {json.dumps(summary)}\ncurves: {png}")
    destroy_distributed()
    return 0
