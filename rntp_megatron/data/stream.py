"""The data-parallel sharded, resumable episode stream.

Rank r of D reads its own shard of every source (document n goes to rank n % D), mixes sources by weight
with a deterministic schedule (the next document comes from the source furthest behind its share of the
episodes: argmin_i episodes_i / w_i, ties to the first), and cycles a source when it ends (epoch + 1). Sites are drawn
with a numpy PCG64 generator seeded by (data.seed, r).

The cursor (`state_dict()`) is the state at the start of the document whose episodes are being handed
out, plus how many of them were handed out: per-source reader position and epoch, blend counts, the RNG
state and the skip counters. `load_state_dict()` re-reads that document and skips what was already
emitted, so a restored stream continues with exactly the episodes an uninterrupted one would give.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from rntp_megatron.config import DataConfig, to_dict
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.episodes import EpisodeBuilder
from rntp_megatron.data.sources import (DataError, Document, Position, Reader, SkipCounts, check_megatron_vocab,
                                        open_source, source_name)
from rntp_megatron.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # the scorer runs a GPTModel: megatron is imported only by who builds one
    from rntp_megatron.data.proxy import ProxyScorer

STATE_VERSION = 1


class EpisodeStream:
    """Endless iterator of this data-parallel rank's Episodes, with a checkpointable cursor."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 scorer: Optional["ProxyScorer"] = None, builder: Optional[EpisodeBuilder] = None) -> None:
        self.cfg = cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        # `builder` turns a document into items: RL sites by default, whole chunks for pretraining (chunks.py)
        self.builder = builder or EpisodeBuilder(cfg, tokenizer, scorer)
        self.skips = SkipCounts()
        for src in cfg.sources:
            if src.kind == "megatron":
                check_megatron_vocab(src, tokenizer.vocab_size)
        self._readers: list[Reader] = [open_source(s, dp_rank, dp_size, cfg.max_document_bytes, self.skips)
                                       for s in cfg.sources]
        total = sum(s.weight for s in cfg.sources)
        self._weights = [s.weight / total for s in cfg.sources]
        self._fingerprint = [to_dict(s) for s in cfg.sources]
        n = len(cfg.sources)
        self._positions: list[Position] = [{} for _ in range(n)]
        self._epochs = [0] * n
        self._taken = [0] * n  # episodes per source (the blend's account)
        self._usable_in_epoch = [0] * n  # episodes a source gave in its current epoch (0 over an epoch: error)
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, dp_rank])))
        self._iters: list[Optional[Iterator[tuple[Document, Position]]]] = [None] * n
        self._snapshot = self._capture()
        self._pending: list[Episode] = []
        self._emitted = 0
        self._replay: Optional[int] = None  # after a restore: re-read one document and skip this many episodes
        self.episodes_emitted = 0
        self.tokens_emitted = 0

    def __iter__(self) -> "EpisodeStream":
        return self

    def __next__(self) -> Episode:
        while self._emitted >= len(self._pending):
            self._next_document()
        ep = self._pending[self._emitted]
        self._emitted += 1
        self.episodes_emitted += 1
        self.tokens_emitted += len(ep.prompt_ids) + len(ep.continuation_ids)
        return ep

    def take(self, n: int) -> list[Episode]:
        """The next n episodes."""
        return [next(self) for _ in range(n)]

    def _choose_source(self) -> int:
        return int(np.argmin([t / w for w, t in zip(self._weights, self._taken)]))

    def _next_document(self) -> None:
        """Read the chosen source's next document into the pending episodes (cycling epochs)."""
        self._snapshot = self._capture()
        s = self._choose_source()
        while True:
            if self._iters[s] is None:
                self._iters[s] = self._readers[s](self._positions[s])
            item = next(self._iters[s], None)
            if item is not None:
                break
            if self._usable_in_epoch[s] == 0:
                raise DataError(
                    f"source {source_name(self.cfg.sources[s])} gave no usable episode in a whole pass over "
                    f"data-parallel rank {self.dp_rank}/{self.dp_size}'s shard (skipped so far: "
                    f"{self.skips.report()}; context_len={self.cfg.context_len}, "
                    f"min_context={self.cfg.min_context}, answer_horizon={self.cfg.answer_horizon})")
            self._epochs[s] += 1
            self._usable_in_epoch[s] = 0
            self._positions[s] = {}
            self._iters[s] = None
        doc, self._positions[s] = item
        episodes = self.builder.episodes(doc, self._rng, self.skips)
        for ep in episodes:
            ep.meta.update(source=s, epoch=self._epochs[s])
        self._usable_in_epoch[s] += len(episodes)
        self._taken[s] += len(episodes)
        self._pending, self._emitted = episodes, 0
        if self._replay is not None:
            self._emitted, self._replay = self._replay, None

    def _capture(self) -> dict[str, Any]:
        return {
            "positions": copy.deepcopy(self._positions),
            "epochs": list(self._epochs),
            "taken": list(self._taken),
            "usable_in_epoch": list(self._usable_in_epoch),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "skips": dict(self.skips),
        }

    def state_dict(self) -> dict[str, Any]:
        """The cursor: plain python data (checkpoint it with the trainer state)."""
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "sources": copy.deepcopy(self._fingerprint),
            "seed": self.cfg.seed,
            "at_document": copy.deepcopy(self._snapshot),
            "emitted_from_document": self._emitted if self._pending else None,
            "episodes_emitted": self.episodes_emitted,
            "tokens_emitted": self.tokens_emitted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a cursor saved by a stream with the same sources, seed and data-parallel layout."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data cursor version {state.get('version')!r}, this code reads {STATE_VERSION}")
        if state["dp_size"] != self.dp_size or state["dp_rank"] != self.dp_rank:
            raise DataError(
                f"data cursor was saved by data-parallel rank {state['dp_rank']} of {state['dp_size']}, this is "
                f"rank {self.dp_rank} of {self.dp_size}: documents are sharded n % dp_size, so a changed "
                f"data-parallel size cannot continue the same stream exactly; resume with dp_size="
                f"{state['dp_size']} or start a fresh data stream (a new data.seed)")
        if state["sources"] != self._fingerprint or state["seed"] != self.cfg.seed:
            raise DataError(f"data cursor was saved for sources {state['sources']} with seed {state['seed']}, "
                            f"this run has {self._fingerprint} with seed {self.cfg.seed}")
        snap = copy.deepcopy(state["at_document"])
        self._positions = snap["positions"]
        self._epochs, self._taken = snap["epochs"], snap["taken"]
        self._usable_in_epoch = snap["usable_in_epoch"]
        self._rng.bit_generator.state = snap["rng"]
        self.skips.clear()
        self.skips.update(snap["skips"])
        self._iters = [None] * len(self._readers)
        self._snapshot = self._capture()
        self._pending, self._emitted = [], 0
        self._replay = state["emitted_from_document"]
        self.episodes_emitted = state["episodes_emitted"]
        self.tokens_emitted = state["tokens_emitted"]

    def metrics(self) -> dict[str, float]:
        """Counters for the metrics log: episodes, tokens, epochs per source, skipped inputs by reason."""
        out: dict[str, float] = {"data/episodes": self.episodes_emitted, "data/tokens": self.tokens_emitted}
        out.update({f"data/epoch/{i}": e for i, e in enumerate(self._epochs)})
        out.update({f"data/skipped/{r}": n for r, n in self.skips.items()})
        return out


def data_parallel_stream(cfg: DataConfig, tokenizer: Tokenizer,
                         scorer: Optional["ProxyScorer"] = None) -> EpisodeStream:
    """The stream of this process's data-parallel rank (megatron parallel_state must be initialized)."""
    from megatron.core import parallel_state

    return EpisodeStream(cfg, tokenizer, parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size(), scorer)
