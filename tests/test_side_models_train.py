"""The method's side models in a real training run (world 1, the Trainer the CLI runs): entropy site selection
scored by the frozen reference, the KL term to it, and info_gain against the EMA baseline, for 2 RL steps. A
second run takes the `run` reward's surprisal weights from data.proxy. Checked against independent computations:
every drawn site's float64 top-k entropy under the reference is above the threshold (while many candidate
positions are not), the EMA equals d^k p_0 + ... in float64 from the policy's weights after each step, and the KL
is ~0 while the policy still equals the reference and grows after."""

from __future__ import annotations

import json

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DECAY, THRESHOLD, TOP_K = 0.5, 2.2, 16


def _float64_entropy(model, ids: list[int], vocab: int) -> torch.Tensor:
    """Top-k entropy of the prediction of every position 1..n-1 of ids, in float64, from a plain forward."""
    from rntp_megatron.data.sites import topk_entropy

    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, :-1, :vocab].double()
    return topk_entropy(logits, TOP_K)


def _train(rank: int, world: int, tmp: str) -> dict:
    from rntp_megatron.checkpoint import save_checkpoint
    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.trainer import Trainer

    overrides = {
        "model": {"card": "tiny", "vocab_size": 262, "init_method_std": 0.3},
        "data": {"sources": [{"kind": "pydoc"}], "context_len": 48, "min_context": 8, "answer_horizon": 2,
                 "site_selection": "entropy", "entropy_threshold": THRESHOLD, "entropy_top_k": TOP_K},
        "rollout": {"max_new_tokens": 8, "temperature": 1.0},
        "reward": {"name": "info_gain", "baseline": "ema", "ema_decay": DECAY, "info_gain_interval": 1},
        "rl": {"group_size": 4, "kl_coef": 0.1},
        "schedule": {"train_steps": 2, "global_batch_size": 8, "micro_batch_size": 4, "seq_length": 72,
                     "lr": 1e-2},
        "checkpoint": {"dir": f"{tmp}/ckpt", "save_interval": 1, "load": f"{tmp}/init/iter_0000000"},
        "logging": {"dir": f"{tmp}/run", "progress": False, "plot": False},
    }
    cfg = build_config(overrides)
    init_distributed(cfg.parallel, cfg.seed)
    try:
        init = build_model(cfg.model, cfg.parallel)
        save_checkpoint(f"{tmp}/init", 0, [init], None, {"step": 0}, {})
        p0 = {n: p.detach().double().clone() for n, p in init.named_parameters()}
        trainer = Trainer(cfg)
        drawn, after = [], []
        take, after_step = trainer.stream.take, trainer.side.after_step
        trainer.stream.take = lambda n: drawn.extend(take(n)) or drawn[-n:]
        trainer.side.after_step = lambda policy: (
            after.append({n: p.detach().double().clone() for n, p in policy.named_parameters()}),
            after_step(policy))
        assert trainer.run() == 0
        expected = p0
        for weights in after:
            expected = {n: DECAY * expected[n] + (1 - DECAY) * weights[n] for n in expected}
        ema_err = max((p.double() - expected[n]).abs().max().item()
                      for n, p in trainer.side.ema.average.named_parameters())
        moved = max((after[-1][n] - p0[n]).abs().max().item() for n in p0)
        vocab = trainer.tokenizer.vocab_size
        site_entropy = [_float64_entropy(init, ep.context_ids + ep.continuation_ids[:1], vocab)[ep.site - 1].item()
                        for ep in drawn]
        all_entropy = torch.cat([_float64_entropy(init, ep.context_ids, vocab)[cfg.data.min_context - 1:]
                                 for ep in drawn])
        records = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
        frozen = build_config({**overrides, "reward": {"name": "vrcli", "baseline": "frozen"},
                               "schedule": {**overrides["schedule"], "train_steps": 1}, "checkpoint": {
                                   "load": overrides["checkpoint"]["load"]},
                               "logging": {"dir": f"{tmp}/run_frozen", "progress": False, "plot": False}})
        frozen_trainer = Trainer(frozen)  # vrcli against the frozen reference: no EMA, one reference for all
        assert frozen_trainer.side.ema is None
        assert frozen_trainer.side.baseline_model(frozen_trainer.ddp) is frozen_trainer.side.reference
        assert frozen_trainer.side.scorer.model is frozen_trainer.side.reference and frozen_trainer.run() == 0
        return {"surprisal_err": _surprisal_run(tmp, overrides, init), "ema_err": ema_err, "moved": moved,
                "steps": len(after), "site_entropy": site_entropy, "records": records,
                "below": (all_entropy <= THRESHOLD).double().mean().item()}
    finally:
        destroy_distributed()


def _surprisal_run(tmp: str, overrides: dict, init) -> float:
    """One step of the `run` reward with surprisal weights from data.proxy (a card file and the init weights, which
    also score the sites): the largest difference between an episode's weights and float64 log-probs of its true
    continuation under the proxy after its raw context."""
    import yaml

    from rntp_megatron.config import build_config, load_card
    from rntp_megatron.trainer import Trainer

    card = f"{tmp}/proxy_card.yaml"
    with open(card, "w") as f:
        yaml.safe_dump({**load_card("tiny"), **overrides["model"]}, f)
    proxy = {"card": card, "load": f"{tmp}/init/iter_0000000"}
    cfg = build_config({**overrides, "data": {**overrides["data"], "proxy": proxy},
                        "reward": {"name": "run", "params": {"weighting": "surprisal"}}, "rl": {"group_size": 4},
                        "schedule": {**overrides["schedule"], "train_steps": 1}, "checkpoint": {},
                        "logging": {"dir": f"{tmp}/run_surprisal", "progress": False, "plot": False}})
    trainer = Trainer(cfg)
    assert trainer.side.reference is None and trainer.side.proxy is not None
    drawn = []
    take = trainer.stream.take
    trainer.stream.take = lambda n: drawn.extend(take(n)) or drawn[-n:]
    assert trainer.run() == 0 and len(drawn) == 2
    err = 0.0
    for ep in drawn:
        ids = ep.context_ids + ep.continuation_ids
        with torch.no_grad():
            logits = init(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, :, :262].double()
        logp = torch.log_softmax(logits, -1)
        want = [logp[len(ep.context_ids) - 1 + k, c].item() for k, c in enumerate(ep.continuation_ids)]
        err = max(err, max(abs(a - b) for a, b in zip(ep.meta["ref_logprobs"], want)))
    return err


def test_two_rl_steps_with_entropy_sites_kl_and_ema_baseline(tmp_path):
    (out,) = run_ranks(_train, 1, args=(str(tmp_path),))
    assert out["steps"] == 2 and out["moved"] > 1e-3
    assert out["surprisal_err"] < 1e-5, "the run reward's surprisal weights are not the proxy's log-probs"
    assert out["ema_err"] < 1e-6, f"EMA differs from d p_bar + (1 - d) p in float64 by {out['ema_err']}"
    assert len(out["site_entropy"]) == 4 and min(out["site_entropy"]) > THRESHOLD, out["site_entropy"]
    assert out["below"] > 0.25, f"only {out['below']:.2f} of positions are below the threshold: uniform would pass"
    first, second = out["records"]
    assert abs(first["kl"]) < 1e-6, "the policy starts at the reference's weights: KL ~ 0 at step 0"
    assert second["kl"] > 100 * max(abs(first["kl"]), 1e-9), (first["kl"], second["kl"])
    assert all(torch.isfinite(torch.tensor([r["info_gain"], r["loss"]])).all() for r in out["records"])
