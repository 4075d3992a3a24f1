"""Reference log-probs for the KL term: log p_ref(token | prefix) of every token the policy generated, from the
frozen reference model at the rollout temperature (the policy's log-probs in the loss are taken at it too), in
the batch's label coordinates: row i, positions p_i - 1 .. p_i - 1 + g_i - 1 (p prompt, g generated tokens)."""

from __future__ import annotations

from typing import Sequence

import torch

from rntp_megatron.rewards.scoring import continuation_logprobs
from rntp_megatron.rollout.engine import Rollout


def reference_logprobs(reference: torch.nn.Module, rollouts: Sequence[Rollout], seq_length: int,
                       micro_batch_size: int, pad_id: int, temperature: float, vocab_size: int,
                       length_multiple: int = 1) -> torch.Tensor:
    """ref[N, seq_length] on the host: log p_ref of rollout i's generated tokens at their label positions, 0
    elsewhere. Collective over the model-parallel group (a forward-only pass of megatron's schedule)."""
    logp, _ = continuation_logprobs([reference], [r.prompt_ids for r in rollouts], [r.token_ids for r in rollouts],
                                    micro_batch_size, pad_id, temperature=temperature,
                                    length_multiple=length_multiple, vocab_size=vocab_size)
    ref = torch.zeros(len(rollouts), seq_length, device="cpu")  # host-side, like the batch it joins
    for i, r in enumerate(rollouts):
        p, g = len(r.prompt_ids), len(r.token_ids)
        ref[i, p - 1:p - 1 + g] = logp[i, :g]
    return ref
