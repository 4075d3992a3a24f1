"""Real English text that works offline: encyclopedic prose from Debian's dictd databases, as JSONL documents with
train and held-out splits by document.

`rntp prepare-data --recipe encyclopedia --output data/encyclopedia` reads (tools/install_corpus.sh unpacks them into
data/dictd, no download at run time)

- FOLDOC, the Free On-line Dictionary of Computing (Debian `dict-foldoc`, GNU FDL 1.1+): ~15,000 articles,
- the Jargon File 4.4.7 (Debian `dict-jargon`, public domain): ~2,300 articles on hacker usage and history,

one document an article ("headword" then its paragraphs, cross-reference braces and dates removed), about 6.5 MB
of prose. A document is held out when crc32(source:headword) % 100 < heldout_percent, so the split depends on the
document alone (never on order or on which other documents exist). The recipe writes DIR/{train,heldout}.jsonl and
tokenizes each into a Megatron dataset DIR/{train,heldout}.{bin,idx,json} (source kind `megatron`; that step is
data/prepare.py's `prepare_encyclopedia`, which reads this module: the two import one way).

It also writes DIR/train_answers: the training documents with the RNTP answer format shown in them (`with_answers`:
every ~`answers_every` characters, `<think></think><answer>` and the next 1..4 characters, `</answer>`, then the text
goes on). Plain text never shows a model those tags, so a model pretrained on it alone never closes a thought or an
answer and every RNTP reward is 0; a pretraining blend with this split teaches the format (with empty thoughts only:
what to think is left to RL).

A dictd database is a gzip (dictzip) file of entries and an index of `headword<TAB>offset<TAB>length` lines, the
numbers in base 64 (A-Z a-z 0-9 + /, most significant digit first).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from pathlib import Path
from typing import Iterator, Sequence

from rntp_megatron.data.sources import DataError

DICTD_ROOT = "data/dictd"  # where tools/install_corpus.sh unpacks the databases
ENCYCLOPEDIA = (("foldoc", "dict-foldoc"), ("jargon", "dict-jargon"))  # (database, Debian package)
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BRACES = re.compile(r"\{([^{}]*)\}")
_DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")
_DOMAIN = re.compile(r"^(<[^>]*>\s*)+")


def b64_number(digits: str) -> int:
    """dictd's base-64 number: 'Gb9L' -> 6*64^3 + 27*64^2 + 61*64 + 11."""
    value = 0
    for ch in digits:
        value = value * 64 + B64.index(ch)
    return value


def article_text(entry: str) -> tuple[str, str]:
    """(headword, prose) of one dictd entry: the first paragraph is the headword block, the rest are the body's
    paragraphs with their lines joined, cross-references {x} unbraced, domain tags <...> and date lines dropped."""
    paragraphs = [p for p in re.split(r"\n\s*\n", entry.strip("\n")) if p.strip()]
    if not paragraphs:
        return "", ""
    title = paragraphs[0].splitlines()[0].strip()
    body = []
    for p in paragraphs[1:]:
        text = " ".join(line.strip() for line in p.splitlines())
        text = _DOMAIN.sub("", _BRACES.sub(r"\1", text)).strip()
        if text and not _DATE.match(text):
            body.append(text)
    return title, "\n\n".join(body)


def dictd_articles(name: str, root: str = DICTD_ROOT) -> Iterator[tuple[str, str]]:
    """(headword, prose) of each article of dictd database `name`, in file order, one per entry (headwords that
    share an entry give it once), metadata entries (00-database-*) skipped."""
    index, data = Path(root) / f"{name}.index", Path(root) / f"{name}.dict.dz"
    if not index.exists() or not data.exists():
        raise DataError(f"no dictd database {name!r} under {root} ({index.name}, {data.name}); install it with "
                        f"tools/install_corpus.sh")
    raw = gzip.decompress(data.read_bytes())
    seen = set()
    spans = []
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        span = (b64_number(parts[1]), b64_number(parts[2]))
        if span not in seen:
            seen.add(span)
            spans.append(span)
    for start, length in sorted(spans):
        title, text = article_text(raw[start:start + length].decode("utf-8", errors="replace"))
        if title and text:
            yield title, text


def is_heldout(doc_key: str, heldout_percent: float) -> bool:
    """Whether a document goes to the held-out split: crc32 of its key, mod 100, below the percentage."""
    return zlib.crc32(doc_key.encode("utf-8")) % 100 < heldout_percent


def with_answers(text: str, key: str, every: int, horizon: int = 4, thought_chars: int = 0,
                 tags: tuple[str, str, str, str] = ("<think>", "</think>", "<answer>", "</answer>")) -> str:
    """`text` with a thought and an answer before sites t about `every` characters apart (gaps uniform in
    [every/2, 3 every/2], answer lengths k uniform in 1..horizon, seeded by `key`):
    ... x_<t <think> x_{t-m:t} </think><answer> x_{t:t+k} </answer> x_t ...
    The thought restates the last m characters, m uniform in 0..thought_chars (0: always empty)."""
    rng = random.Random(zlib.crc32(key.encode("utf-8")))
    think, close, answer, answer_close = tags
    parts, pos = [], 0
    while True:
        t = pos + rng.randint(max(every // 2, 1), max(3 * every // 2, 1))
        k = rng.randint(1, horizon)
        if t + k > len(text):
            break
        m = rng.randint(0, thought_chars) if thought_chars else 0
        parts += [text[pos:t], think, text[t - m:t], close, answer, text[t:t + k], answer_close]
        pos = t
    return "".join(parts) + text[pos:]


def write_splits(databases: Sequence[str], out_dir: str | Path, heldout_percent: float = 5.0,
                 root: str = DICTD_ROOT, answers_every: int = 96, thought_chars: int = 0
                 ) -> dict[str, dict[str, int]]:
    """DIR/train.jsonl, DIR/heldout.jsonl and DIR/train_answers.jsonl (the train documents `with_answers`; none
    when answers_every is 0) as {"id", "text"} lines from the databases; {split: {documents, bytes}}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = ("train", "heldout", "train_answers") if answers_every else ("train", "heldout")
    counts = {s: {"documents": 0, "bytes": 0} for s in splits}
    files = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in counts}
    try:
        for name in databases:
            for title, text in dictd_articles(name, root):
                key = f"{name}:{title}"
                split = "heldout" if is_heldout(key, heldout_percent) else "train"
                doc = f"{title}\n\n{text}"
                writes = [(split, doc)]
                if split == "train" and answers_every:
                    writes.append(("train_answers", with_answers(doc, key, answers_every, thought_chars=thought_chars)))
                for target, body in writes:
                    files[target].write(json.dumps({"id": key, "text": body}, ensure_ascii=False) + "\n")
                    counts[target]["documents"] += 1
                    counts[target]["bytes"] += len(body.encode("utf-8"))
    finally:
        for f in files.values():
            f.close()
    return counts
