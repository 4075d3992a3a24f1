"""The offline encyclopedia corpus (data/corpora.py): dictd parsing on a database built here, and the real FOLDOC +
Jargon File databases that tools/install_corpus.sh unpacks (make test runs it)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from rntp_megatron.data.corpora import (B64, DataError, ENCYCLOPEDIA, article_text, b64_number, dictd_articles,
                                        is_heldout, with_answers, write_splits)

DICTD = Path(__file__).resolve().parents[1] / "data" / "dictd"


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = B64[n % 64] + digits
        n //= 64
        if not n:
            return digits


def _database(root: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """A dictd database: entries (headwords, text) concatenated, every headword indexed to its entry's span."""
    data, index = b"00-database-info\n  about\n", ["00-database-info\tA\tZ"]
    for heads, text in entries:
        raw = text.encode("utf-8")
        index += [f"{h}\t{_b64(len(data))}\t{_b64(len(raw))}" for h in heads]
        data += raw
    (root / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    (root / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")


def test_b64_numbers():
    assert b64_number("A") == 0 and b64_number("/") == 63
    assert b64_number("Gb9L") == 6 * 64**3 + 27 * 64**2 + 61 * 64 + 11
    assert all(b64_number(_b64(n)) == n for n in (0, 1, 63, 64, 4095, 123456789))


def test_article_text_joins_lines_and_drops_markup():
    entry = ("abstract data type\nADT\n\n   <programming> (ADT) A kind of {data\n   abstraction} hidden behind"
             " {access functions}.\n\n   Second   paragraph.\n\n   (2003-07-03)\n\n")
    title, text = article_text(entry)
    assert title == "abstract data type"
    assert text == "(ADT) A kind of data abstraction hidden behind access functions.\n\nSecond   paragraph."


def test_dictd_articles_dedupes_shared_entries_and_skips_metadata(tmp_path):
    _database(tmp_path, "toy", [(["alpha", "ALPHA"], "alpha\n\n   First {letter}.\n\n"),
                                (["beta"], "beta\n\n   Second letter.\n   (1999-01-01)\n\n")])
    assert list(dictd_articles("toy", str(tmp_path))) == [("alpha", "First letter."), ("beta", "Second letter. (1999-01-01)")]
    with pytest.raises(DataError, match="install_corpus.sh"):
        next(dictd_articles("missing", str(tmp_path)))


def test_splits_are_by_document_and_stable(tmp_path):
    entries = [([f"w{i}"], f"w{i}\n\n   Article number {i} of the toy database.\n\n") for i in range(200)]
    _database(tmp_path, "toy", entries)
    counts = write_splits(["toy"], tmp_path / "out", heldout_percent=20, root=str(tmp_path))
    rows = {s: [json.loads(line) for line in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "heldout")}
    assert counts["train"]["documents"] + counts["heldout"]["documents"] == 200
    assert counts["train_answers"]["documents"] == counts["train"]["documents"]
    assert 20 <= counts["heldout"]["documents"] <= 60  # ~20% of 200
    assert all(is_heldout(r["id"], 20) for r in rows["heldout"]) and not any(is_heldout(r["id"], 20) for r in rows["train"])
    assert rows["heldout"][0]["text"].startswith(rows["heldout"][0]["id"].split(":", 1)[1] + "\n\n")


def test_answers_show_the_format_and_copy_the_next_characters():
    text = "The quick brown fox jumps over the lazy dog, and the dog does not mind it at all, not one bit. " * 3
    shown = with_answers(text, "doc", every=20, horizon=4)
    assert shown == with_answers(text, "doc", every=20, horizon=4)  # seeded by the document
    pieces = shown.split("<think></think><answer>")
    assert 8 <= len(pieces) - 1 <= 30  # one every ~20 characters of 291
    rebuilt = pieces[0]
    for piece in pieces[1:]:
        answer, rest = piece.split("</answer>", 1)
        assert 1 <= len(answer) <= 4 and rest.startswith(answer)  # the answer is the text that follows
        rebuilt += rest
    assert rebuilt == text


def test_answer_thoughts_restate_the_characters_before_the_site():
    text = "Abstract interpretation is a partial execution of a program which gains information about it. " * 2
    shown = with_answers(text, "doc", every=20, thought_chars=6)
    before, seen = shown.split("<think>")[0], 0
    for piece in shown.split("<think>")[1:]:
        thought, rest = piece.split("</think>", 1)
        assert len(thought) <= 6 and before.endswith(thought)  # the last m characters of the text so far
        seen += bool(thought)
        before += rest.split("</answer>", 1)[1]
    assert seen >= 3 and before == text


def test_real_encyclopedia_is_over_5_mb_of_prose(tmp_path):
    if not all((DICTD / f"{db}.index").exists() for db, _ in ENCYCLOPEDIA):
        if os.environ.get("CI"):
            pytest.fail("make test runs tools/install_corpus.sh: data/dictd is missing")
        pytest.skip("run tools/install_corpus.sh first")
    counts = write_splits([db for db, _ in ENCYCLOPEDIA], tmp_path, root=str(DICTD))
    total = counts["train"]["bytes"] + counts["heldout"]["bytes"]
    assert total > 5e6 and counts["train"]["documents"] > 10_000
    assert 0.03 < counts["heldout"]["documents"] / (counts["train"]["documents"] + counts["heldout"]["documents"]) < 0.07
    docs = {}
    for split in ("train", "heldout"):
        docs.update((d["id"], d["text"]) for d in map(json.loads, (tmp_path / f"{split}.jsonl").open()))
    assert "A kind of data abstraction where a type's internal form is hidden" in docs["foldoc:abstract data type"]
