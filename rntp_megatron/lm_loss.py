"""The plain next-token (language-modelling) loss hook for `get_forward_backward_func`."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """sum over masked tokens of -log p(label); per-token losses[b, s] and loss_mask[b, s] -> (sum, count, log).

    Returns the sum and the token count (megatron's per-token-loss convention): the schedule and
    finalize_model_grads divide by the global count, so any micro-batch/DP/PP split gives the same gradients.
    """
    mask = loss_mask.to(output_tensor.dtype)
    loss_sum = (output_tensor.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def lm_forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
    """One micro-batch {tokens, position_ids, labels, loss_mask}[b, s] -> (per-token loss[b, s], loss_func)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"])


def lm_batch(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Training micro-batch for token rows[b, s+1]: inputs [:, :-1], labels [:, 1:], loss on every label; on the
    rows' device."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    mask = torch.ones_like(labels, dtype=torch.float) if loss_mask is None else loss_mask.float()
    positions = torch.arange(inputs.shape[1], device=tokens.device).unsqueeze(0).expand_as(inputs).contiguous()
    return {"tokens": inputs, "labels": labels, "loss_mask": mask, "position_ids": positions}
