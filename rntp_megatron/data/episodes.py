"""Document -> chunks -> sites -> Episodes, with the prompt template of DataConfig (docs/method.md, section 1).

A document's tokens are cut into consecutive chunks of at most `context_len` tokens; each chunk gets up to
`sites_per_chunk` sites t, and site t becomes an Episode whose prompt is the template around x_<t (the chunk
up to t) and whose target is x_{t:t+K}. Sites of one chunk share the chunk's prefix, so their prompts share
a prefix too (prefix caching makes them cheap to roll out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from rntp_megatron.config import DataConfig
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.sites import select_sites
from rntp_megatron.data.sources import DataError, Document, SkipCounts
from rntp_megatron.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # the scorer runs a GPTModel: megatron is imported only by who builds one
    from rntp_megatron.data.proxy import ProxyScorer


def chunk_tokens(ids: np.ndarray, context_len: int, min_len: int) -> list[np.ndarray]:
    """ids[N] cut into consecutive pieces of context_len tokens; a last piece shorter than min_len is dropped."""
    chunks = [ids[i: i + context_len] for i in range(0, len(ids), context_len)]
    return [c for c in chunks if len(c) >= min_len]


def interleave(site_episodes: list[Episode]) -> list[Episode]:
    """The sites of one chunk (in order) as one interleaved episode: the first site's episode, with
    meta["segments"][j] = {site, text_ids (the chunk's tokens from site j-1 to site j; empty for j = 0),
    continuation_ids, continuation_text, token_class} of every site j."""
    first = site_episodes[0]
    starts = [first.site] + [e.site for e in site_episodes[:-1]]
    segments = [{"site": e.site, "text_ids": e.context_ids[start:], "continuation_ids": e.continuation_ids,
                 "continuation_text": e.continuation_text, "token_class": e.token_class}
                for start, e in zip(starts, site_episodes)]
    return [Episode(first.prompt_ids, first.context_ids, first.continuation_ids, first.continuation_text, first.site,
                    first.doc_id, first.token_class, {**first.meta, "segments": segments})]


class EpisodeBuilder:
    """Turns documents into Episodes under one DataConfig and tokenizer (and a proxy scorer when the site
    selection needs one)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, scorer: Optional["ProxyScorer"] = None) -> None:
        if cfg.site_selection != "uniform" and scorer is None:
            raise ValueError(f"data.site_selection={cfg.site_selection!r} needs a ProxyScorer (a proxy model)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.scorer = scorer
        before, after = cfg.prompt_template.split("{context}")
        self.prompt_prefix = tokenizer.encode(before) if before else []
        self.prompt_suffix = tokenizer.encode(after) if after else []

    def document_ids(self, doc: Document, skips: SkipCounts) -> Optional[np.ndarray]:
        """Token ids of a document, or None (counted as bad_token_id) when ids fall outside the vocab."""
        if doc.token_ids is None:
            return np.asarray(self.tokenizer.encode(doc.text or ""), dtype=np.int64)
        ids = np.asarray(doc.token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            skips.add("bad_token_id")
            return None
        return ids

    def episodes(self, doc: Document, rng: np.random.Generator, skips: SkipCounts) -> list[Episode]:
        """All episodes of one document, in chunk then site order; a document with none counts as too_short."""
        ids = self.document_ids(doc, skips)
        if ids is None:
            return []
        cfg = self.cfg
        chunks = chunk_tokens(ids, cfg.context_len, cfg.min_context + cfg.answer_horizon)
        labels = self.token_labels(doc, ids)
        allowed = None
        if cfg.site_classes:
            if labels is None:
                raise DataError(f"data.site_classes={cfg.site_classes} needs labelled documents (the synthetic "
                                f"source); document {doc.doc_id!r} has no labels")
            allowed = [np.isin(labels[i * cfg.context_len: i * cfg.context_len + len(c)], cfg.site_classes)
                       for i, c in enumerate(chunks)]
        out = []
        for ci, (chunk, sites) in enumerate(zip(chunks, select_sites(chunks, cfg, rng, self.scorer, allowed))):
            context_ids = chunk.tolist()
            made = []
            for t in sites:
                cont = context_ids[t: t + cfg.answer_horizon]
                made.append(Episode(
                    prompt_ids=self.prompt_prefix + context_ids[:t] + self.prompt_suffix,
                    context_ids=context_ids[:t],
                    continuation_ids=cont,
                    continuation_text=self.tokenizer.decode(cont),
                    site=t,
                    doc_id=doc.doc_id,
                    token_class=None if labels is None else labels[ci * cfg.context_len + t],
                    meta={"chunk": ci},
                ))
            out.extend(interleave(made) if cfg.episode_format == "interleaved" and made else made)
        if not out:
            skips.add("too_short")
        return out

    def token_labels(self, doc: Document, ids: np.ndarray) -> Optional[np.ndarray]:
        """labels[N]: the per-character label of each token's first character (labelled documents only);
        tokens are placed in the text by their bytes (token_bytes), characters by their UTF-8 lengths."""
        if doc.labels is None or doc.text is None:
            return None
        token_lengths = [len(self.tokenizer.token_bytes(int(i))) for i in ids]
        token_starts = np.concatenate([[0], np.cumsum(token_lengths)[:-1]]).astype(np.int64)
        char_starts = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in doc.text])[:-1]])
        char_index = np.searchsorted(char_starts, token_starts, side="right") - 1
        by_char = np.asarray(list(doc.labels), dtype=object)
        return by_char[np.clip(char_index, 0, len(by_char) - 1)]
