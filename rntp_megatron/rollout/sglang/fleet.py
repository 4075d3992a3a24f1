"""A fleet of SGLang replicas behind one RolloutEngine: groups spread over replicas, weights to all of them.

Generation: each prompt is a group (its sampling.n samples stay on one replica, so they share its prefix cache);
prompts go to the live replica with the fewest outstanding tokens (prompt + n * max_new_tokens of what it was
given), and the replicas generate concurrently. A replica that fails (its server died, a request timed out) is
marked down and its prompts are generated again by the others, so a step never loses a group.

Weights: one replica leads the push and the others are its peers (SGLangEngine.peers): one folder that all
load (disk), each tensor payload to each (tensor), or one broadcast group holding the trainer and every
replica's ranks (distributed, so one send feeds all). The weight stream flows through: a channel asks for the
next bucket only after the servers took the one before (no read-ahead: an empty last call sets the version), and
the fleet keeps only the bucket in flight (`_Window`), so beyond the model one bucket exists on rank 0's device
while it is sent, and two while the stream makes the next (the one before is still referenced until the next
replaces it): ~2 x rollout.weight_bucket_mb for a 70B model rather than the model (tests/test_sglang_fleet.py
measures it).
A replica that dies mid-push (tensor, distributed) is dropped and the push goes on to the rest from the bucket in
flight (the group re-formed without it; the buckets they took before it are in their weights already). The disk
channel writes every bucket to a folder before any replica loads it, so a replica lost in its load fails the
push. No host copy is kept for a fleet of several replicas: a replica started again gets the next push in full
(it generates nothing before); a lone owned server keeps the last pushed weights on the host, the only source of
current weights for a restart in the middle of a step (SGLangEngine restarts a dead server itself), since the
weight stream is a collective of every trainer rank and cannot be made again on rank 0 alone. A replica that is
down rejoins at a later push: an owned server is started again (at most rollout.sglang.max_restarts times), an
attached one is health-checked again after a back-off that doubles (rollout.sglang.retry_backoff_s); either way
the weight group is formed anew with it (a new server process holds none) and it gets the full weights before it
generates again.

A lone attached replica (one URL, as slurm/train.sbatch's one SGLang node gives) has no other replica to serve
while its supervisor starts it again at the same address, so the fleet waits for it (back-off, at most
rollout.sglang.startup_timeout_s) and brings it back to the current weights, which the rank that pushes then
keeps on the host (SGLangEngine.held_weights) for this: killed in a push, the push waits for it and is made again
in full (the held weights, then the rest of the stream); killed in generation or between steps, a watcher thread
(every WATCH_S) finds it answering with another weight version and pushes it the held weights (SGLangEngine.resync).
A replica that is down becomes live for generation only when it reports the fleet's weight version (every rank's
fleet: placement tells the ranks that do not push which version that is), and rollouts of another version (a
replica started again and not yet re-synced) count as a failed replica: no rank generates from stale weights.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.error
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams, drained
from rntp_megatron.rollout.sglang.client import SGLangServerError, backoff_until
from rntp_megatron.rollout.sglang.engine import SGLangEngine
from rntp_megatron.weights.buckets import NamedTensors, bucketed

FAILURES = (SGLangServerError, OSError, urllib.error.URLError, RuntimeError)
WATCH_S = 2.0  # how often a lone attached replica is asked for its weight version (a restart takes far longer)


@dataclass
class Replica:
    """One server of the fleet and what the fleet knows of it."""

    engine: SGLangEngine
    owned: bool
    live: bool = True
    retry_at: float = 0.0  # attached and down: when to look at it again
    backoff_s: float = 0.0
    restarts: int = 0
    samples: int = 0  # of the last generate call
    seconds: float = 0.0


class _Window:
    """A weight stream that keeps only the bucket a push may have to send again: the last one handed out (a
    channel asks for the next only after the servers took it); replay() hands it out again and then goes on with
    the stream."""

    def __init__(self, stream: Iterator[NamedTensors]) -> None:
        self.stream = stream
        self.kept: list[NamedTensors] = []

    def replay(self) -> Iterator[NamedTensors]:
        """The kept bucket, then the rest of the stream (keeping the last one handed out)."""
        yield from list(self.kept)
        while True:
            self.kept.clear()  # the servers took it: none is kept while the next bucket is made
            bucket = next(self.stream, None)
            if bucket is None:
                return
            self.kept.append(bucket)
            yield bucket


class SGLangFleet(RolloutEngine):
    """Several SGLang servers (owned or attached) as one engine; see the module docstring."""

    def __init__(self, engines: list[SGLangEngine], owned: bool, max_restarts: int = 2,
                 retry_backoff_s: float = 5.0) -> None:
        if not engines:
            raise ValueError("a fleet needs at least one SGLang engine")
        self.replicas = [Replica(e, owned, backoff_s=retry_backoff_s) for e in engines]
        self.max_restarts, self.retry_backoff_s = max_restarts, retry_backoff_s
        self.weight_version = 0  # what the replicas serve: set by this fleet's pushes, or by placement on other ranks
        self._leader: Optional[Replica] = None  # the replica that holds the weight group, if any
        self._pushing = threading.RLock()  # a push and the watcher's re-sync, one at a time
        self._watcher: Optional[threading.Thread] = None
        self._closed = threading.Event()

    # ---------------------------------------------------------------------------------------------
    def addresses(self) -> list[tuple[str, Optional[str]]]:
        """(url, api key) of every replica, for the ranks that attach to the fleet."""
        return [(r.engine.client.url, r.engine.api_key) for r in self.replicas]

    def _live(self) -> list[Replica]:
        return [r for r in self.replicas if r.live]

    def _down(self, replica: Replica, why: str) -> None:
        replica.live = False
        replica.retry_at = time.monotonic() + replica.backoff_s
        print(f"SGLang replica {replica.engine.client.url} is down ({why}); its groups go to the others", flush=True)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """sampling.n rollouts per prompt (prompt 0's first); groups spread over the live replicas, those of a
        replica that fails generated again by the others."""
        results: dict[int, list[Rollout]] = {}
        for r in self.replicas:
            r.samples, r.seconds = 0, 0.0
        pending = list(range(len(prompts)))
        while pending:
            self._revive(wait=not self._live() and len(self.replicas) == 1)
            live = self._live()
            if not live:
                raise SGLangServerError(f"no SGLang replica is live ({len(self.replicas)} in the fleet)")
            failed: list[int] = []
            threads = [threading.Thread(target=self._generate_on, args=(r, idx, prompts, sampling, results, failed))
                       for r, idx in zip(live, self.assign(pending, prompts, sampling, len(live))) if idx]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            pending = sorted(failed)
        return [ro for i in range(len(prompts)) for ro in results[i]]

    @staticmethod
    def assign(pending: list[int], prompts: list[list[int]], sampling: SamplingParams, replicas: int
               ) -> list[list[int]]:
        """Prompt indices per replica: longest first, each to the replica with the fewest outstanding tokens."""
        load, shares = [0] * replicas, [[] for _ in range(replicas)]
        for i in sorted(pending, key=lambda i: -len(prompts[i])):
            target = min(range(replicas), key=lambda k: (load[k], k))
            shares[target].append(i)
            load[target] += sampling.n * (len(prompts[i]) + sampling.max_new_tokens)
        return [sorted(share) for share in shares]

    def _generate_on(self, replica: Replica, indices: list[int], prompts: list[list[int]], sampling: SamplingParams,
                     results: dict[int, list[Rollout]], failed: list[int]) -> None:
        t0 = time.monotonic()
        try:
            rollouts = replica.engine.generate([prompts[i] for i in indices], sampling)
        except FAILURES as e:
            self._down(replica, repr(e)[:300])
            failed.extend(indices)
            return
        stale = sorted({ro.weight_version for ro in rollouts} - {self.weight_version})
        if stale:  # started again, and not yet brought to the current weights
            self._down(replica, f"it generated with weight version {stale}, not {self.weight_version}")
            failed.extend(indices)
            return
        for ro in rollouts:
            ro.prompt_index = indices[ro.prompt_index]
            results.setdefault(ro.prompt_index, []).append(ro)
        replica.samples += len(rollouts)
        replica.seconds += time.monotonic() - t0

    def stats(self) -> dict[str, float]:
        """Per replica: share of the last call's samples and its generation seconds; replicas live; with
        delta_sync, the bytes of the last weight push (weights/sent_bytes, weights/sent_fraction)."""
        total = sum(r.samples for r in self.replicas) or 1
        out = {"replicas_live": float(len(self._live()))}
        if self._leader is not None:
            out.update(self._leader.engine.push_stats())
        for i, r in enumerate(self.replicas):
            out[f"replica{i}_share"] = r.samples / total
            out[f"replica{i}_latency_s"] = r.seconds
        return out

    # ---------------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.update_weights_from_buckets(bucketed(named_tensors, self.replicas[0].engine.bucket_bytes), version)

    def update_weights_from_buckets(self, buckets: Iterable[NamedTensors], version: int) -> dict[str, float]:
        """Every live replica (and any that can rejoin) gets the weights, tagged `version`; seconds per phase. The
        stream is iterated to its end also when the push fails (the other trainer ranks wait in its collectives)."""
        self._rejoin()
        keep_host_copy = len(self.replicas) == 1  # see the module docstring
        with self._pushing, drained(buckets) as stream:
            window = _Window(stream)
            refill: list[NamedTensors] = []  # what a replica that came back lacks beyond the window
            while True:
                live = self._live()
                if not live:
                    raise SGLangServerError("every SGLang replica failed during the weight push")
                try:
                    timing = self._push_to(live, itertools.chain(refill, window.replay()), version, keep_host_copy)
                    break
                except FAILURES as e:
                    if self._came_back(live, version, e):  # the held weights (this push's so far), then the rest
                        engine = live[0].engine
                        refill = list(bucketed(list(engine.held_weights().items()), engine.bucket_bytes))
                        continue
                    dead = [r for r in live if not r.engine.server_alive()] if len(self.replicas) > 1 else []
                    for r in dead:
                        self._down(r, f"died during the push of version {version}: {e!r}"[:300])
                    if not dead or live[0].engine.cfg.weight_sync == "disk":
                        raise
            self.weight_version = version
        if self._watcher is None and len(self.replicas) == 1 and not self.replicas[0].owned:
            self._watcher = threading.Thread(target=self._watch, name="sglang-replica-watcher", daemon=True)
            self._watcher.start()
        return timing

    def _came_back(self, live: list[Replica], version: int, error: BaseException) -> bool:
        """A lone attached replica that died in the push (distributed, tensor channel): wait for its supervisor to
        start it again at its address (back-off, at most rollout.sglang.startup_timeout_s); False for any other
        failure."""
        replica = live[0]
        if len(self.replicas) > 1 or replica.owned or replica.engine.cfg.weight_sync == "disk" \
                or replica.engine.server_alive():
            return False
        url, limit = replica.engine.client.url, replica.engine.cfg.startup_timeout_s
        print(f"SGLang replica {url} died during the push of version {version} ({error!r:.200}); waiting up to "
              f"{limit:g} s for it to come back at its address", flush=True)
        backoff_until(replica.engine.server_alive, limit, lambda waited: (
            f"SGLang replica {url} did not answer /health again within {waited:.0f} s "
            f"(rollout.sglang.startup_timeout_s={limit:g})"))
        return True

    def _revive(self, wait: bool) -> None:
        """Attached replicas that are down become live once they serve the fleet's weight version (started again
        by their supervisor and re-synced: by the watcher or a push on the rank that pushes); with wait (none is
        live), waited for up to rollout.sglang.startup_timeout_s; else each asked again after its back-off."""
        down = [r for r in self.replicas if not r.live and not r.owned]
        if not down:
            return

        def serving() -> bool:
            now = time.monotonic()
            for r in down:
                if not wait and now < r.retry_at:
                    continue
                if r.engine.serves(self.weight_version):
                    r.live, r.backoff_s = True, self.retry_backoff_s
                    print(f"SGLang replica {r.engine.client.url} serves weight version {self.weight_version} "
                          "again; it generates again", flush=True)
                elif not wait:
                    r.retry_at = now + r.backoff_s
            return not wait or bool(self._live())

        urls, limit = [r.engine.client.url for r in down], down[0].engine.cfg.startup_timeout_s
        backoff_until(serving, limit, lambda waited: (
            f"SGLang replica {urls} did not serve weight version {self.weight_version} again within {waited:.0f} s "
            f"(rollout.sglang.startup_timeout_s={limit:g})"))

    def _watch(self) -> None:
        """(thread) Every WATCH_S: a lone attached replica that answers with another weight version than the
        fleet's (its supervisor started it again) gets the held weights (SGLangEngine.resync)."""
        replica = self.replicas[0]
        while not self._closed.wait(WATCH_S):
            with self._pushing:
                try:
                    if self._closed.is_set() or replica.engine.serves(self.weight_version) \
                            or not replica.engine.server_alive():
                        continue
                    print(f"SGLang replica {replica.engine.client.url} answers without weight version "
                          f"{self.weight_version} (started again): pushing it the held weights", flush=True)
                    self._dissolve_weight_group()
                    replica.engine.resync()
                except Exception as e:  # the thread must outlive a failed round: it asks again at the next
                    print(f"re-syncing SGLang replica {replica.engine.client.url} failed: {e!r:.300}", flush=True)

    def _push_to(self, live: list[Replica], buckets: Iterable[NamedTensors], version: int, keep_host_copy: bool
                 ) -> dict[str, float]:
        """Push through live[0] with the others as its peers (the weight group re-formed when they changed)."""
        leader, peers = live[0], [r.engine for r in live[1:]]
        if self._leader is not None and (self._leader is not leader or self._leader.engine.peers != peers):
            self._dissolve_weight_group()
        self._leader = leader
        leader.engine.peers = peers
        try:
            return leader.engine.update_weights_from_buckets(buckets, version, keep_host_copy=keep_host_copy)
        except FAILURES:
            self._dissolve_weight_group()  # its members are about to change
            raise

    def _dissolve_weight_group(self) -> None:
        """Leave the weight group; the next push forms it anew with the live replicas."""
        if self._leader is not None:
            self._leader.engine.leave_weight_group()
            self._leader = None

    def _rejoin(self) -> None:
        """Down replicas that can serve again become live (they get this push before they generate)."""
        now = time.monotonic()
        for r in self.replicas:
            if r.live:
                continue
            if r.owned:
                if r.restarts >= self.max_restarts:
                    continue
                self._dissolve_weight_group()  # the new process holds no group: form it again with it
                r.restarts += 1
                r.engine.relaunch()
                r.live = True
            elif now >= r.retry_at:
                if r.engine.server_alive():
                    self._dissolve_weight_group()  # the server may have been restarted: it may hold no group
                    r.live, r.backoff_s = True, self.retry_backoff_s
                else:
                    r.backoff_s = max(2 * r.backoff_s, self.retry_backoff_s)
                    r.retry_at = now + r.backoff_s

    # ---------------------------------------------------------------------------------------------
    def server_weight_version(self) -> int:
        """The weight version the first live replica reports."""
        return self._live()[0].engine.server_weight_version()

    def sleep(self) -> None:
        for r in self._live():
            r.engine.sleep()

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        for r in self._live():
            r.engine.wake(tags)

    def close(self) -> None:
        self._closed.set()
        with self._pushing:
            self._dissolve_weight_group()
        if self.replicas[0].owned:
            for r in self.replicas:
                r.engine.close()
