"""Probe: can a tiny Megatron GPTModel learn the synthetic RNTP task on one CPU core, and does RL teach it to think?

    OMP_NUM_THREADS=1 nice .venv/bin/python tools/probe_synthetic.py --out /tmp/probe_a --pretrain-steps 3000 \
        --rl-steps 200 > /tmp/probe_a.log 2>&1

Phase 1 pretrains on the synthetic mix (data/synthetic.py) with the plain next-token loss. Phase 2 runs GRPO
with the exact-match reward on plain (`#`) prompts at C and I sites, sampling with the in-process
MegatronEngine; its loss here is a bare policy gradient (the rl/ package has the real one). Evaluations on
held-out terse documents print one JSON line each (see `evaluate`); the pretrained weights are saved so RL
can be rerun with --init.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
from bench_io import parse_args, write_json

from rntp_megatron.config import build_config
from rntp_megatron.data.synthetic import (ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN,
                                          SyntheticSpec, synthetic_documents)
from rntp_megatron.data.tokenizer import ByteTokenizer
from rntp_megatron.model.provider import build_model
from rntp_megatron.rollout.engine import SamplingParams
from rntp_megatron.rollout.megatron_engine import MegatronEngine
from rntp_megatron.runtime import init_distributed

TOK = ByteTokenizer()
DIGIT_IDS = [TOK.encode(str(d))[0] for d in range(10)]
TEXT_IDS = list(range(256))  # no-thought answers are read from byte tokens only (tags masked out)
STOP = TOK.encode(ANSWER_CLOSE)


def parse_answer(text: str) -> str:
    """The answer between <answer> and </answer> of a completion ('' if malformed)."""
    if THINK_CLOSE not in text or ANSWER_OPEN not in text:
        return ""
    return text.split(ANSWER_OPEN, 1)[1].split(ANSWER_CLOSE, 1)[0]


def pad_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens[b, s] and a mask[b, s] of real tokens."""
    width = max(map(len, rows))
    tokens = torch.full((len(rows), width), TOK.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return tokens, mask


def positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1]).expand_as(tokens)


@torch.no_grad()
def next_token_argmax(model, prompts: list[list[int]], allowed: list[int]) -> list[int]:
    """argmax over `allowed` ids of the next-token logits after each prompt."""
    model.eval()
    tokens, mask = pad_batch(prompts)
    logits = model(tokens, positions(tokens), None)
    last = mask.sum(1).long() - 1
    picked = logits[torch.arange(len(prompts)), last][:, allowed]
    model.train()
    return [allowed[i] for i in picked.argmax(-1).tolist()]


def heldout_sites(seed: int, spec: SyntheticSpec, count: int, cls: str) -> list[tuple[dict, dict]]:
    """(document, site) pairs of class `cls` from held-out terse documents."""
    out = []
    for doc in synthetic_documents(seed, "heldout", spec, kinds={"terse": 1}):
        out += [(doc, s) for s in doc["sites"] if s["cls"] == cls]
        if len(out) >= count:
            return out[:count]
    return out


def thought_prompt(doc: dict, site: dict, marker: str = "#") -> list[int]:
    return TOK.encode(marker + doc["text"][1:site["pos"]] + THINK_OPEN)


@torch.no_grad()
def lookup_accuracy(model, c_sites) -> dict:
    """Teacher-forced accuracy of the lookups inside textbook thoughts: letter values and the final digit."""
    model.eval()
    rows, spans = [], []
    for d, s in c_sites:
        head = TOK.encode("%" + d["text"][1:s["pos"]] + THINK_OPEN)
        rows.append(head + TOK.encode(s["thought"]))
        spans.append((len(head), len(s["thought"])))
    tokens, _ = pad_batch(rows)
    pred = model(tokens, positions(tokens), None).argmax(-1)
    letter, digit = [], []
    for i, (start, n) in enumerate(spans):
        thought = c_sites[i][1]["thought"]
        for j in range(1, n):  # lookups: the value after each key (upper case) of the thought
            if thought[j - 1].isupper():
                ok = int(pred[i, start + j - 1]) == rows[i][start + j]
                (digit if j == n - 1 else letter).append(ok)
    model.train()
    return {"hop_letter": sum(letter) / len(letter), "hop_digit": sum(digit) / len(digit)}


def evaluate(model, engine, c_sites, i_sites) -> dict:
    """Held-out accuracies: no-thought (C, I), after a greedy thought with the textbook and the plain marker,
    after a forced filler thought, sampled plain thoughts at T=0.7, and the thought-swap control."""
    acc = lambda pred, sites: sum(p == s["answer"] for p, s in zip(pred, sites)) / max(1, len(sites))
    cs = [s for _, s in c_sites]
    out = lookup_accuracy(model, c_sites)
    for name, sites in (("C", c_sites), ("I", i_sites)):
        pred = next_token_argmax(model, [TOK.encode(d["text"][:s["pos"]]) for d, s in sites], TEXT_IDS)
        out[f"nothought_{name}"] = acc([TOK.decode([p]) for p in pred], [s for _, s in sites])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=STOP)
    for marker, name in (("%", "textbook"), ("#", "plain")):
        rolls = engine.generate([thought_prompt(d, s, marker) for d, s in c_sites], greedy)
        out[f"{name}_C"] = acc([parse_answer(r.text) for r in rolls], cs)
        out[f"{name}_exact_thought"] = sum(r.text.startswith(s["thought"] + THINK_CLOSE)
                                           for r, s in zip(rolls, cs)) / len(cs)
        if name == "plain":
            plain_thoughts = [r.text.split(THINK_CLOSE)[0] for r in rolls]
            out["plain_working_rate"] = sum(t[:1].isalpha() for t in plain_thoughts) / len(cs)
            out["plain_thought_len"] = sum(len(t) for t in plain_thoughts) / len(cs)
    filler = [TOK.encode(d["text"][:s["pos"]] + THINK_OPEN + "..." + THINK_CLOSE + ANSWER_OPEN) for d, s in c_sites]
    out["filler_C"] = acc([TOK.decode([p]) for p in next_token_argmax(model, filler, DIGIT_IDS)], cs)
    # thought swap: site j answers after site (j+1)'s plain thought
    swapped = [TOK.encode(d["text"][:s["pos"]] + THINK_OPEN + plain_thoughts[(j + 1) % len(cs)] + THINK_CLOSE
                          + ANSWER_OPEN) for j, (d, s) in enumerate(c_sites)]
    out["swap_C"] = acc([TOK.decode([p]) for p in next_token_argmax(model, swapped, DIGIT_IDS)], cs)
    rolls = engine.generate([thought_prompt(d, s) for d, s in c_sites[:32]],
                            SamplingParams(temperature=0.7, n=4, max_new_tokens=24, stop_token_ids=STOP, seed=0))
    out["sampled_plain_C"] = sum(parse_answer(r.text) == c_sites[r.prompt_index][1]["answer"]
                                 for r in rolls) / len(rolls)
    return out


def pretrain(model, args, spec, evaluate_now, log) -> None:
    """Next-token loss on the synthetic mix until the time budget runs out."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    docs = synthetic_documents(args.seed, "train", spec)
    start, step = time.monotonic(), 0
    while step < args.pretrain_steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        tokens, mask = pad_batch([TOK.encode(next(docs)["text"]) for _ in range(args.batch)])
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        loss = model(inputs, positions(inputs), None, labels=labels)
        loss = (loss * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0 or step == args.pretrain_steps:
            log({"phase": "pretrain", "step": step, "s": round(time.monotonic() - start),
                 "loss": round(loss.item(), 4),
                 **evaluate_now()})


def rl(model, engine, args, spec, evaluate_now, log) -> None:
    """GRPO with the exact reward on plain prompts at C and I sites; loss -A * log p over generated tokens."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.rl_lr, betas=(0.9, 0.98), weight_decay=0.0)
    docs = synthetic_documents(args.seed + 1, "train", spec, kinds={"terse": 1})
    rng = random.Random(args.seed)
    start, step = time.monotonic(), 0
    sampling = SamplingParams(temperature=args.rl_temperature, n=args.group, max_new_tokens=24, stop_token_ids=STOP)
    while step < args.rl_steps:
        sites = []
        while len(sites) < args.rl_prompts:
            doc = next(docs)
            c = [s for s in doc["sites"] if s["cls"] == "C"]
            i = [s for s in doc["sites"] if s["cls"] == "I"]
            sites.append((doc, rng.choice(i) if rng.random() < args.rl_i_fraction else rng.choice(c)))
        rolls = engine.generate([thought_prompt(d, s) for d, s in sites], sampling)
        rewards = torch.tensor([float(parse_answer(r.text) == sites[r.prompt_index][1]["answer"]) for r in rolls])
        grouped = rewards.view(len(sites), args.group)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        keep = [k for k in range(len(rolls)) if adv[k] != 0]
        if keep:
            tokens, mask = pad_batch([rolls[k].prompt_ids + rolls[k].token_ids for k in keep])
            gen_mask = mask.clone()
            for row, k in enumerate(keep):
                gen_mask[row, :len(rolls[k].prompt_ids)] = 0
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            logp = -model(inputs, positions(inputs), None, labels=labels)
            weights = gen_mask[:, 1:] * adv[keep][:, None]
            loss = -(logp * weights).sum() / gen_mask[:, 1:].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        step += 1
        c_rows = [k for k in range(len(rolls)) if sites[rolls[k].prompt_index][1]["cls"] == "C"]
        if step % args.rl_eval_every == 0:
            log({"phase": "rl", "step": step, "s": round(time.monotonic() - start),
                 "reward_C": round(rewards[c_rows].mean().item(), 3) if c_rows else None,
                 "zero_var_groups": round((grouped.std(1) == 0).float().mean().item(), 3),
                 "thought_len": round(sum(len(r.text.split(THINK_CLOSE)[0]) for r in rolls) / len(rolls), 2),
                 **evaluate_now()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--init", default=None, help="start from these saved weights")
    p.add_argument("--rl-steps", type=int, default=200)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--rl-temperature", type=float, default=0.7)
    p.add_argument("--rl-prompts", type=int, default=16)
    p.add_argument("--rl-i-fraction", type=float, default=0.25)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--rl-eval-every", type=int, default=25)
    p.add_argument("--eval-sites", type=int, default=96)
    p.add_argument("--spec", default="{}", help="JSON overrides of SyntheticSpec fields")
    args = parse_args(p, smoke={"layers": 1, "hidden": 64, "heads": 2, "batch": 4, "pretrain_steps": 2,
                                "eval_every": 2, "rl_steps": 1, "rl_eval_every": 1, "rl_prompts": 2, "group": 2,
                                "eval_sites": 8})
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    spec = SyntheticSpec(**json.loads(args.spec))
    cfg = build_config({"model": {"card": "tiny", "num_layers": args.layers, "hidden_size": args.hidden,
                                  "ffn_hidden_size": args.hidden * 8 // 3 // 16 * 16,
                                  "num_attention_heads": args.heads, "num_query_groups": args.heads,
                                  "vocab_size": TOK.vocab_size, "max_position_embeddings": 256}})
    init_distributed(cfg.parallel, seed=args.seed)
    model = build_model(cfg.model, cfg.parallel)
    if args.init:
        model.load_state_dict(torch.load(args.init, weights_only=True), strict=False)
    engine = MegatronEngine(model, TOK)
    c_sites = heldout_sites(args.seed, spec, args.eval_sites, "C")
    i_sites = heldout_sites(args.seed, spec, args.eval_sites, "I")
    logf = open(os.path.join(args.out, "log.jsonl"), "a")
    rows = []

    def log(record: dict) -> None:
        """Print and append an evaluation record; its numbers become a --json row."""
        if "phase" in record:
            rows.append({"name": f"{record['phase']} step {record.get('step', '-')}",
                         **{k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "s"}})
        record = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}
        print(json.dumps(record), flush=True)
        logf.write(json.dumps(record) + "\n")
        logf.flush()

    log({"args": vars(args), "params": sum(p.numel() for p in model.parameters())})
    evaluate_now = lambda: evaluate(model, engine, c_sites, i_sites)
    if args.pretrain_steps > 0:
        pretrain(model, args, spec, evaluate_now, log)
        torch.save(model.state_dict(), os.path.join(args.out, "pretrained.pt"))
    if args.rl_steps > 0:
        log({"phase": "rl-start", **evaluate_now()})
        rl(model, engine, args, spec, evaluate_now, log)
        log({"phase": "rl-end", **evaluate_now()})
    write_json(args.json, "probe_synthetic", rows, args)


if __name__ == "__main__":
    main()
