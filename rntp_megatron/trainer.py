"""The RNTP trainer: the one place that orders a step.

    data cursor -> episodes -> engine.generate (G thoughts per site) -> rewards -> advantages
    -> Megatron forward/backward with the loss hook -> optimizer step -> weights to the engine
    -> metrics, checkpoint

Objectives: `ntp` (plain next-token pretraining on chunks), `rntp` (RL on sites), `mixed` (RL plus the
next-token loss on each episode's context). Every rank runs the same loop; a data-parallel rank draws its own
episodes, the ranks of one model-parallel group share them. Everything random in a step is seeded by
(seed, step, DP rank), so a run resumed from a checkpoint repeats the uninterrupted run exactly.

Where the engine runs (rollout.placement: colocated, the engine sleeping while the trainer trains, or
separate) is rollout/placement.py's concern. With rollout.off_policy_steps=1 (rollout/prefetch.py) the
generation of step n+1 overlaps the training of step n; the loss then anchors its PPO ratio at the trainer's
own log-probs before the update and corrects for the one-version-old rollouts by TIS (rl.tis_cap) against
the rollout log-probs. The metric rollout_staleness is the version trained minus the rollouts' version.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from rntp_megatron.checkpoint import (latest_checkpoint, load_checkpoint, load_rank_states, resolve_checkpoint,
                                      rng_state, save_checkpoint, set_rng_state)
from rntp_megatron.config import (ConfigError, RunConfig, baseline_role, check_prompt_fits, data_parallel_size,
                                  next_multiple, to_dict, validate)
from rntp_megatron.data.chunks import ChunkBuilder
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.fit import CUT_KEY, cut_prompt_left
from rntp_megatron.data.stream import EpisodeStream
from rntp_megatron.data.tokenizer import Tokenizer, check_model_vocab, tokenizer_for
from rntp_megatron.flops import FlopMeter, record_scoring, record_scoring_spans
from rntp_megatron.lm_loss import lm_batch, lm_forward_step
from rntp_megatron.model.provider import build_model
from rntp_megatron.optimizer import build_optimizer, wrap_ddp
from rntp_megatron.metrics import MetricsLogger, PhaseTimer
from rntp_megatron.rewards.compute import compute_rewards
from rntp_megatron.rewards.registry import get_reward
from rntp_megatron.rl.advantages import compute_advantages, zero_variance_filter
from rntp_megatron.rl.batch import RLBatch, pack_rollouts, policy_mask, with_global_counts
from rntp_megatron.rl.interleaved import generate_interleaved, pack_interleaved, segment_views
from rntp_megatron.rl.loss import RNTPLoss
from rntp_megatron.rl.rollout_routing import routed_experts, rollout_routing_mismatch
from rntp_megatron.rl.routing_replay import RoutingReplay, score_policy_tokens
from rntp_megatron.rl.shared_context import SharedLayout, share_context, shared_context_fallback
from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams
from rntp_megatron.rollout.placement import EnginePlacement
from rntp_megatron.rollout.prefetch import RolloutPrefetcher, generate_single
from rntp_megatron.runtime import device, init_distributed
from rntp_megatron.schedule import learning_rate, set_learning_rate, steps_for_token_budget
from rntp_megatron.side_models import SideModels
from rntp_megatron.step import train_step

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on SIGTERM/SIGUSR1; slurm/train.sbatch requeues on it


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    """The sampling seed of one step on one DP rank (independent of any RNG state, so resumes repeat it)."""
    return (seed * 1_000_003 + step * 10_007 + dp_rank * 101) % (2**31 - 1)


def dp_sums(values: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{name: (sum, count)} summed over the DP group -> {name: sum / count} (names with count 0 dropped)."""
    names = sorted(values)
    t = torch.tensor([[values[n][0], values[n][1]] for n in names], dtype=torch.float64, device=device())
    t = t.reshape(-1, 2)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return {n: (s / c).item() for n, (s, c) in zip(names, t) if c > 0}


class Trainer:
    """Builds everything a run needs from one RunConfig, resumes from the latest checkpoint, and trains."""

    def __init__(self, cfg: RunConfig, engine: Optional[RolloutEngine] = None) -> None:
        self.cfg = cfg
        # first, so that a preemption during start-up still ends in a checkpoint at the first step boundary
        self._stop_signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.info = init_distributed(cfg.parallel, cfg.seed)
        world = dist.get_world_size()
        validate(cfg, world_size=world)
        self.dp = data_parallel_size(cfg.parallel, world)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        s, rl = cfg.schedule, cfg.rl
        self.rows_per_rank = s.global_batch_size // self.dp
        if cfg.rl.objective != "ntp" and self.rows_per_rank % rl.group_size:
            fits = next_multiple(s.global_batch_size, math.lcm(rl.group_size, s.micro_batch_size) * self.dp)
            raise ConfigError(f"schedule.global_batch_size: {s.global_batch_size} rollouts over {self.dp} "
                              f"data-parallel ranks give {self.rows_per_rank} per rank, not a multiple of "
                              f"rl.group_size={rl.group_size} (a group must stay on one rank); fix: "
                              f"schedule.global_batch_size: {fits}")
        self.tokenizer: Tokenizer = tokenizer_for(cfg.data)
        check_model_vocab(cfg, self.tokenizer.vocab_size, getattr(self.tokenizer, "added_tags", []))
        before, after = (self.tokenizer.encode(part) for part in cfg.data.prompt_template.split("{context}"))
        check_prompt_fits(cfg, len(before) + len(after), exact=True)
        self.prompt_prefix_len, self.max_prompt_len = len(before), s.seq_length + 1 - cfg.rollout.max_new_tokens
        self.model = build_model(cfg.model, cfg.parallel)
        self.routing = RoutingReplay(self.model) if rl.routing_replay else None
        applies = rl.shared_context and rl.objective != "ntp"
        fallback = shared_context_fallback(cfg) if applies else None
        self.shared_context = applies and fallback is None
        if fallback is not None and dist.get_rank() == 0:
            print(f"rl.shared_context: one rollout a row instead: {fallback}", flush=True)
        self.ddp = wrap_ddp(self.model, cfg.parallel)
        self.optimizer = build_optimizer([self.ddp], s, cfg.parallel)
        self.side = SideModels(cfg, self.tokenizer)  # reference, proxy, EMA baseline: those the config uses
        builder = ChunkBuilder(cfg.data, self.tokenizer, s.seq_length + 1) if rl.objective == "ntp" else None
        self.stream = EpisodeStream(cfg.data, self.tokenizer, self.dp_rank, self.dp, scorer=self.side.scorer,
                                    builder=builder)
        self.loss = RNTPLoss(rl, cfg.rollout.temperature, cfg.reward.ntp_weight, cfg.rollout.max_new_tokens,
                             vocab_size=self.tokenizer.vocab_size)
        self.reward_kind = get_reward(cfg.reward.name).kind if rl.objective != "ntp" else "none"
        self.baseline_role = baseline_role(cfg)  # the no-thought baseline: for the gradient, the metric, or none
        self.think_close_ids = self.tokenizer.encode(cfg.data.think_close)
        self.answer_open_ids = self.tokenizer.encode(cfg.data.answer_open)
        self.run_dir = Path(cfg.logging.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.total_steps = s.train_steps
        if s.token_budget:
            self.total_steps = steps_for_token_budget(s.token_budget, s.global_batch_size * s.seq_length)
        self.step, self.consumed_tokens, self.weight_version = 0, 0, 0
        self.flops = FlopMeter(cfg.model)
        self.phases = PhaseTimer()  # each step's data wait, rollout, rewards, scoring, train, weight sync
        self.placement: Optional[EnginePlacement] = None
        self.engine: Optional[RolloutEngine] = None
        self.rollouts: Optional[RolloutPrefetcher] = None
        pending = self._resume()
        if rl.objective != "ntp":  # after the resume: a server starts from the weights it trains on
            self.placement = EnginePlacement(cfg, self.model, self.tokenizer, self.run_dir, engine)
            self.engine = self.placement.engine
            self.rollouts = RolloutPrefetcher(self.engine, self._plan_rollouts, cfg.rollout.off_policy_steps,
                                              share=self.placement.share, generate=self._generate)
            self.rollouts.load_state_dict(pending)
        self.metrics = MetricsLogger(cfg.logging, self.run_dir, enabled=dist.get_rank() == 0,
                                     total_steps=self.total_steps, resume_at=self.step, run_config=to_dict(cfg),
                                     flops_budget=cfg.schedule.flops_budget)

    # ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum  # acted on at the next step boundary, on every rank together

    def _resume(self) -> dict[str, Any]:
        """Continue this run from the latest complete checkpoint in checkpoint.dir (model, optimizer, step, data
        cursor, RNG); else start a new run from the weights of checkpoint.load (model only), if given. Returns
        the checkpoint's batch of rollouts generated ahead ({} when none)."""
        latest = latest_checkpoint(self.ckpt_dir)
        pending: dict[str, Any] = {}
        if latest is not None:
            state, rank_state = load_checkpoint(latest, [self.ddp], self.optimizer, self.side.checkpointed())
            self.step, self.consumed_tokens = state["step"], state["consumed_tokens"]
            self.weight_version = state["weight_version"]
            self.flops.load_state_dict(state.get("flops", {}))
            # one state per saved DP rank (the ranks of a model-parallel group hold the same data); at another
            # DP size the stream shares the unread rest of the data out anew (data/stream.py)
            by_dp = {s["data"]["dp_rank"]: s for s in load_rank_states(latest)}
            if len(by_dp) == self.dp:
                pending = by_dp[self.dp_rank].get("rollouts_ahead", {})
                if rank_state is not None:  # same world and DP size: this rank's own RNG streams
                    set_rng_state(rank_state["rng"])
            elif any(s.get("rollouts_ahead") for s in by_dp.values()):
                raise ConfigError(f"checkpoint {latest} holds rollouts generated ahead (rollout.off_policy_steps) "
                                  f"for its {len(by_dp)} data-parallel ranks; resume it at that data-parallel "
                                  f"size (this run has {self.dp})")
            self.stream.resume([by_dp[r]["data"] for r in sorted(by_dp)])
        elif self.cfg.checkpoint.load:  # the resolver prints the checkpoint and step the weights come from
            load_checkpoint(resolve_checkpoint(self.cfg.checkpoint.load, "checkpoint.load"), [self.ddp],
                            optimizer=None)
        self.side.start(self.model, resumed=latest is not None)
        if latest is not None and dist.get_rank() == 0:
            print(f"resumed from {latest} at step {self.step}", flush=True)
        return pending

    def save(self) -> Path:
        state = {"step": self.step, "consumed_tokens": self.consumed_tokens, "weight_version": self.weight_version,
                 "flops": self.flops.state_dict(), "config": to_dict(self.cfg)}
        rank_state = {"data": self.stream.state_dict(), "rng": rng_state()}
        if self.rollouts is not None:  # the batch generated ahead was drawn before the saved data cursor
            rank_state["rollouts_ahead"] = self.rollouts.state_dict()
        return save_checkpoint(self.ckpt_dir, self.step, [self.ddp], self.optimizer, state, rank_state,
                               self.cfg.checkpoint.keep_last, self.side.checkpointed())

    def close(self) -> None:
        """Stop what the trainer started for its rollouts (an SGLang server; an engine passed in stays open)."""
        self.stream.close()
        if self.placement is not None:
            self.placement.close()

    # ---------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to total_steps; 0 when done, EXIT_PREEMPTED after saving on SIGTERM/SIGUSR1."""
        interval = self.cfg.checkpoint.save_interval
        every_s = self.cfg.checkpoint.save_interval_minutes * 60
        if self.placement is not None:  # the engine serves the weights this run starts from, as their version
            self.placement.push_weights(self.weight_version)
        budget = self.cfg.schedule.flops_budget
        last_save = time.monotonic()
        while self.step < self.total_steps and (budget is None or sum(self.flops.totals.values()) < budget):
            t0, consumed = time.monotonic(), self.consumed_tokens
            set_learning_rate(self.optimizer, learning_rate(self.step, self.cfg.schedule))
            self.flops.begin()
            values = self._ntp_step() if self.cfg.rl.objective == "ntp" else self._rl_step()
            values.update(self.flops.end(parallel_state.get_data_parallel_group()))
            values["lr"] = learning_rate(self.step, self.cfg.schedule)
            values.update(self.stream.metrics())  # this rank's: data/episodes, data/epoch/i, data/skipped/<reason>
            values["step_time_s"] = time.monotonic() - t0
            values["tokens_per_s"] = (self.consumed_tokens - consumed) / values["step_time_s"]
            values.update(self.phases.take(values["step_time_s"], self._device_phases()))
            self.metrics.log(self.step, values)
            self.step += 1
            # [signal, save by time]: rank 0's clock decides the time, so every rank saves at the same step
            due = dist.get_rank() == 0 and every_s > 0 and time.monotonic() - last_save >= every_s
            flags = torch.tensor([self._stop_signal or 0, int(due)], device=device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = flags.tolist()
            if stop:
                self.save()
                return EXIT_PREEMPTED
            if (due or (interval and self.step % interval == 0)) and self.step < self.total_steps:
                self.save()
                last_save = time.monotonic()
        if interval or every_s or self.cfg.checkpoint.dir:
            self.save()
        self.metrics.close()
        return 0

    def _device_phases(self) -> tuple[str, ...]:
        """The phases that run on the trainer's devices: training and scoring, and generation when colocated."""
        colocated = self.placement is not None and self.placement.colocated
        return ("scoring", "train", "rollout") if colocated else ("scoring", "train")

    def _ntp_step(self) -> dict[str, float]:
        """Next-token loss on this rank's rows of chunk tokens[rows, seq_length + 1] (padding masked)."""
        s = self.cfg.schedule
        rows = torch.full((self.rows_per_rank, s.seq_length + 1), self.tokenizer.pad_id, dtype=torch.long,
                          device="cpu")
        mask = torch.zeros(self.rows_per_rank, s.seq_length, device="cpu")
        with self.phases.phase("data_wait"):
            episodes = self.stream.take(self.rows_per_rank)
        for i, ep in enumerate(episodes):
            rows[i, :len(ep.prompt_ids)] = torch.tensor(ep.prompt_ids, device="cpu")
            mask[i, :len(ep.prompt_ids) - 1] = 1
        self.flops.count_train(mask.sum(1).long().tolist(), mask.sum(1).long().tolist())
        rows, mask = rows.to(device()), mask.to(device())
        batches = [lm_batch(rows[i:i + s.micro_batch_size], mask[i:i + s.micro_batch_size])
                   for i in range(0, self.rows_per_rank, s.micro_batch_size)]
        with self.phases.phase("train"):
            out = train_step([self.ddp], self.optimizer, lm_forward_step, batches, s.seq_length, s.micro_batch_size)
        self.consumed_tokens += self._dp_total(mask.sum().item())
        return {"loss": out.pop("lm loss"), **out, "consumed_tokens": self.consumed_tokens}

    def _plan_rollouts(self, step: int) -> tuple[list[Episode], SamplingParams]:
        """This DP rank's next rows_per_rank / G episodes and the sampling of `step` (seeded by the step)."""
        r, G = self.cfg.rollout, self.cfg.rl.group_size
        with self.phases.phase("data_wait"):
            taken = self.stream.take(self.rows_per_rank // G)
        episodes = [cut_prompt_left(ep, self.max_prompt_len, self.prompt_prefix_len) for ep in taken]
        # Stop strings that are one token are also passed by id: an engine whose own tokenizer lacks the
        # special tokens (an SGLang server on a byte vocabulary) still stops on them.
        single = [ids[0] for ids in map(self.tokenizer.encode, r.stop) if len(ids) == 1]
        sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_new_tokens=r.max_new_tokens, stop=list(r.stop),
                                  stop_token_ids=[self.tokenizer.eos_id, *single], n=G,
                                  seed=step_seed(self.cfg.seed, step, self.dp_rank))
        return episodes, sampling

    def _generate(self, engine: RolloutEngine, episodes: list[Episode], sampling: SamplingParams) -> list[Rollout]:
        """sampling.n rollouts per episode: one engine call, or turn by turn over an interleaved episode's sites."""
        if self.cfg.data.episode_format == "interleaved":
            _, suffix = self.cfg.data.prompt_template.split("{context}")
            return generate_interleaved(engine, episodes, sampling, self.tokenizer.encode(suffix), self.tokenizer)
        return generate_single(engine, episodes, sampling)

    def _rl_step(self) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.rl.group_size
        with self.phases.phase("rollout"):  # what the step waits for (less than the generation when ahead)
            ahead = self.rollouts.batch(self.step, prefetch_next=self.step + 1 < self.total_steps)
        episodes, rollouts = ahead.episodes, ahead.rollouts
        interleaved = cfg.data.episode_format == "interleaved"  # rewards per (rollout, site): rl/interleaved.py
        scored_eps, scored = segment_views(episodes, rollouts, self.tokenizer) if interleaved else (episodes, rollouts)
        with self.phases.phase("rewards"):
            shaped, likelihood = self._rewards(scored_eps, scored)
        rewards = shaped.total
        advantages = compute_advantages(rewards, G, cfg.rl.advantage)
        groups = zero_variance_filter(rewards, G)
        pack = pack_interleaved if interleaved else pack_rollouts
        batch = pack(episodes, rollouts, advantages, rewards, self.think_close_ids,
                     cfg.schedule.seq_length, self.tokenizer.pad_id,
                     old_logprobs=None if self.routing or self.shared_context else self._old_logprobs(rollouts))
        if cfg.rl.dynamic_sampling:  # groups with equal rewards teach nothing: keep them out of the token mean
            keep = groups.sample_mask(G).float().unsqueeze(1)
            batch.thought_mask, batch.answer_mask = batch.thought_mask * keep, batch.answer_mask * keep
        s = cfg.schedule
        seq_length, mbs = s.seq_length, s.micro_batch_size
        if self.shared_context:  # micro-batches of one row holding micro_batch_size * seq_length tokens
            batch, layout = share_context(batch, rollouts, mbs * seq_length, self.tokenizer.pad_id,
                                          self.side.length_multiple)
            seq_length, mbs = layout.length, 1
            with self.phases.phase("scoring"):
                batch = self._score_shared(batch.to(device()), layout)
        else:
            with self.phases.phase("scoring"):
                batch.ref_logprobs = self.side.ref_logprobs(rollouts)  # the KL term's reference (None: no KL)
        self._count_flops(rollouts, batch, layout if self.shared_context else None)
        batch = with_global_counts(batch.to(device()), cfg.rl.train_on, parallel_state.get_data_parallel_group())
        microbatches, forward_step = batch.microbatches(mbs), self.loss.forward_step
        routing_metrics: dict[str, float] = {}
        if self.routing is not None:  # old log-probs and experts from one pass over these micro-batches: replayed
            self._record_scoring(rollouts, batch, layout if self.shared_context else None)
            with self.phases.phase("scoring"):
                microbatches = self.routing.record([self.ddp], self.loss, microbatches, seq_length, mbs)
            forward_step = self.routing.replaying(forward_step)
            if routed_experts(cfg) is not None:  # the server's experts against the recording's
                versus = rollout_routing_mismatch(microbatches, rollouts, self.routing.layers,
                                                  self.routing.sequence_parallel)
                routing_metrics = {} if versus is None else {"moe/rollout_routing_mismatch": versus}
        with self.placement.training(), self.phases.phase("train"):
            out = train_step([self.ddp], self.optimizer, forward_step, microbatches, seq_length, mbs)
        if self.routing is not None:
            out["moe/routing_mismatch"] = self.routing.mismatch()
        out.update(routing_metrics)
        out.update(self.placement.memory_metrics())  # free GPU memory while a colocated server slept ({} on CPU)
        with self.phases.phase("train"):
            self.side.after_step(self.model)
        with self.phases.phase("rollout"):
            self.rollouts.wait()  # the batch generated ahead is all of the weights it started under
        trained_version = self.weight_version
        self.weight_version += 1
        with self.phases.phase("weight_sync"):
            self.placement.push_weights(self.weight_version)
        self.consumed_tokens += self._dp_total(sum(len(ep.prompt_ids) for ep in episodes))
        out.update(self._rollout_metrics(scored_eps, scored, shaped.terms["reward_base"], rewards,
                                         groups.zero_variance_fraction, likelihood, trained_version))
        out.update(consumed_tokens=self.consumed_tokens, weight_version=self.weight_version)
        if self.engine is not None:
            out.update(self.engine.stats())
        return out

    def _score_shared(self, batch: RLBatch, layout: SharedLayout) -> RLBatch:
        """The scoring passes on the shared-context rows themselves: the reference's log-probs of the policy
        tokens (the KL term), and off-policy the trainer's own before the update (the PPO anchor; with routing
        replay its recording pass computes them instead)."""
        micro = batch.microbatches(1)
        policy = policy_mask(batch, self.cfg.rl.train_on) > 0
        if self.side.kl:
            self._record_scoring(None, batch, layout)
            ref = score_policy_tokens([self.side.reference], self.loss, micro, layout.length, 1)
            batch.ref_logprobs = torch.where(policy, ref, 0.0).float()
        if self.cfg.rollout.off_policy_steps and self.routing is None:
            self._record_scoring(None, batch, layout)
            old = score_policy_tokens([self.ddp], self.loss, micro, layout.length, 1)
            batch.old_logprobs = torch.where(policy, old, batch.old_logprobs).float()
        return batch

    def _record_scoring(self, rollouts: Optional[list[Rollout]], batch: RLBatch, layout: Optional[SharedLayout]
                        ) -> None:
        """The FLOPs of a forward-only pass over this step's rows reading the policy tokens' logits."""
        if layout is None:
            record_scoring([len(r.prompt_ids) for r in rollouts], [len(r.token_ids) for r in rollouts])
        else:
            record_scoring_spans(layout.spans, int(policy_mask(batch, self.cfg.rl.train_on).sum().item()))

    def _count_flops(self, rollouts: list[Rollout], batch: RLBatch, layout: Optional[SharedLayout]) -> None:
        """This step's rollouts, and its rows (fed tokens: prompt + generated - 1, or with shared context each
        group's context once and each branch after it; logits at the tokens the loss reads: the policy's, plus
        the context under the mixed objective)."""
        self.flops.count_rollouts(rollouts)
        read = policy_mask(batch, self.cfg.rl.train_on)
        if self.cfg.rl.objective == "mixed":
            read = ((read + batch.ntp_mask) > 0).float()
        if layout is not None:
            self.flops.count_train_spans(layout.spans, int(read.sum().item()))
            return
        self.flops.count_train([len(r.prompt_ids) + len(r.token_ids) - 1 for r in rollouts],
                               read.sum(1).long().tolist())

    def _old_logprobs(self, rollouts: list[Rollout]) -> Optional[list[list[float]]]:
        """One step ahead: log pi_trainer(token | prefix) of each generated token at the rollout temperature
        under the weights about to be updated (the PPO anchor; TIS then weighs pi_trainer / pi_rollout).
        On-policy: None (the rollout's own log-probs anchor the ratio). With rl.routing_replay the recording pass
        of rl/routing_replay.py computes them instead, on the training micro-batches."""
        if not self.cfg.rollout.off_policy_steps:
            return None
        from rntp_megatron.rewards.scoring import continuation_logprobs

        with self.phases.phase("scoring"):
            logp, _ = continuation_logprobs([self.ddp], [r.prompt_ids for r in rollouts],
                                            [r.token_ids for r in rollouts], self.cfg.schedule.micro_batch_size,
                                            self.tokenizer.pad_id, temperature=self.cfg.rollout.temperature,
                                            vocab_size=self.tokenizer.vocab_size)
        return [row[:len(r.token_ids)].tolist() for row, r in zip(logp, rollouts)]

    def _rewards(self, episodes: list[Episode], rollouts: list[Rollout]):
        """Shaped rewards; likelihood rewards score [prompt, thought, <answer>] -> true continuation here."""
        likelihood = None
        self.side.add_surprisal(episodes)  # the `run` reward's weights, when it asks for them
        if self.reward_kind == "likelihood":
            from rntp_megatron.rewards.scoring import continuation_logprobs

            eps = [episodes[r.prompt_index] for r in rollouts]
            thoughts = [self._thought_ids(r) for r in rollouts]
            conts = [ep.continuation_ids for ep in eps]
            mbs, pad = self.cfg.schedule.micro_batch_size, self.tokenizer.pad_id
            policy_prefixes = [ep.prompt_ids + th + self.answer_open_ids for ep, th in zip(eps, thoughts)]
            vocab = self.tokenizer.vocab_size
            shared = [r.prompt_index for r in rollouts] if self.shared_context else None  # one prompt a group
            with self.phases.phase("scoring"):
                logp, mask = continuation_logprobs([self.ddp], policy_prefixes, conts, mbs, pad, vocab_size=vocab,
                                                   groups=shared)
                gain_base = self._baseline_logprobs(episodes, rollouts)
            # where the baseline cancels from the advantage, the reward is its thought term on every step
            # (baseline 0), so `reward` keeps one meaning; the gain itself is logged when scored
            base = gain_base if self.baseline_role == "gradient" else torch.zeros_like(logp)
            likelihood = (logp, mask, base, gain_base)
        shaped = compute_rewards(episodes, rollouts, self.tokenizer, self.cfg.reward, self.cfg.data,
                                 self.cfg.rollout.max_new_tokens, likelihood=likelihood and likelihood[:3],
                                 shuffle_seed=step_seed(self.cfg.seed, self.step, self.dp_rank),
                                 judge_logprobs=self._judge_logprobs)
        return shaped, likelihood

    def _judge_logprobs(self, prefixes: list[list[int]], continuations: list[list[int]]):
        """(logp[N, K], mask) of continuations after prefixes under self_judge's judge: the policy or the reference."""
        from rntp_megatron.rewards.scoring import continuation_logprobs

        judge = self.side.reference if self.cfg.reward.params.get("judge_model") == "reference" else self.ddp
        with self.phases.phase("scoring"):
            return continuation_logprobs([judge], prefixes, continuations, self.cfg.schedule.micro_batch_size,
                                         self.tokenizer.pad_id, length_multiple=self.side.length_multiple,
                                         vocab_size=self.tokenizer.vocab_size)

    def _baseline_logprobs(self, episodes: list[Episode], rollouts: list[Rollout]) -> Optional[torch.Tensor]:
        """base[N, K] = log p_bar(x_{t+k} | prompt, </think><answer>, x_{t:t+k}) of each rollout's site, one forward
        per site (a group's G rows share the prefix); None on a step where config.baseline_role skips it."""
        interval = self.cfg.reward.info_gain_interval
        if self.baseline_role == "none" or (self.baseline_role == "metric" and self.step % interval):
            return None
        from rntp_megatron.rewards.scoring import continuation_logprobs

        sites = sorted({r.prompt_index for r in rollouts})
        prefixes = [episodes[i].prompt_ids + self.think_close_ids + self.answer_open_ids for i in sites]
        base, _ = continuation_logprobs([self.side.baseline_model(self.ddp)], prefixes,
                                        [episodes[i].continuation_ids for i in sites],
                                        self.cfg.schedule.micro_batch_size, self.tokenizer.pad_id,
                                        vocab_size=self.tokenizer.vocab_size)
        row = {site: i for i, site in enumerate(sites)}
        return base[[row[r.prompt_index] for r in rollouts]]

    def _thought_ids(self, rollout: Rollout) -> list[int]:
        """The generated tokens through </think> (all of them when the tag never closes, then </think>)."""
        from rntp_megatron.rl.batch import find_sublist

        at = find_sublist(rollout.token_ids, self.think_close_ids)
        if at < 0:
            return list(rollout.token_ids) + self.think_close_ids
        return list(rollout.token_ids[:at + len(self.think_close_ids)])

    def _dp_total(self, value: float) -> int:
        t = torch.tensor([float(value)], dtype=torch.float64, device=device())
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return int(t.item())

    def _rollout_metrics(self, episodes: list[Episode], rollouts: list[Rollout], base: torch.Tensor,
                         total: torch.Tensor, zero_variance: float, likelihood, trained_version: int
                         ) -> dict[str, float]:
        """Reward, per-class reward, thought length, format rate, info gain, and rollout_staleness (the
        version trained minus the version each rollout was generated with): [sum, count] over DP -> means."""
        pairs: dict[str, tuple[float, float]] = {
            "reward": (total.sum().item(), total.numel()),
            "rollout_staleness": (float(sum(trained_version - r.weight_version for r in rollouts)), len(rollouts)),
            "reward_base": (base.sum().item(), base.numel()),
            "zero_variance_groups": (zero_variance, 1.0),
        }
        lengths = [len(self._thought_ids(r)) - len(self.think_close_ids) for r in rollouts]
        pairs["thought_len"] = (float(sum(lengths)), float(len(lengths)))
        pairs["prompt_cut_rate"] = (float(sum(CUT_KEY in ep.meta for ep in episodes)), float(len(episodes)))
        closed = [float(r.finish_reason == "stop") for r in rollouts]
        pairs["finished_rate"] = (sum(closed), float(len(closed)))
        for cls in ("T", "C", "I"):
            picks = [i for i, r in enumerate(rollouts) if episodes[r.prompt_index].token_class == cls]
            pairs[f"reward_base_{cls}"] = (float(base[picks].sum()) if picks else 0.0, float(len(picks)))
        if likelihood is not None and likelihood[3] is not None:  # steps that scored the baseline
            logp, mask, _, baseline = likelihood
            gain = ((logp - baseline) * mask).sum(1) / mask.sum(1).clamp(min=1)
            pairs["info_gain"] = (gain.sum().item(), gain.numel())
        return dp_sums(pairs)
