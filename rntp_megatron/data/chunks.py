"""Pretraining items: a document's tokens cut into training rows, for the `ntp` objective.

Same interface as EpisodeBuilder (`episodes(doc, rng, skips)`), so the resumable, DP-sharded EpisodeStream
serves pretraining too: each item is an Episode whose prompt_ids is one row of the document, at most
`row_len` tokens, ending with eos when the document ends inside it.
"""

from __future__ import annotations

import numpy as np

from rntp_megatron.config import DataConfig
from rntp_megatron.data.episode import Episode
from rntp_megatron.data.episodes import EpisodeBuilder, chunk_tokens
from rntp_megatron.data.sources import Document, SkipCounts
from rntp_megatron.data.tokenizer import Tokenizer


class ChunkBuilder(EpisodeBuilder):
    """Document -> rows of <= row_len tokens (the document's ids + eos); rows shorter than 2 are dropped."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, row_len: int) -> None:
        super().__init__(cfg, tokenizer)
        self.row_len = row_len

    def episodes(self, doc: Document, rng: np.random.Generator, skips: SkipCounts) -> list[Episode]:
        ids = self.document_ids(doc, skips)
        if ids is None:
            return []
        ids = np.append(ids, self.tokenizer.eos_id)
        rows = chunk_tokens(ids, self.row_len, 2)
        return [Episode(prompt_ids=r.tolist(), context_ids=r.tolist(), continuation_ids=[], continuation_text="",
                        site=len(r), doc_id=doc.doc_id, meta={"chunk": i}) for i, r in enumerate(rows)]
