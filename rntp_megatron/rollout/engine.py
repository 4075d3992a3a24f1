"""The RolloutEngine contract every engine implements (docs/design.md, "Contracts worth keeping stable")."""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch

Bucket = list[tuple[str, torch.Tensor]]  # one bucket of a weight stream: (HF name, full tensor) pairs


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1  # samples per prompt (G); they share the prompt's prefill
    seed: Optional[int] = None


@dataclass
class Rollout:
    """One sampled continuation of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str
    logprobs: list[float]  # log p_rollout of each generated token, len == len(token_ids)
    finish_reason: str  # "stop" (stop string/token) or "length"
    weight_version: int = 0
    prompt_index: int = 0  # which prompt of the generate() call it answers
    # interleaved episodes (rl/interleaved.py): [start, end) of each site's generated tokens in token_ids; the
    # tokens between them are the chunk's true text and the template, fed, not sampled (log-prob 0)
    segments: list[list[int]] = field(default_factory=list)
    # int32[generated tokens, layers, k]: the experts the engine routed the position predicting each generated
    # token to, per MoE layer (SGLang's return_routed_experts); None when the engine did not report them
    routed_experts: Optional[torch.Tensor] = None


@contextlib.contextmanager
def drained(buckets: Iterable[Bucket]) -> Iterator[Iterator[Bucket]]:
    """An iterator over a weight stream's buckets that is run to its end when the block raises: the stream's other
    ranks wait in its TP/PP gathers and sends for this one, so a push that fails part-way would otherwise leave
    them blocked until the process group's timeout, instead of at the status all-reduce that follows the push."""
    stream = iter(buckets)
    try:
        yield stream
    except BaseException:
        for _ in stream:
            pass
        raise


class RolloutEngine(abc.ABC):
    """Generates rollouts and receives new weights after each optimizer step."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """sampling.n rollouts per prompt, grouped by prompt in order (prompt 0's n first)."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load full (unsharded) HF-named tensors; later rollouts report `version`."""

    def update_weights_from_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int
                                    ) -> dict[str, float]:
        """Load a weight stream's buckets (weights/: unchanged until the next update); seconds per phase. The
        stream is iterated to its end also when loading fails (`drained`)."""
        with drained(buckets) as stream:
            self.update_weights((item for bucket in stream for item in bucket), version)
        return {}

    def stats(self) -> dict[str, float]:
        """Metrics of the last generate call (e.g. a fleet's share and latency per replica); none by default."""
        return {}

    def sleep(self) -> None:
        """Free memory for the trainer (colocated placement); a no-op where nothing can be freed."""

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        """Take memory back after sleep(): all of it, or the parts that tags name (engine-defined)."""

    def close(self) -> None:
        """Stop the engine and anything it started."""
