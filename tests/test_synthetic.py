"""The synthetic RNTP corpus: labels, answers and thoughts checked against an independent re-reading of the text."""

from __future__ import annotations

import re

import pytest

from rntp_megatron.data.synthetic import (ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, SyntheticSpec,
                                          synthetic_documents, worked_answer)

SPEC = SyntheticSpec()


def bindings_of(text: str) -> dict[str, str]:
    """name -> value of every `Nv;` binding (name upper case where bound) before the first query/drill bar."""
    head = re.match(r"^[%#*]((?:[A-Z][a-z0-9];)+)", text)
    assert head, f"no binding section in {text!r}"
    pairs = [b for b in head.group(1).split(";") if b]
    names = [b[0].lower() for b in pairs]
    assert len(set(names)) == len(names), f"a name is bound twice in {text!r}"
    return {b[0].lower(): b[1] for b in pairs}


def chase(bindings: dict[str, str], name: str) -> str:
    """The worked thought for `name`: each binding on the way to a digit, as written (`Kq;Qm;Mx;X7`)."""
    path = [name.upper() + bindings[name]]
    while not path[-1][-1].isdigit():
        path.append(path[-1][-1].upper() + bindings[path[-1][-1]])
        assert len(path) < 30, "cycle in bindings"
    return ";".join(path)


def docs(n: int = 300, **kw):
    return list(synthetic_documents(7, "train", count=n, **kw))


def test_labels_cover_text_and_sites_match_labels():
    for doc in docs():
        text, labels = doc["text"], doc["labels"]
        assert len(labels) == len(text)
        assert set(labels) <= set("TCI.")
        marked = [i for i, c in enumerate(labels) if c != "."]
        assert marked == [s["pos"] for s in doc["sites"]]
        for s in doc["sites"]:
            assert text[s["pos"]] == s["answer"] and labels[s["pos"]] == s["cls"]


def test_answers_and_thoughts_follow_the_bindings():
    seen_hops, repeats = set(), 0
    for doc in (d for d in docs() if d["kind"] != "repeat"):
        text = doc["text"]
        b = bindings_of(text)
        answered = {}
        for s in doc["sites"]:
            if s["cls"] in "CT":
                assert s["query"] in b and s["thought"] == chase(b, s["query"]), text
                assert s["answer"] == s["thought"][-1]
                seen_hops.add(s["thought"].count(";"))
            if s["cls"] == "C":
                assert s["query"] not in answered, f"a C query is asked twice in {text!r}"
                answered[s["query"]] = s["answer"]
            elif s["cls"] == "T":  # trivial: the same query was answered earlier in the document
                assert answered[s["query"]] == s["answer"]
                repeats += 1
            else:
                assert s["cls"] == "I" and s["answer"].isdigit() and text[s["pos"] + 1] == ";"
    # a query never asks for a shortcut: its chain has at least min_hops letter-to-letter links
    assert seen_hops == set(range(SPEC.min_hops, SPEC.max_hops + 1))
    assert repeats > 0


def test_query_forms_by_kind():
    every = {k: 1 for k in ("textbook", "plain", "drill", "terse", "repeat")}
    kinds = {k: [d for d in docs(400, kinds=every) if d["kind"] == k] for k in every}
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    for d in kinds["textbook"]:
        assert d["text"][0] == "%"
        for s in (s for s in d["sites"] if s["cls"] == "C"):
            worked = THINK_OPEN + worked_answer(s["thought"], s["answer"])
            assert s["query"] + "?" + worked in d["text"]
            # the labelled answer sits inside the answer tags
            assert d["text"][s["pos"] - len(ANSWER_OPEN):s["pos"]] == ANSWER_OPEN
    for d in kinds["terse"]:
        assert d["text"][0] == "#" and THINK_OPEN not in d["text"]
    for d in kinds["drill"]:
        b = bindings_of(d["text"])
        chains = d["text"].split("|", 1)[1].strip().rstrip(",").split(",")
        assert len(chains) == SPEC.n_chains and all(c == chase(b, c[0].lower()) for c in chains)
    for d in kinds["repeat"]:  # a word repeated: every character after the first period is a copy
        text = d["text"][1:].rstrip("\n")
        period = next(p for p in range(1, len(text)) if all(text[i] == text[i - p] for i in range(p, len(text))))
        assert d["text"][0] == "@" and not d["sites"] and 3 <= period <= 12 and len(text) == SPEC.repeat_length
    thoughts = [t.split(THINK_CLOSE)[0] for d in kinds["plain"] for t in d["text"].split(THINK_OPEN)[1:]]
    fillers = [t for t in thoughts if not t[:1].isalpha()]
    assert fillers and len(fillers) < len(thoughts), "plain documents mix filler and worked thoughts"
    assert all(set(t) <= set(".-") for t in fillers)


def test_deterministic_and_splits_disjoint():
    a = [d["text"] for d in synthetic_documents(3, "train", count=50)]
    assert a == [d["text"] for d in synthetic_documents(3, "train", count=50)]
    held = {d["text"] for d in synthetic_documents(3, "heldout", count=2000)}
    train = {d["text"] for d in synthetic_documents(3, "train", count=2000)}
    assert not held & train
    assert a != [d["text"] for d in synthetic_documents(4, "train", count=50)]


def test_answer_digits_are_balanced():
    counts = {str(d): 0 for d in range(10)}
    for doc in docs(1000, kinds={"terse": 1}):
        for s in doc["sites"]:
            if s["cls"] == "C":
                counts[s["answer"]] += 1
    total = sum(counts.values())
    assert all(abs(c / total - 0.1) < 0.03 for c in counts.values()), counts


def test_difficulty_knobs_and_errors():
    hard = SyntheticSpec(n_chains=4, min_hops=5, max_hops=5, n_distractors=1, queries=4)
    for doc in synthetic_documents(1, "heldout", hard, kinds={"terse": 1}, count=20):
        assert len(bindings_of(doc["text"])) == 4 * 6 + 1
        assert all(len(s["thought"]) == 17 for s in doc["sites"] if s["cls"] == "C")
    with pytest.raises(ValueError, match="queries=4 n_chains=2"):
        next(synthetic_documents(0, "train", SyntheticSpec(queries=4)))
    with pytest.raises(ValueError, match="repeats=3 queries=2"):
        next(synthetic_documents(0, "train", SyntheticSpec(repeats=3)))
    with pytest.raises(ValueError, match="needs 31 variable names"):
        next(synthetic_documents(0, "train", SyntheticSpec(n_chains=5, max_hops=5, n_distractors=1)))
    with pytest.raises(ValueError, match="split must be one of"):
        next(synthetic_documents(0, "test"))
    with pytest.raises(ValueError, match="kind_weights"):
        next(synthetic_documents(0, "train", kinds={"poem": 1}))
