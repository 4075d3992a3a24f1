"""`rntp eval --config run.yaml --checkpoint DIR`: held-out next-token accuracy without and with a thought.

Synthetic sources are evaluated on their held-out split per token class, with the thought-swap test; other
text is bucketed by the model's own next-token entropy at the site (RPT protocol).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run's YAML config (model, data, rollout sections)")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoints folder (its `latest` is taken), its `latest` file, or one iter_* folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sites", type=int, default=128, help="held-out sites to evaluate")
    parser.add_argument("--out", default=None, help="JSON file for the table (default: <checkpoint>/eval.json); "
                        "each site's values go to the same name with .sites.json")
    parser.add_argument("--buckets-from", default=None, metavar="JSON",
                        help="real text: the sites' entropies under one fixed model, read when the file exists (its "
                             "sites must be these), else computed by this checkpoint and written: every checkpoint "
                             "is then bucketed by the same model's entropy")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch.distributed as dist

    from rntp_megatron.checkpoint import resolve_checkpoint
    from rntp_megatron.config import load_config, template_token_bound
    from rntp_megatron.data.proxy import ProxyScorer
    from rntp_megatron.data.stream import EpisodeStream
    from rntp_megatron.evaluate import evaluate, format_table, heldout_synthetic, save_table
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer
    from rntp_megatron.wandb_run import log_results

    path = resolve_checkpoint(args.checkpoint, "--checkpoint")
    # Rows long enough for the longest prompt and its thought: a next-token run's seq_length need not be (eval
    # trains nothing, so the length changes nothing else).
    shape = load_config(args.config, [*args.overrides, "rl.objective=ntp"])
    longest = (shape.data.context_len - shape.data.answer_horizon + template_token_bound(shape.data)
               + shape.rollout.max_new_tokens)
    cfg = load_config(args.config, [*args.overrides, f"checkpoint.load={path}", "checkpoint.dir=",
                                    "rl.objective=rntp", "logging.dir=" + str(path / "eval_run"),
                                    f"schedule.seq_length={max(shape.schedule.seq_length, longest - 1)}"])
    trainer = Trainer(cfg)
    data = cfg.data
    synthetic = all(s.kind == "synthetic" for s in data.sources)
    if synthetic:
        data = heldout_synthetic(data)
    episodes = EpisodeStream(data, trainer.tokenizer, scorer=trainer.side.scorer).take(args.sites)
    entropies = None
    sites = [[e.doc_id, e.site] for e in episodes]
    fixed = Path(args.buckets_from) if getattr(args, "buckets_from", None) else None
    if not synthetic and fixed is not None and fixed.exists():
        saved = json.loads(fixed.read_text())
        if saved["sites"] != sites:
            raise ValueError(f"--buckets-from {fixed}: its {len(saved['sites'])} sites are not the {len(sites)} "
                             f"held-out sites of this evaluation (first: {saved['sites'][:2]} vs {sites[:2]})")
        entropies = saved["entropy"]
    elif not synthetic:
        scorer = ProxyScorer(trainer.ddp, trainer.tokenizer.vocab_size, data.entropy_top_k, trainer.tokenizer.pad_id)
        scores = scorer.score([e.context_ids + e.continuation_ids for e in episodes])
        entropies = [float(ent[len(e.context_ids)]) for e, (ent, _) in zip(episodes, scores)]
        if fixed is not None and dist.get_rank() == 0:
            fixed.write_text(json.dumps({"scorer": str(path), "sites": sites, "entropy": entropies}))
    per_site: dict[str, list[float]] = {}
    table = evaluate(trainer.engine, [trainer.ddp], trainer.tokenizer, data, episodes,
                     cfg.rollout.max_new_tokens, entropies, per_site=per_site)
    if dist.get_rank() == 0:
        print(format_table(table, f"held-out evaluation of {path}"))
        out = Path(args.out or path / "eval.json")
        save_table(table, str(out))
        out.with_suffix(".sites.json").write_text(json.dumps({"sites": sites, "entropy": entropies, **per_site}))
        log_results(cfg.logging, cfg.logging.dir, {"eval": table}, {})
    destroy_distributed()
    return 0
