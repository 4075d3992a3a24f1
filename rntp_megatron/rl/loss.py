"""The RNTP loss as a Megatron loss hook: `forward_step` + `loss_func` for `get_forward_backward_func`.

Megatron's per-token-loss convention (`config.calculate_per_token_loss = True`, set by optimizer.wrap_ddp):
`loss_func` returns (numerator, count, metrics); the schedule sums numerators into the gradients and
finalize_model_grads divides them by the count summed over micro-batches, DP ranks and broadcast over PP. So
the gradient is a global ratio, the same however the step is split. Aggregations:

- token_mean (DAPO): sum_tokens l / global policy tokens            -> (sum l, #policy tokens)
- seq_mean (GRPO):   sum_rows (mean_t l) / global rows              -> (sum_rows mean_t l, #rows)
- dr_grpo:           sum_tokens l / (max_response_len * global rows) -> (sum l / L, #rows)

The optional next-token term w * sum(-log p) / global ntp tokens is rescaled into the same numerator by the
step-wide counts the batch carries (batch.with_global_counts). Every metric is a [sum, count] pair, summed
over micro-batches and DP ranks by the trainer (step.reduce_logged).

The model stops before its output layer (megatron's `output_processor` hook): the last stage hands the loss the
final hidden states and the vocab-parallel output weight, and rl/logprobs.output_layer_logprobs computes logits
only at the tokens that carry a loss, chunk by chunk, never forming [b, s, V] logits or their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch
from megatron.core.utils import get_model_config

from rntp_megatron.config import RLConfig
from rntp_megatron.rl.batch import RLBatch, policy_mask
from rntp_megatron.rl.logprobs import output_layer_logprobs
from rntp_megatron.rl.policy_loss import policy_terms


def _pair(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
    return torch.stack([total.detach().double().reshape(()), count.reshape(())])


@dataclass
class OutputLayerInput:
    """What the last pipeline stage hands the loss: final hidden[s(/tp under sequence parallel), b, h] and the
    output layer's vocab-parallel weight[V/tp, h]."""

    hidden: torch.Tensor
    weight: torch.Tensor
    sequence_parallel: bool = False


def output_layer_input(*, hidden_states: torch.Tensor, output_layer: torch.nn.Module,
                       output_weight: Optional[torch.Tensor], config: Any, **_: Any) -> OutputLayerInput:
    """GPTModel's output_processor: the hidden states and the output weight (the tied embedding when shared),
    instead of the logits. Not a tensor, so Float16Module leaves the bf16 hidden states as they are."""
    if config.use_mup:
        raise ValueError("RNTPLoss computes logits from hidden @ W^T and does not apply MuP's output scaling: "
                         "use_mup=True is not supported")
    weight = output_layer.weight if output_weight is None else output_weight
    return OutputLayerInput(hidden_states, weight, bool(output_layer.sequence_parallel))


class RNTPLoss:
    """The RL (or mixed, or plain next-token) objective of one step, as Megatron's forward_step/loss_func."""

    def __init__(self, rl: RLConfig, temperature: float, ntp_weight: float = 0.0, max_response_len: int = 1,
                 vocab_size: Optional[int] = None) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the rollout sampling temperature), got {temperature}")
        if rl.objective == "mixed" and ntp_weight <= 0:
            raise ValueError(f"rl.objective='mixed' needs reward.ntp_weight > 0, got {ntp_weight}")
        if rl.aggregation == "dr_grpo" and max_response_len < 1:
            raise ValueError(f"dr_grpo aggregation needs max_response_len >= 1, got {max_response_len}")
        self.rl, self.temperature, self.ntp_weight = rl, temperature, ntp_weight
        self.max_response_len = max_response_len
        self.vocab_size = vocab_size  # the tokenizer's: ids past it are megatron's vocab padding, never sampled

    def forward_step(self, data_iterator: Iterator[RLBatch], model: torch.nn.Module):
        """One micro-batch: the model up to its output layer (an OutputLayerInput on the last stage, hidden states
        elsewhere) and its loss_func."""
        if not get_model_config(model).calculate_per_token_loss:
            raise ValueError("RNTPLoss returns per-token sums: set config.calculate_per_token_loss=True "
                             "(rntp_megatron.optimizer.wrap_ddp does)")
        batch = next(data_iterator)
        output = model(batch.tokens, batch.position_ids, batch.attention_mask(), output_processor=output_layer_input)
        return output, partial(self.loss_func, batch)

    def _logprobs(self, head: OutputLayerInput, labels: torch.Tensor, temperature: float, mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(labels[b, s]) and entropy[b, s] at `temperature`, computed only where mask[b, s] > 0."""
        return output_layer_logprobs(head.hidden, head.weight, labels, temperature, self.rl.logprob_chunk_size,
                                     mask=mask > 0, vocab_size=self.vocab_size,
                                     sequence_parallel=head.sequence_parallel)

    def policy_logprobs(self, head: OutputLayerInput, batch: RLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(label) and entropy[b, s] at the rollout temperature on the policy's tokens (0 elsewhere)."""
        # only the policy's tokens: a row is mostly prompt, whose logits this term never reads
        return self._logprobs(head, batch.labels, self.temperature, policy_mask(batch, self.rl.train_on))

    def _ntp(self, head: OutputLayerInput, batch: RLBatch) -> torch.Tensor:
        """sum over ntp_mask of -log p(label) at temperature 1 (plain language modelling on the chunk)."""
        logp, _ = self._logprobs(head, batch.labels, 1.0, batch.ntp_mask)
        return -(logp * batch.ntp_mask).sum()

    def loss_func(self, batch: RLBatch, head: OutputLayerInput
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(numerator, count, metrics) of one micro-batch from the last stage's hidden states and output weight;
        see the module docstring."""
        rl = self.rl
        ntp_count = batch.ntp_mask.sum()
        if rl.objective == "ntp":
            ntp_sum = self._ntp(head, batch)
            count = ntp_count.to(torch.int)
            return ntp_sum, count, {"loss": _pair(ntp_sum, count), "ntp_loss": _pair(ntp_sum, ntp_count)}

        mask = policy_mask(batch, rl.train_on)
        logp, entropy = self.policy_logprobs(head, batch)
        terms = policy_terms(logp, batch.old_logprobs, batch.rollout_logprobs, batch.advantages, mask, rl,
                             batch.ref_logprobs, batch.branch_ids)
        token_sum = (terms.loss * mask).sum()
        rows = batch.num_sequences
        if rl.aggregation == "token_mean":
            numerator, count, global_count = token_sum, mask.sum(), batch.global_policy_tokens
        elif rl.aggregation == "seq_mean":
            per_row = batch.per_sequence(terms.loss * mask) / batch.per_sequence(mask).clamp(min=1)
            numerator, count, global_count = per_row.sum(), rows, batch.global_rows
        elif rl.aggregation == "dr_grpo":
            numerator, count, global_count = token_sum / self.max_response_len, rows, batch.global_rows
        else:
            raise ValueError(f"rl.aggregation must be token_mean, seq_mean or dr_grpo, got {rl.aggregation!r}")
        n_tok = mask.sum()
        metrics = {
            "pg_loss": _pair(numerator, count),
            "pg_clipfrac": _pair((terms.clipped * mask).sum(), n_tok),
            "ratio": _pair((terms.ratio * mask).sum(), n_tok),
            "is_weight": _pair((terms.is_weight * mask).sum(), n_tok),
            "entropy": _pair((entropy.detach() * mask).sum(), n_tok),
            "logp_abs_diff_rollout": _pair(((logp.detach() - batch.rollout_logprobs).abs() * mask).sum(), n_tok),
            "reward": _pair(batch.rewards.sum(), rows),
            "advantage": _pair(batch.advantages.sum() if batch.advantages.dim() == 1
                               else (batch.per_sequence(batch.advantages * mask)
                                     / batch.per_sequence(mask).clamp(min=1)).sum(), rows),
            "policy_tokens": _pair(n_tok, rows),
        }
        if terms.kl is not None:
            metrics["kl"] = _pair((terms.kl * mask).sum(), n_tok)
        if rl.objective == "mixed":
            if batch.global_ntp_tokens <= 0 or global_count <= 0:
                raise ValueError(f"the mixed objective needs the step-wide counts (global_ntp_tokens="
                                 f"{batch.global_ntp_tokens}, policy count={global_count}): build the batch "
                                 "with rl.batch.with_global_counts")
            ntp_sum = self._ntp(head, batch)
            # w * ntp_sum / N_ntp, expressed in units of the policy count the schedule divides by
            numerator = numerator + self.ntp_weight * ntp_sum * (global_count / batch.global_ntp_tokens)
            metrics["ntp_loss"] = _pair(ntp_sum, ntp_count)
        count = torch.as_tensor(count, device=numerator.device).to(torch.int)
        metrics["loss"] = _pair(numerator, count)
        return numerator, count, metrics
