"""The trainer's side of lossless delta weight sync (rollout.sglang.delta_sync): the last pushed tensors, kept on
the host, and each new bucket re-encoded as deltas against them (rollout/sglang/plugins/rntp_delta_models/codec.py
has the format; a server applies them with the served classes beside it).

A push is full (every tensor whole) when `full` says so: the first push, and any push to a server that did not get
the previous one from this sender (a restarted or rejoined replica has no base copy). A push that fails leaves the
servers' bases unknown, so the sender's caller makes the next one full.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

import torch

from rntp_megatron.rollout.sglang.plugins.rntp_delta_models import codec
from rntp_megatron.weights.buckets import NamedTensors, nbytes


class DeltaSender:
    """Host copies of the last pushed tensors; encode() turns a push's buckets into delta buckets and counts the
    bytes (sent against full) of the latest push."""

    def __init__(self, max_density: float) -> None:
        self.max_density = max_density
        self.last: dict[str, torch.Tensor] = {}  # name -> host copy of the tensor last pushed
        self.sent_bytes = self.full_bytes = 0
        self.deltas = 0  # tensors of the latest push sent as deltas
        self.encode_s = 0.0  # seconds the latest push spent comparing, encoding and keeping copies
        self.token: Optional[object] = None  # minted by the caller per successful push; receivers keep the one they got

    def encode(self, buckets: Iterable[NamedTensors], full: bool) -> Iterator[NamedTensors]:
        """Each bucket with every tensor replaced by its delta entries where codec.encode finds them fewer bytes
        (never when `full`), ordered by element size, largest first (each entry then starts at an offset aligned
        to its dtype in the flat buffer SGLang views: flattened_bucket, safetensors)."""
        self.sent_bytes = self.full_bytes = self.deltas = 0
        self.encode_s = 0.0
        for bucket in buckets:
            t0 = time.perf_counter()
            out: NamedTensors = []
            for name, tensor in bucket:
                host = tensor.detach().to("cpu")
                old = None if full else self.last.get(name)
                entries = None
                if old is not None and old.shape == host.shape and old.dtype == host.dtype:
                    entries = codec.encode(name, host, old, self.max_density)
                if entries is None:
                    entries = [(name, tensor)]
                    self._keep(name, host)
                else:  # the host copy takes the changed elements only
                    self.deltas += 1
                    codec.apply(old, {codec.split(entry)[1]: t for entry, t in entries})
                out.extend(entries)
                self.sent_bytes += sum(nbytes(t) for _, t in entries)
                self.full_bytes += nbytes(tensor)
            out.sort(key=lambda entry: -entry[1].element_size())
            self.encode_s += time.perf_counter() - t0
            yield out

    def _keep(self, name: str, host: torch.Tensor) -> None:
        """The host copy of name becomes host's values (a copy: the stream may reuse its buffers)."""
        old = self.last.get(name)
        if old is not None and old.shape == host.shape and old.dtype == host.dtype:
            old.copy_(host)
        else:
            self.last[name] = host.clone()

    def stats(self) -> dict[str, float]:
        """The latest push: bytes sent, sent / full (1.0 for a full push), seconds spent encoding."""
        return {"weights/sent_bytes": float(self.sent_bytes),
                "weights/sent_fraction": self.sent_bytes / max(self.full_bytes, 1),
                "weights/delta_encode_s": self.encode_s}
