"""The synthetic RNTP corpus: lookup-chain documents whose next tokens are labelled T, C or I.

A document binds variables in shuffled `NAME value;` pairs, e.g. `X7;Mx;Qm;Kq;Z4;`, where `Mx` means
m = x. A name is written in upper case where it is bound and in lower case where it is used (as a value, a
query or in a thought), so each hop of a lookup is one unambiguous copy: find the binding of `x` (`X`) and copy
the character after it. Bindings form `n_chains` chains of `hops` letter-to-letter links ending in a digit, plus
`n_distractors` unreferenced digit bindings. A query `k?` asks the digit at the end of k's chain:

    T trivial    the digit answering a query asked again: a copy of its earlier answer in the document
    C computable the digit answering a query: determined by the context, but only after `hops` serial
                 lookups, which a small model cannot do in one forward pass
    I impossible the digit of a root or distractor binding: fresh random, chance 1/10

A query is written in one of three forms (the thought format is exactly what the RL policy writes):

    terse   `k?7 `
    worked  `k?<think>Kq;Qm;Mx;X7</think><answer>7</answer> `  (each binding of the chain copied in order)
    filler  `k?<think>..</think><answer>7</answer> `        (no working, 0-5 characters that are never letters)

Document kinds, told apart by their first character:

    `%` textbook  every query worked (the marker lets a prompt ask for working before RL)
    `#` plain     queries mixed: mostly filler or terse, a few worked (what RL starts from)
    `*` drill     the bindings, then every chain chased at once `|Kq;Qm;Mx;X7,Dz;Zp;P3,...` (trains the lookups)
    `@` repeat    a random word repeated, `@x7Kb.x7Kb.x7Kb.` (no sites): the in-context copying it teaches at
                  once is the induction a lookup needs (find the earlier `Q`, copy what followed); without it,
                  a tiny model sat for thousands of steps at unigram statistics on lookups alone
    `#` terse     plain documents with every query terse (RL and evaluation sites; no thoughts shown)

Every document carries `labels` (one of "T", "C", "I", "." per character of `text`) and `sites`
(position, class, true answer, the worked thought) so episodes can be built at C, I and T sites. Splits
draw from disjoint seed spaces: "train" and "heldout" never produce the same random stream.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Iterator, Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MARKERS = {"textbook": "%", "plain": "#", "terse": "#", "drill": "*", "repeat": "@"}
SPLITS = ("train", "heldout")
KINDS = ("textbook", "plain", "drill", "terse", "repeat")
FILLER_CHARS = ".-"  # never a letter: a filler thought cannot be mistaken for the start of working
NAMES = string.ascii_lowercase
REPEAT_CHARS = string.ascii_letters + string.digits + ";?.-"
DIGITS = string.digits


@dataclass(frozen=True)
class SyntheticSpec:
    """Difficulty and mix of the corpus. `kind_weights` are the document kinds' shares of a training
    stream; `plain_forms` the shares of query forms inside plain documents."""

    n_chains: int = 2
    min_hops: int = 2
    max_hops: int = 2
    n_distractors: int = 1
    queries: int = 2  # per document, each on a different chain (<= n_chains)
    repeats: int = 1  # queries asked again after them (T sites; <= queries)
    kind_weights: dict = field(default_factory=lambda: {"repeat": 0.5, "drill": 0.3, "textbook": 0.15,
                                                        "plain": 0.05})
    plain_forms: dict = field(default_factory=lambda: {"filler": 0.55, "terse": 0.3, "worked": 0.15})
    filler_length: tuple = (0, 5)
    repeat_word: tuple = (3, 12)  # length range of a repeat document's word
    repeat_length: int = 48  # characters of a repeat document after its marker

    def validate(self) -> None:
        """Raise ValueError naming the knob that cannot make documents."""
        if not 1 <= self.min_hops <= self.max_hops:
            raise ValueError(f"need 1 <= min_hops <= max_hops, got min_hops={self.min_hops} "
                             f"max_hops={self.max_hops}")
        if not 1 <= self.queries <= self.n_chains:
            raise ValueError(f"need 1 <= queries <= n_chains, got queries={self.queries} n_chains={self.n_chains}")
        if not 0 <= self.repeats <= self.queries:
            raise ValueError(f"need 0 <= repeats <= queries, got repeats={self.repeats} queries={self.queries}")
        names_needed = self.n_chains * (self.max_hops + 1) + self.n_distractors
        if names_needed > len(NAMES):
            raise ValueError(f"n_chains={self.n_chains} x (max_hops={self.max_hops} + 1) + n_distractors="
                             f"{self.n_distractors} needs {names_needed} variable names, only {len(NAMES)} exist")
        for name, weights, allowed in (("kind_weights", self.kind_weights, KINDS),
                                       ("plain_forms", self.plain_forms, ("filler", "terse", "worked"))):
            unknown = set(weights) - set(allowed)
            if unknown or sum(weights.values()) <= 0 or min(weights.values()) < 0:
                raise ValueError(f"{name} must give non-negative weights to {allowed} (positive sum), got {weights}")


@dataclass(frozen=True)
class Chain:
    """names[0] is the queried tail, names[-1] is bound to `digit`; names[i] is bound to names[i+1]."""

    names: tuple[str, ...]
    digit: str

    @property
    def thought(self) -> str:
        """The worked thought: the chain's bindings in order, exactly as written in the context (`Kq;Qm;Mx;X7`),
        so that each lookup matches the binding's text (`;Q` -> `m`) like the copying of repeat documents."""
        values = self.names[1:] + (self.digit,)
        return ";".join(name.upper() + value for name, value in zip(self.names, values))


class _Writer:
    """Appends text with one label per character and records sites."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.labels: list[str] = []
        self.sites: list[dict] = []
        self.length = 0

    def put(self, piece: str, label: str = ".") -> int:
        """Append `piece`, every character labelled `label`; returns its start position."""
        start = self.length
        self.text.append(piece)
        self.labels.append(label * len(piece))
        self.length += len(piece)
        return start

    def document(self, kind: str) -> dict:
        """The text written so far as a document of `kind`: {"text", "labels", "sites", "kind"}."""
        return {"text": "".join(self.text), "labels": "".join(self.labels), "sites": self.sites, "kind": kind}

    def site(self, piece: str, cls: str, thought: str = "", query: str = "") -> None:
        """Append a one-character labelled token and record it as a site."""
        pos = self.put(piece, cls)
        self.sites.append({"pos": pos, "cls": cls, "answer": piece, "thought": thought, "query": query})


def _rng(seed: int, split: str, index: int) -> random.Random:
    """The random stream of document `index`; the split is part of the seed, so splits are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"rntp-synthetic/{split}/{seed}/{index}")


def make_chains(rng: random.Random, spec: SyntheticSpec) -> tuple[list[Chain], list[tuple[str, str]]]:
    """Random chains and distractor (name, digit) bindings with distinct names."""
    hops = [rng.randint(spec.min_hops, spec.max_hops) for _ in range(spec.n_chains)]
    names = rng.sample(NAMES, sum(h + 1 for h in hops) + spec.n_distractors)
    chains, at = [], 0
    for h in hops:
        chains.append(Chain(tuple(names[at:at + h + 1]), rng.choice(DIGITS)))
        at += h + 1
    distractors = [(n, rng.choice(DIGITS)) for n in names[at:]]
    return chains, distractors


def _write_bindings(w: _Writer, rng: random.Random, chains: list[Chain], distractors: list[tuple[str, str]],
                    ) -> None:
    """Shuffled `NAME value;` bindings; digit values are I sites."""
    bindings = [(c.names[i], c.names[i + 1]) for c in chains for i in range(len(c.names) - 1)]
    bindings += [(c.names[-1], c.digit) for c in chains] + distractors
    rng.shuffle(bindings)
    for name, value in bindings:
        w.put(name.upper())
        if value in DIGITS:
            w.site(value, "I")
        else:
            w.put(value)
        w.put(";")


def _write_query(w: _Writer, chain: Chain, form: str, rng: random.Random, spec: SyntheticSpec, cls: str) -> None:
    """`name?` then the answer in `form` (terse, worked or filler); the answer digit is a site of class `cls`."""
    w.put(chain.names[0] + "?")
    if form == "terse":
        w.site(chain.digit, cls, chain.thought, chain.names[0])
    else:
        body = chain.thought if form == "worked" else "".join(
            rng.choice(FILLER_CHARS) for _ in range(rng.randint(*spec.filler_length)))
        w.put(THINK_OPEN + body + THINK_CLOSE + ANSWER_OPEN)
        w.site(chain.digit, cls, chain.thought, chain.names[0])
        w.put(ANSWER_CLOSE)
    w.put(" ")


def _pick(rng: random.Random, weights: dict) -> str:
    keys = sorted(weights)
    return rng.choices(keys, [weights[k] for k in keys])[0]


def make_document(rng: random.Random, kind: str, spec: SyntheticSpec) -> dict:
    """One document of `kind`: {"text", "labels", "sites", "kind"} (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    w = _Writer()
    w.put(MARKERS[kind])
    if kind == "repeat":
        word = "".join(rng.choice(REPEAT_CHARS) for _ in range(rng.randint(*spec.repeat_word)))
        w.put((word * (spec.repeat_length // len(word) + 1))[:spec.repeat_length] + "\n")
        return w.document(kind)
    chains, distractors = make_chains(rng, spec)
    _write_bindings(w, rng, chains, distractors)
    if kind == "drill":
        w.put("|")
        for chain in rng.sample(chains, len(chains)):
            w.put(chain.thought + ",")
    else:
        asked = rng.sample(chains, spec.queries)
        for chain, cls in [(c, "C") for c in asked] + [(c, "T") for c in rng.sample(asked, spec.repeats)]:
            form = {"textbook": "worked", "terse": "terse"}.get(kind) or _pick(rng, spec.plain_forms)
            _write_query(w, chain, form, rng, spec, cls)
    w.put("\n")
    return w.document(kind)


def synthetic_spec(options: dict) -> tuple[SyntheticSpec, Optional[dict]]:
    """SyntheticSpec and document kinds from a source's `synthetic:` options (SyntheticSpec fields + "kinds")."""
    options = dict(options)
    kinds = options.pop("kinds", None)
    known = set(SyntheticSpec.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"data.sources[].synthetic: unknown options {sorted(unknown)} (known: kinds, "
                         f"{', '.join(sorted(known))})")
    if "filler_length" in options:
        options["filler_length"] = tuple(options["filler_length"])
    return SyntheticSpec(**options), kinds


def synthetic_documents(seed: int, split: str = "train", spec: Optional[SyntheticSpec] = None,
                        kinds: Optional[dict] = None, count: Optional[int] = None) -> Iterator[dict]:
    """Documents i = 0, 1, ... (`count` of them, or endless) of `split`, kinds drawn from `kinds` (default
    spec.kind_weights; e.g. {"terse": 1} for RL sites). Each dict: text, labels (len(text) chars of
    T/C/I/.), sites [{pos, cls, answer, thought, query}], kind, id. Deterministic in (seed, split, i)."""
    spec = spec or SyntheticSpec()
    spec.validate()
    weights = kinds if kinds is not None else spec.kind_weights
    SyntheticSpec(kind_weights=weights).validate()
    index = 0
    while count is None or index < count:
        yield synthetic_document(seed, split, index, spec, weights)
        index += 1


def synthetic_document(seed: int, split: str, index: int, spec: SyntheticSpec, weights: dict) -> dict:
    """Document `index` of `split` alone (random access: its stream depends on (seed, split, index) only);
    `spec` and `weights` are validated by the caller."""
    rng = _rng(seed, split, index)
    doc = make_document(rng, _pick(rng, weights), spec)
    doc["id"] = f"synthetic-{split}-{seed}-{index}"
    return doc


def worked_answer(thought: str, answer: str) -> str:
    """What the policy writes after `<think>` for a thought and an answer."""
    return thought + THINK_CLOSE + ANSWER_OPEN + answer + ANSWER_CLOSE
