"""The models beside the policy that the method's knobs call for, built once at the trainer's TP/PP layout:

- reference (rl.reference, else checkpoint.load's weights; frozen): log-probs of the policy's tokens for the KL
  term (rl.kl_coef), the `frozen` no-thought baseline, and the site scorer when there is no proxy;
- proxy (data.proxy: a card and a checkpoint; frozen): scores chunks for entropy / logprob_window site selection
  and gives the `run` reward its surprisal weights;
- EMA baseline (reward.baseline: ema, RLP): p_bar of info_gain / vrcli, updated after every optimizer step and
  saved in the checkpoint.

Which ones a run needs is config.side_model_needs (validation refuses a run that needs a reference and has none).
Every call here is collective over the model-parallel group, made by all its ranks in the same order.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from rntp_megatron.config import ConfigError, RunConfig, reference_path, side_model_needs
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.proxy import ProxyScorer
from rntp_megatron.data.tokenizer import Tokenizer
from rntp_megatron.model.frozen import build_frozen, card_config
from rntp_megatron.rewards.baseline import EMABaseline
from rntp_megatron.rewards.scoring import continuation_logprobs
from rntp_megatron.rl.reference import reference_logprobs
from rntp_megatron.rollout.engine import Rollout

EMA_KEY = "baseline_ema"  # the EMA's name among a checkpoint's models


class SideModels:
    """Builds and serves the reference, proxy and EMA baseline of one run (each None when unused)."""

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        needs = side_model_needs(cfg)
        p = cfg.parallel
        self.length_multiple = p.tensor_model_parallel_size if p.sequence_parallel else 1
        self.reference = self.proxy = None
        if needs["reference"]:
            self.reference = build_frozen(cfg.model, p, reference_path(cfg),
                                          "rl.reference" if cfg.rl.reference else "checkpoint.load")
        if needs["proxy"]:
            card = card_config(cfg.data.proxy.card, "data.proxy.card")
            if card.vocab_size < tokenizer.vocab_size:
                raise ConfigError(f"data.proxy.card: {cfg.data.proxy.card!r} has vocab_size {card.vocab_size}, less "
                                  f"than the tokenizer's {tokenizer.vocab_size} ids (the proxy must share it)")
            self.proxy = build_frozen(card, p, cfg.data.proxy.load, "data.proxy.load")
        self.scorer: Optional[ProxyScorer] = None
        if needs["scores"]:
            model = self.proxy if self.proxy is not None else self.reference
            self.scorer = ProxyScorer(model, tokenizer.vocab_size, cfg.data.entropy_top_k, tokenizer.pad_id,
                                      cfg.schedule.micro_batch_size, self.length_multiple,
                                      card=card if self.proxy is not None else None)
        self.ema = EMABaseline.build(cfg.model, p, cfg.reward.ema_decay) if needs["ema"] else None
        self.surprisal = needs["surprisal"]
        self.frozen_baseline = needs["frozen_baseline"]
        # a reference built only to score sites adds no KL forward (rl.reference set alone: KL logged, not trained)
        self.kl = self.reference is not None and (cfg.rl.kl_coef > 0 or cfg.rl.reference is not None)

    def checkpointed(self) -> dict[str, torch.nn.Module]:
        """The models a checkpoint saves beside the policy (the frozen ones are rebuilt from their sources)."""
        return {EMA_KEY: self.ema.average} if self.ema is not None else {}

    def start(self, policy: torch.nn.Module, resumed: bool) -> None:
        """After the policy's weights are in place: the EMA starts at them, or continues the checkpoint's."""
        if self.ema is not None and resumed:
            self.ema.loaded()
        elif self.ema is not None:
            self.ema.reset(policy)

    def after_step(self, policy: torch.nn.Module) -> None:
        """After each optimizer step: one EMA step toward the policy's new weights."""
        if self.ema is not None:
            self.ema.update(policy)

    def baseline_model(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The no-thought baseline p_bar of info_gain / vrcli by reward.baseline: policy, ema or frozen. Rewards
        without a baseline (loglik, prob: their info_gain metric only) use the policy, as `policy` does."""
        if self.ema is not None:
            return self.ema.model
        return self.reference if self.frozen_baseline else policy

    def ref_logprobs(self, rollouts: Sequence[Rollout]) -> Optional[torch.Tensor]:
        """ref[N, seq_length] for RLBatch.ref_logprobs (None when the run has no KL term to compute)."""
        if not self.kl:
            return None
        s, r = self.cfg.schedule, self.cfg.rollout
        return reference_logprobs(self.reference, rollouts, s.seq_length, s.micro_batch_size, self.tokenizer.pad_id,
                                  r.temperature, self.tokenizer.vocab_size, self.length_multiple)

    def add_surprisal(self, episodes: Sequence[Episode]) -> None:
        """episode.meta['ref_logprobs'] = log p(x_{t+k} | x_<t+k) of the true continuation under the proxy (or
        the reference), the `run` reward's surprisal weights; episodes that have them are left as they are."""
        todo = [ep for ep in episodes if "ref_logprobs" not in ep.meta]
        if not self.surprisal or not todo:
            return
        logp, _ = continuation_logprobs([self.scorer.model], [ep.context_ids for ep in todo],
                                        [ep.continuation_ids for ep in todo], self.cfg.schedule.micro_batch_size,
                                        self.tokenizer.pad_id, length_multiple=self.length_multiple,
                                        vocab_size=self.tokenizer.vocab_size)
        for ep, row in zip(todo, logp):
            ep.meta["ref_logprobs"] = row[:len(ep.continuation_ids)].tolist()
