"""rollout.sglang.delta_sync: the distributed and disk channels send each tensor's changed elements
(weights/delta.py) when that is fewer bytes, to servers that run rntp's served classes (plugins/); the whole push
goes full when a receiver did not get the previous one."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

from rntp_megatron.config import ConfigError
from rntp_megatron.rollout.sglang.client import HTTPClient, SGLangServerError
from rntp_megatron.rollout.sglang.plugins import served_env
from rntp_megatron.rollout.sglang.plugins.rntp_delta_models import codec
from rntp_megatron.rollout.sglang.receivers import Receiver
from rntp_megatron.weights.buckets import NamedTensors
from rntp_megatron.weights.delta import DeltaSender


class DeltaSync:
    """The sender of one leading engine (used while it leads a push) and the bookkeeping of which push each
    receiver holds as its base (Receiver.delta_base)."""

    def __init__(self, max_density: float) -> None:
        self.sender = DeltaSender(max_density)

    @contextlib.contextmanager
    def encoded(self, buckets: Iterable[NamedTensors], receivers: Sequence[Receiver]
                ) -> Iterator[Iterable[NamedTensors]]:
        """The buckets as deltas against the last push, or whole when some receiver did not get that push (never
        pushed to, restarted, rejoined, or a push that failed part-way); after the push every receiver holds it as
        its base."""
        full = self.sender.token is None or any(r.delta_base is not self.sender.token for r in receivers)
        try:
            yield self.sender.encode(buckets, full)
        except BaseException:
            for r in receivers:
                r.delta_base = None
            raise
        self.sender.token = object()
        for r in receivers:
            r.delta_base = self.sender.token

    def sent_whole(self) -> bool:
        """Whether the latest push sent every tensor whole (no deltas): a folder of it is a model to start from."""
        return not self.sender.deltas

    def stats(self) -> dict[str, float]:
        """The latest push (weights/sent_bytes, sent_fraction, delta_encode_s); nothing before the first."""
        return self.sender.stats() if self.sender.token is not None else {}


def check_served_classes(client: HTTPClient) -> None:
    """ConfigError unless the server serves rntp_delta_models' classes (they answer GET /get_weights_by_name of
    codec.MARKER; SGLang's own classes do not, and would load deltas as no-ops)."""
    try:
        reply = client.call("/get_weights_by_name", {"name": codec.MARKER, "truncate_size": 1}, timeout=60)
    except SGLangServerError as e:
        reply = repr(e)[:200]
    marker = [float(codec.FORMAT)]
    if reply != marker and not (isinstance(reply, list) and reply and all(r == marker for r in reply)):
        env = " ".join(f"{k}={v}" for k, v in served_env().items())
        raise ConfigError(
            f"rollout.sglang.delta_sync: the SGLang server at {client.url} does not serve rntp's "
            f"delta-taking model classes (GET /get_weights_by_name {codec.MARKER!r} answered {reply!r}); start "
            f"it with {env} (slurm/train.sbatch does when delta_sync is on) and a model of one of their "
            "architectures (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM), or set "
            "rollout.sglang.delta_sync: false")
