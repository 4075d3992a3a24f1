"""The reward registry: rewards are looked up by `RewardConfig.name`; each declares whether it scores answer
text (kind "string") or needs the trainer's log-probs of the true continuation (kind "likelihood").

String rewards: fn(episodes[N], answers[N] (None: no parsable answer), ctx) -> rewards[N].
Likelihood rewards: fn(logp[N, K], mask[N, K], baseline_logp[N, K] | None, params) -> rewards[N], where logp
are log p_theta(x_{t+k} | x_<t, c, x_{t:t+k}) and baseline_logp the no-thought baseline model's.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from rntp_megatron.data.tokenizer_protocol import Tokenizer  # not data.tokenizer: the config consults this registry


@dataclass
class RewardContext:
    """What string rewards may read besides the episode and the answer."""

    tokenizer: Tokenizer
    params: dict[str, Any] = field(default_factory=dict)
    # (prefixes[N], continuations[N]) -> (logp[N, K], mask[N, K]) under the judge model of `self_judge` (the policy
    # or the reference), the trainer's forward-only pass; None where no model runs (a string reward alone)
    judge_logprobs: Optional[Callable[..., Any]] = None


@dataclass(frozen=True)
class RewardSpec:
    name: str
    kind: Literal["string", "likelihood"]
    fn: Callable[..., Any]
    needs_baseline: bool = False  # likelihood rewards that compare against the no-thought baseline model
    # the baseline enters as r = f(logp) - g(baseline), a shift shared by a site's G thoughts (info_gain): a
    # group-centred advantage cancels it (config.baseline_role)
    baseline_shift: bool = False


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, kind: Literal["string", "likelihood"] = "string",
                    needs_baseline: bool = False, baseline_shift: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` under `name` (a second registration of a name is an error)."""

    def wrap(fn: Callable) -> Callable:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered (by {REWARDS[name].fn.__module__})")
        REWARDS[name] = RewardSpec(name, kind, fn, needs_baseline, baseline_shift)
        return fn

    return wrap


def get_reward(name: str) -> RewardSpec:
    """The registered reward `name`, or a ValueError with a did-you-mean and the known names."""
    _load_builtin()
    if name not in REWARDS:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"reward.name: unknown reward {name!r}{hint}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def param(params: dict[str, Any], name: str, default: Any, choices: Optional[tuple] = None) -> Any:
    """params[name] or default; a value outside `choices` raises naming reward.params.<name>."""
    value = params.get(name, default)
    if choices is not None and value not in choices:
        raise ValueError(f"reward.params.{name}: {value!r} is not one of {list(choices)}")
    return value


def _load_builtin() -> None:
    """Import the modules whose decorators register the built-in rewards."""
    from rntp_megatron.rewards import calibrated, judge, likelihood, match, similarity  # noqa: F401
