"""Which units of a source a data-parallel rank reads, and the translation of that to another layout.

A source's units, pass after pass, form one global sequence: global unit g is unit g % U of epoch g // U (U
units a pass; an endless source has epoch 0 only). A layout of D ranks deals the sequence out in rounds: rank
r reads g = base + k*D + r for k = 0, 1, 2, ..., after first finishing its `leftovers` (units a previous
layout had begun or not reached). So every unit of every epoch is read by exactly one rank, a rank opens only
its own units, and a source with fewer units than ranks still keeps every rank busy (a rank then reads
another epoch of the same unit). The cursor is (base, round, position in the unit, leftovers): small, plain
data, exact.

Re-layout (elastic resume at another D): given every rank's cursor of the old layout, the units not finished
are each rank's leftovers, its unit in progress (from its position) and the units of its rounds before K, the
first round that no rank had begun. They are sorted by g and dealt round robin to the new ranks as their
leftovers, and the new rounds start at base + K*D. Units sort ascending and rounds follow leftovers, so a rank
reads g in increasing order: it never goes back to an earlier epoch.

Dealing by document (`DealtSource`): a source with fewer units U than ranks D would have several ranks read
the same unit's text at once (in different epochs). It is read as U*m units instead, m = ceil(D / U): unit
u*m + j holds the records (documents and skipped inputs) of unit u whose index i in it has i % m == j, so each
of the first D ranks reads
text no other rank reads in that pass. m is fixed by the layout a run starts with and kept by its resumes
(the cursors' units are numbered with it), so exact and elastic resume work on the dealt units as on any.
Each of the m readers of a unit parses all of it (m times the unit's reading; small by construction).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from rntp_megatron.data.sources import DataError, Document, Position, SkipCounts, Source

DEALT_KEY = "dealt_index"  # a dealt unit's position: the inner unit's, plus the index of the next document


def dealing_ways(num_units: Optional[int], dp_size: int) -> int:
    """m = ceil(D / U) ways each unit is dealt by document when U < D, else 1 (an endless source: 1)."""
    if not num_units or num_units >= dp_size:
        return 1
    return -(-dp_size // num_units)


class DealtSource(Source):
    """`inner`'s units dealt `ways` ways by record (module docstring): unit u*m + j of this source holds the
    records i of inner unit u with i % m == j, a record being a document or a skipped input (counted by the
    inner source into `private_skips`), so each skip is counted once, by the rank it is dealt to."""

    def __init__(self, inner: Source, private_skips: SkipCounts, skips: SkipCounts, ways: int) -> None:
        super().__init__(inner.src, inner.max_bytes, skips)
        self.inner, self.ways, self._private = inner, ways, private_skips
        self.num_units = None if inner.num_units is None else inner.num_units * ways

    def read(self, unit: int, pos: Position) -> Iterator[tuple[Document, Position]]:
        """Documents of inner unit unit // m whose record index is unit % m modulo m, from `pos`."""
        inner_unit, j = divmod(unit, self.ways)
        index = pos.get(DEALT_KEY, 0)
        self._private.clear()
        for doc, after in self.inner.read(inner_unit, {k: v for k, v in pos.items() if k != DEALT_KEY}):
            index = self._deal_skips(index, j) + 1
            if (index - 1) % self.ways == j:
                yield doc, {**after, DEALT_KEY: index}
        self._deal_skips(index, j)

    def _deal_skips(self, index: int, j: int) -> int:
        """The inputs skipped since the last document take the next record indices; count this reader's."""
        for reason in list(self._private.elements()):
            if index % self.ways == j:
                self.skips.add(reason)
            index += 1
        self._private.clear()
        return index


@dataclass
class ShardCursor:
    """Rank dp_rank of dp_size in one source's global unit sequence."""

    dp_rank: int
    dp_size: int
    base: int = 0
    round: int = 0
    position: Position = field(default_factory=dict)  # in the unit of the current round
    leftovers: list[tuple[int, Position]] = field(default_factory=list)  # (g, position), read first, in order

    def unit(self) -> int:
        """The global unit being read."""
        return self.leftovers[0][0] if self.leftovers else self.base + self.round * self.dp_size + self.dp_rank

    def pos(self) -> Position:
        """The position in the unit being read ({}: its start)."""
        return self.leftovers[0][1] if self.leftovers else self.position

    def advance(self, pos: Position) -> None:
        """A document was read: the unit continues from `pos`."""
        if self.leftovers:
            self.leftovers[0] = (self.leftovers[0][0], pos)
        else:
            self.position = pos

    def next_unit(self) -> None:
        """The unit being read is done: the next leftover, else the next round."""
        if self.leftovers:
            self.leftovers.pop(0)
        else:
            self.round, self.position = self.round + 1, {}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON and torch.load(weights_only=True) read it)."""
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "base": self.base, "round": self.round,
                "position": dict(self.position), "leftovers": [[g, dict(p)] for g, p in self.leftovers]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ShardCursor":
        s = copy.deepcopy(state)
        return cls(s["dp_rank"], s["dp_size"], s["base"], s["round"], s["position"],
                   [(int(g), p) for g, p in s["leftovers"]])


def relayout(states: Sequence[dict[str, Any]], dp_size: int) -> list[ShardCursor]:
    """Cursors of all ranks of one layout -> the cursors of dp_size ranks that read exactly the units (and the
    rest of the units in progress) that the old ranks had not read, then go on in rounds of dp_size."""
    old = [ShardCursor.from_state(s) for s in states]
    size = len(old)
    if {(c.dp_size, c.base) for c in old} != {(size, old[0].base)} or [c.dp_rank for c in old] != list(range(size)):
        raise DataError(f"data cursors of {size} ranks do not form one layout: "
                        f"{[(c.dp_rank, c.dp_size, c.base) for c in old]}")
    first_unstarted = max(c.round + (0 if c.leftovers else 1) for c in old)
    remaining: list[tuple[int, Position]] = []
    for c in old:
        remaining += c.leftovers
        rounds = range(c.round, first_unstarted)
        for k in rounds:
            started = k == c.round and not c.leftovers
            remaining.append((old[0].base + k * size + c.dp_rank, dict(c.position) if started else {}))
    remaining.sort(key=lambda item: item[0])
    base = old[0].base + first_unstarted * size
    return [ShardCursor(r, dp_size, base, 0, {}, remaining[r::dp_size]) for r in range(dp_size)]
