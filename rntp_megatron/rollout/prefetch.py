"""Rollout batches handed to the trainer in step order: generated when asked (on-policy) or one step ahead.

off_policy_steps = 0: the batch of step n is generated when step n asks for it, from the newest weights.
off_policy_steps = 1: when step n takes its batch, the generation of step n+1 is submitted to a background
thread, so it overlaps the training of step n (the engine must run beside the trainer: an SGLang server in
its own process). It samples from the weights step n trains on, one version older than the weights that
will train on it. `wait()` joins it; the trainer calls it before it changes the engine's weights, so every
batch comes from one weight version (staleness exactly 1).

Only the main thread touches the data stream and torch.distributed: the episodes and sampling parameters of
a step are planned here before the thread starts, and `share` (the model-parallel broadcast of the rollouts)
runs in `wait()`. The thread only calls engine.generate.

Resume: a checkpoint holds the finished pre-generated batch (its episodes and rollouts as plain data, see
`state_dict`), taken after the data cursor that drew it. A resumed run trains on the very batch the
uninterrupted run trained on and draws the next step's episodes from the same cursor, so it repeats that run
exactly (given an engine that samples deterministically from a seed and weights).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rntp_megatron.data.episode import Episode
from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams

Plan = Callable[[int], tuple[list[Episode], SamplingParams]]  # step -> (episodes, sampling); main thread only
Share = Callable[[Optional[list[Rollout]]], list[Rollout]]  # this rank's rollouts (None: none here) -> the group's
Generate = Callable[[RolloutEngine, list[Episode], SamplingParams], list[Rollout]]  # n rollouts per episode


def generate_single(engine: RolloutEngine, episodes: list[Episode], sampling: SamplingParams) -> list[Rollout]:
    """The default: one engine call on the episodes' prompts (rl/interleaved.py generates turn by turn)."""
    return engine.generate([ep.prompt_ids for ep in episodes], sampling)


@dataclass
class RolloutBatch:
    """The rollouts that train step `step`: sampling.n per episode, grouped by episode in order."""

    step: int
    episodes: list[Episode]
    rollouts: list[Rollout]
    seed: Optional[int]  # the sampling seed it was generated with


class _Generation:
    """One engine call for one step, run inline or in a thread; its result or error is kept for `result()`."""

    def __init__(self, step: int, episodes: list[Episode], sampling: SamplingParams,
                 engine: Optional[RolloutEngine], background: bool, generate: Generate = generate_single) -> None:
        self.step, self.episodes, self.sampling, self.generate = step, episodes, sampling, generate
        self.rollouts: Optional[list[Rollout]] = None
        self.error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        if engine is None:  # a rank that receives its group's rollouts
            return
        if background:
            self._thread = threading.Thread(target=self._run, args=(engine,), name=f"rollouts-step-{step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._run(engine)

    def _run(self, engine: RolloutEngine) -> None:
        """sampling.n rollouts per episode prompt from the engine (any error kept for the main thread)."""
        try:
            self.rollouts = self.generate(engine, self.episodes, self.sampling)
        except BaseException as e:  # re-raised in the main thread by result()
            self.error = e

    def result(self, share: Share) -> RolloutBatch:
        """Join the call, re-raise its error, and share its rollouts over the model-parallel group."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"generating the rollouts of step {self.step} failed: {self.error!r}") from self.error
        return RolloutBatch(self.step, self.episodes, share(self.rollouts), self.sampling.seed)


def _same(rollouts: Optional[list[Rollout]]) -> list[Rollout]:
    """The default `share`: every rank generates its own rollouts, so there is nothing to receive."""
    if rollouts is None:
        raise ValueError("this rank generated no rollouts and no `share` was given to receive them")
    return rollouts


class RolloutPrefetcher:
    """Hands out the RolloutBatch of each step in order; with off_policy_steps=1, generates one step ahead.

    `plan(step)` draws the step's episodes and sampling parameters (its seed) in the main thread; `engine`
    is this rank's engine (None on ranks that receive rollouts through `share`)."""

    def __init__(self, engine: Optional[RolloutEngine], plan: Plan, off_policy_steps: int = 0,
                 share: Share = _same, generate: Generate = generate_single) -> None:
        if off_policy_steps not in (0, 1):
            raise ValueError(f"off_policy_steps must be 0 or 1, got {off_policy_steps}")
        self.engine, self.plan, self.off_policy_steps, self.share = engine, plan, off_policy_steps, share
        self.generate = generate
        self._ahead: Optional[_Generation] = None  # submitted, not yet joined
        self._ready: Optional[RolloutBatch] = None  # joined, not yet handed out

    def batch(self, step: int, prefetch_next: bool = True) -> RolloutBatch:
        """The batch of `step` (the one generated ahead, else one generated now); with off_policy_steps=1
        and prefetch_next, then submits the generation of step + 1 before returning."""
        ready = self.wait()
        self._ready = None
        if ready is None or ready.step != step:
            ready = self._generate(step, background=False).result(self.share)
        if self.off_policy_steps and prefetch_next:
            self._ahead = self._generate(step + 1, background=True)
        return ready

    def wait(self) -> Optional[RolloutBatch]:
        """Join the generation running ahead (call before the engine's weights change); the batch, if any."""
        if self._ahead is not None:
            self._ready, self._ahead = self._ahead.result(self.share), None
        return self._ready

    def _generate(self, step: int, background: bool) -> _Generation:
        episodes, sampling = self.plan(step)
        return _Generation(step, episodes, sampling, self.engine, background, self.generate)

    def state_dict(self) -> dict[str, Any]:
        """The batch generated ahead, as plain data (torch.load(weights_only=True) reads it); {} when none."""
        ready = self.wait()
        if ready is None:
            return {}
        return {"step": ready.step, "seed": ready.seed, "episodes": [dataclasses.asdict(e) for e in ready.episodes],
                "rollouts": [dataclasses.asdict(r) for r in ready.rollouts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the batch generated ahead (it is handed out for its step instead of generating anew)."""
        self._ahead = None
        self._ready = None
        if state:
            self._ready = RolloutBatch(state["step"], [Episode(**e) for e in state["episodes"]],
                                       [Rollout(**r) for r in state["rollouts"]], state["seed"])
