"""The unit of RNTP work: one site of one text chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Episode:
    """Site t of a chunk: the policy reads `prompt_ids` (template around x_<t, ending where it starts to
    think) and is scored against the true continuation x_{t:t+K}."""

    prompt_ids: list[int]
    context_ids: list[int]  # x_<t (the part of the chunk inside the prompt)
    continuation_ids: list[int]  # x_{t:t+K}, K = data.answer_horizon
    continuation_text: str  # decoded x_{t:t+K}; text rewards compare bytes against it
    site: int  # t, index of the first continuation token inside the chunk
    doc_id: str = ""
    token_class: Optional[str] = None  # synthetic corpus label of x_t: "T" trivial, "C" computable, "I" impossible
    meta: dict = field(default_factory=dict)
