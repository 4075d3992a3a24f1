"""The data-parallel sharded, resumable, elastic episode stream.

Rank r of D reads only its own units of every source (shards.py deals them out: byte ranges, row groups, document
ranges; a source with fewer units than ranks is dealt by record, shards.DealtSource), mixes sources by weight with
a deterministic schedule (the next document comes from the source furthest behind its share of the episodes:
argmin_i episodes_i / w_i, ties to the first), and goes on to the next pass of a source when its share of a pass
ends (the epoch is the pass a unit belongs to). Sites are drawn with a numpy PCG64 generator seeded by (data.seed,
r). Documents are built into episodes ahead of the consumer on a background thread (data.prefetch_documents of
them; ahead.py), except when a proxy model scores the sites.

The cursor (`state_dict()`) is the state at the start of the document whose episodes are being handed out,
plus how many of them were handed out: per source the rank's shard cursor, blend counts, the RNG state and
the skip counters; built ahead is never in it. `load_state_dict()` re-reads that document and skips what was
already emitted, so a restored stream continues with exactly the episodes an uninterrupted one would give.
`resume(states)` takes the cursors of all ranks of a run: the same layout loads this rank's exactly; another
data-parallel size translates them (shards.relayout), so that no document is lost or read twice: a document
that had handed out some of its episodes counts as read, the new ranks draw sites from new RNG streams.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from rntp_megatron.config import DataConfig, to_dict
from rntp_megatron.data.ahead import Ahead
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.episodes import EpisodeBuilder
from rntp_megatron.data.shards import DealtSource, ShardCursor, dealing_ways, relayout
from rntp_megatron.data.sources import (DataError, Document, SkipCounts, check_megatron_vocab, open_source,
                                        source_name)
from rntp_megatron.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # the scorer runs a GPTModel: megatron is imported only by who builds one
    from rntp_megatron.data.proxy import ProxyScorer

STATE_VERSION = 2


@dataclass
class BuiltDocument:
    """One document's episodes, the stream's state before it, and what reading it left behind."""

    before: dict[str, Any]
    episodes: list[Episode]
    source: int
    cursor_after: dict[str, Any]  # the source's shard cursor after the document
    epochs: list[int]
    skips: dict[str, int]


class EpisodeStream:
    """Endless iterator of this data-parallel rank's Episodes, with a checkpointable cursor."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 scorer: Optional["ProxyScorer"] = None, builder: Optional[EpisodeBuilder] = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        self.cfg = cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        # `builder` turns a document into items: RL sites by default, whole chunks for pretraining (chunks.py)
        self.builder = builder or EpisodeBuilder(cfg, tokenizer, scorer)
        # a proxy model is not run beside training: with a scorer, documents are built on the calling thread
        self._depth = cfg.prefetch_documents if scorer is None else 0
        self.skips = SkipCounts()
        for src in cfg.sources:
            if src.kind == "megatron":
                check_megatron_vocab(src, tokenizer.vocab_size)
        self._deal([None] * len(cfg.sources))
        total = sum(s.weight for s in cfg.sources)
        self._weights = [s.weight / total for s in cfg.sources]
        n = len(cfg.sources)
        self._cursors = [ShardCursor(dp_rank, dp_size) for _ in range(n)]
        self._taken = [0] * n  # episodes per source (the blend's account)
        self._idle_units = [0] * n  # units ended since a source last gave a usable episode
        self._generation = 0  # layout changes so far (seeds the site RNG of a new layout)
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, dp_rank])))
        self._restart(None, None, 0, 0)

    def _deal(self, ways: list[Optional[int]]) -> None:
        """Open the sources, a source with fewer units than ranks dealt by record (shards.DealtSource) `ways` ways
        (None: by this layout, shards.dealing_ways; a resume passes the saved run's)."""
        self._sources = []
        for src, m in zip(self.cfg.sources, ways):
            private = SkipCounts()
            source = open_source(src, self.cfg.max_document_bytes, private, self.cfg.shard_bytes)
            self.skips.update(private)  # anything counted while opening
            m = dealing_ways(source.num_units, self.dp_size) if m is None else m
            if m == 1:  # read as it is: it counts into the stream's own skips
                source.skips = self.skips
            self._sources.append(DealtSource(source, private, self.skips, m) if m > 1 else source)
        # units are positions in the files as listed now: a cursor of another listing would point elsewhere
        self._fingerprint = {"sources": [to_dict(s) for s in self.cfg.sources], "seed": self.cfg.seed,
                             "shard_bytes": self.cfg.shard_bytes, "units": [s.num_units for s in self._sources],
                             "dealt": [getattr(s, "ways", 1) for s in self._sources]}

    def _adopt_dealing(self, state: dict[str, Any]) -> None:
        """Read the sources dealt as the saved run did (its units are numbered so)."""
        saved = state.get("dealt", [1] * len(self._sources))  # a cursor from before dealing: undealt
        if len(saved) == len(self._sources) and saved != self._fingerprint["dealt"]:
            self._stop_worker()
            self._deal(saved)

    # --- the producer: documents -> episodes (on the worker thread when prefetching) -----------------------
    def _restart(self, replay: Optional[int], after: Optional[dict], episodes: int, tokens: int) -> None:
        """Start consuming from the producer state now set (no thread is running)."""
        self._reading: list[Optional[Iterator]] = [None] * len(self._sources)
        self._start = self._capture()
        self._start_after = after
        self._built: Iterator[BuiltDocument] = self._build()
        self._ahead: Optional[Ahead[BuiltDocument]] = None
        self._current: Optional[BuiltDocument] = None
        self._emitted, self._replay = 0, replay
        self.episodes_emitted, self.tokens_emitted = episodes, tokens

    def _build(self) -> Iterator[BuiltDocument]:
        """Endless: the next document of the blend -> its episodes, with the state before it."""
        while True:
            before = self._capture()
            s = self._choose_source()
            doc, epoch = self._next_document(s)
            episodes = self.builder.episodes(doc, self._rng, self.skips)
            for ep in episodes:
                ep.meta.update(source=s, epoch=epoch)
            if episodes:  # the unit it came from does not count as idle when it ends
                self._idle_units[s] = -1
            self._taken[s] += len(episodes)
            yield BuiltDocument(before, episodes, s, self._cursors[s].state_dict(), self._epochs(), dict(self.skips))

    def _choose_source(self) -> int:
        """argmin_i episodes_i / w_i (ties to the first)."""
        return int(np.argmin([t / w for w, t in zip(self._weights, self._taken)]))

    def _epochs(self) -> list[int]:
        """Per source, the pass its current unit belongs to (g // U)."""
        return [c.unit() // src.num_units if src.num_units else 0 for c, src in zip(self._cursors, self._sources)]

    def _next_document(self, s: int) -> tuple[Document, int]:
        """The chosen source's next document on this rank and its epoch, reading on through units."""
        source, cursor = self._sources[s], self._cursors[s]
        units = source.num_units
        while True:
            g = cursor.unit()
            if self._reading[s] is None:
                self._reading[s] = source.read(g % units if units else g, cursor.pos())
            item = next(self._reading[s], None)
            if item is not None:
                cursor.advance(item[1])
                return item[0], g // units if units else 0
            self._reading[s] = None
            cursor.next_unit()
            self._idle_units[s] += 1
            if units is not None and self._idle_units[s] >= units:
                raise DataError(
                    f"source {source_name(self.cfg.sources[s])} gave no usable episode in a whole pass ({units} "
                    f"units) over data-parallel rank {self.dp_rank}/{self.dp_size}'s share (skipped so far: "
                    f"{self.skips.report()}; context_len={self.cfg.context_len}, "
                    f"min_context={self.cfg.min_context}, answer_horizon={self.cfg.answer_horizon})")

    def _capture(self) -> dict[str, Any]:
        """The producer's state as plain data (cursors, blend account, RNG, skips)."""
        return {
            "cursors": [c.state_dict() for c in self._cursors],
            "taken": list(self._taken),
            "idle_units": list(self._idle_units),
            "generation": self._generation,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "skips": dict(self.skips),
        }

    # --- the consumer ---------------------------------------------------------------------------------------
    def __iter__(self) -> "EpisodeStream":
        return self

    def __next__(self) -> Episode:
        while self._current is None or self._emitted >= len(self._current.episodes):
            if self._ahead is None and self._depth:
                self._ahead = Ahead(self._built, self._depth)
            self._current = next(self._ahead or self._built)
            self._emitted = 0
            if self._replay is not None:
                self._emitted, self._replay = self._replay, None
        ep = self._current.episodes[self._emitted]
        self._emitted += 1
        self.episodes_emitted += 1
        self.tokens_emitted += len(ep.prompt_ids) + len(ep.continuation_ids)
        return ep

    def take(self, n: int) -> list[Episode]:
        """The next n episodes (under expert parallelism a collective of the EP group when a proxy scores sites:
        the ranks score in step until each has its n)."""
        episodes = [next(self) for _ in range(n)]
        if self.builder.scorer is not None:
            self.builder.scorer.finish()
        return episodes

    def close(self) -> None:
        """Stop the worker thread; the stream stays usable (it rewinds what was built ahead)."""
        if self._ahead is not None:
            self._stop_worker()
            self.load_state_dict(self.state_dict())

    def _stop_worker(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    # --- the cursor -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The cursor: plain python data (checkpoint it with the trainer state)."""
        cur = self._current
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            **copy.deepcopy(self._fingerprint),
            "at_document": copy.deepcopy(self._start if cur is None else cur.before),
            "emitted_from_document": self._replay if cur is None else self._emitted,
            "after_document": (copy.deepcopy(self._start_after) if cur is None else
                               {"source": cur.source, "cursor": copy.deepcopy(cur.cursor_after)}),
            "episodes_emitted": self.episodes_emitted,
            "tokens_emitted": self.tokens_emitted,
        }

    def _check(self, state: dict[str, Any]) -> None:
        """Refuse a cursor of another version, sources, seed or unit layout."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data cursor version {state.get('version')!r}, this code reads {STATE_VERSION}")
        # cursors from before dealing existed read every source undealt
        saved = {k: state.get(k, [1] * len(self._sources) if k == "dealt" else None) for k in self._fingerprint}
        if saved != self._fingerprint:
            raise DataError(f"data cursor was saved for sources {saved['sources']} with seed {saved['seed']}, "
                            f"shard_bytes {saved['shard_bytes']} and units {saved['units']}, this run has "
                            f"{self._fingerprint['sources']} with seed {self.cfg.seed}, shard_bytes "
                            f"{self.cfg.shard_bytes} and units {self._fingerprint['units']} (files added or "
                            f"removed change the units)")

    def _set(self, snap: dict[str, Any]) -> None:
        """Producer state from a capture (all but the RNG), the worker stopped."""
        self._stop_worker()
        self._cursors = [ShardCursor.from_state(c) for c in snap["cursors"]]
        self._taken, self._idle_units = list(snap["taken"]), list(snap["idle_units"])
        self._generation = snap["generation"]
        self.skips.clear()
        self.skips.update(snap["skips"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly from a cursor saved by this data-parallel rank of a stream with the same sources,
        seed and layout (`resume` takes all ranks' cursors, of any layout)."""
        self._adopt_dealing(state)
        self._check(state)
        if state["dp_size"] != self.dp_size or state["dp_rank"] != self.dp_rank:
            raise DataError(
                f"data cursor was saved by data-parallel rank {state['dp_rank']} of {state['dp_size']}, this is "
                f"rank {self.dp_rank} of {self.dp_size}: give resume() the cursors of all ranks to continue the "
                f"stream at another data-parallel size")
        snap = state["at_document"]
        self._set(snap)
        self._rng.bit_generator.state = copy.deepcopy(snap["rng"])
        self._restart(state["emitted_from_document"], state["after_document"], state["episodes_emitted"],
                      state["tokens_emitted"])

    def resume(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue from the cursors of all data-parallel ranks of a run (states[r] of rank r): this rank's own
        when the layout is the same (exact), else the unread rest of every source shared out anew."""
        if len(states) == self.dp_size and all(s.get("dp_size") == self.dp_size for s in states):
            self.load_state_dict(states[self.dp_rank])
            return
        self._adopt_dealing(states[0])
        for s in states:
            self._check(s)
        cursors = []
        for st in states:  # a document some of whose episodes were handed out counts as read
            snap = [dict(c) for c in st["at_document"]["cursors"]]
            if st["emitted_from_document"] and st["after_document"]:
                snap[st["after_document"]["source"]] = st["after_document"]["cursor"]
            cursors.append(snap)
        mine = [i for i in range(len(states)) if i % self.dp_size == self.dp_rank]  # counters shared out
        skips = SkipCounts()
        for i in mine:
            skips.update(states[i]["at_document"]["skips"])
        n = len(self._sources)
        self._set({
            "cursors": [relayout([c[s] for c in cursors], self.dp_size)[self.dp_rank].state_dict()
                        for s in range(n)],
            "taken": [sum(st["at_document"]["taken"][s] for st in states) // self.dp_size for s in range(n)],
            "idle_units": [0] * n,
            "generation": max(st["at_document"]["generation"] for st in states) + 1,
            "skips": dict(skips),
        })
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.cfg.seed, self.dp_rank, self._generation])))
        self._restart(None, None, sum(states[i]["episodes_emitted"] for i in mine),
                      sum(states[i]["tokens_emitted"] for i in mine))

    def metrics(self) -> dict[str, float]:
        """Counters for the metrics log: episodes, tokens, epochs per source, skipped inputs by reason (as of
        the document being handed out)."""
        cur = self._current
        epochs = cur.epochs if cur is not None else [
            ShardCursor.from_state(c).unit() // src.num_units if src.num_units else 0
            for c, src in zip(self._start["cursors"], self._sources)]
        skips = cur.skips if cur is not None else self._start["skips"]
        out: dict[str, float] = {"data/episodes": self.episodes_emitted, "data/tokens": self.tokens_emitted}
        out.update({f"data/epoch/{i}": e for i, e in enumerate(epochs)})
        out.update({f"data/skipped/{r}": n for r, n in skips.items()})
        return out


def data_parallel_stream(cfg: DataConfig, tokenizer: Tokenizer,
                         scorer: Optional["ProxyScorer"] = None) -> EpisodeStream:
    """The stream of this process's data-parallel rank (megatron parallel_state must be initialized)."""
    from megatron.core import parallel_state

    return EpisodeStream(cfg, tokenizer, parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size(), scorer)
