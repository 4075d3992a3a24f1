"""Probe: which warm-up documents let the demo model learn associative recall (the lookup a thought needs) fast?

    OMP_NUM_THREADS=1 .venv/bin/python tools/probe_recall.py --mode repeat --pairs 6 --steps 1000

Documents `*Kq;Qm;X7;...;|Qm;X7;Kq;...`: bindings, then the same bindings recited in shuffled order, so every
recited value is a lookup of its key. `--mode` mixes in half of the documents as: nothing else (`plain`), the
bindings recited in order (`inorder`), or a random word repeated (`repeat`, the corpus's `@` documents). Prints
one JSON line per --eval-every (50) steps with `recall`: greedy accuracy of the recited values on 64 fixed
shuffled documents.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time

import torch
from bench_io import parse_args, write_json

from rntp_megatron.config import build_config
from rntp_megatron.model.provider import build_model
from rntp_megatron.runtime import init_distributed

LETTERS = string.ascii_lowercase


def recall_document(rng: random.Random, pairs: int, in_order: bool) -> str:
    """`*` bindings `|` the bindings recited (shuffled unless `in_order`); 6 * pairs + 2 characters."""
    keys = rng.sample(LETTERS, pairs)
    values = [rng.choice(LETTERS + string.digits) for _ in keys]
    order = list(range(pairs))
    if not in_order:
        rng.shuffle(order)
    bindings = "".join(k.upper() + v + ";" for k, v in zip(keys, values))
    return "*" + bindings + "|" + "".join(keys[i].upper() + values[i] + ";" for i in order)


def repeat_document(rng: random.Random, length: int) -> str:
    """`@` and a random word of 3-12 letters repeated to `length` characters."""
    word = "".join(rng.choice(LETTERS + LETTERS.upper()) for _ in range(rng.randint(3, 12)))
    return "@" + (word * length)[:length - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("plain", "inorder", "repeat"), default="repeat")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=50)
    args = parse_args(p, smoke={"steps": 4, "eval_every": 2, "batch": 4})
    torch.set_num_threads(1)
    cfg = build_config({"model": {"card": "demo"}})
    init_distributed(cfg.parallel, seed=0)
    model = build_model(cfg.model, cfg.parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng, eval_rng = random.Random(0), random.Random(1)
    length = 6 * args.pairs + 2

    def document() -> str:
        if args.mode != "plain" and rng.random() < 0.5:
            return recall_document(rng, args.pairs, True) if args.mode == "inorder" else repeat_document(rng, length)
        return recall_document(rng, args.pairs, False)

    def forward(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([list(t.encode()) for t in texts])
        return x, model(x[:, :-1], torch.arange(x.shape[1] - 1).expand(len(texts), -1), None)

    held_out = [recall_document(eval_rng, args.pairs, False) for _ in range(64)]
    values_at = [3 * args.pairs + 3 + 3 * i for i in range(args.pairs)]  # recited values: after `*`, bindings, `|`, key
    start, rows = time.time(), []
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 100)
        x, logits = forward([document() for _ in range(args.batch)])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0:
            with torch.no_grad():
                x, logits = forward(held_out)
            predicted = logits.argmax(-1)[:, [i - 1 for i in values_at]]
            recall = (predicted == x[:, values_at]).float().mean().item()
            print(json.dumps({"mode": args.mode, "step": step, "s": round(time.time() - start),
                              "loss": round(loss.item(), 3), "recall": round(recall, 3)}), flush=True)
            rows.append({"name": f"step {step}", "step": step, "loss": loss.item(), "recall": recall})
    write_json(args.json, "probe_recall", rows, args)


if __name__ == "__main__":
    main()
