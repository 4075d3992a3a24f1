"""Per-token log-probs and entropy over a vocab-parallel vocabulary, never gathering the vocabulary.

Each tensor-parallel rank holds the logits (or the output-layer weight rows) of its slice
[rank * V/tp, (rank + 1) * V/tp) of the (padded) vocabulary. The softmax normaliser is assembled from per-rank
partial results: the max (for a stable exp) and three sums. Work runs in chunks of rows so the fp32
temporaries are [chunk, V/tp], never [T, V]; backward recomputes the softmax of a chunk from what forward saved
and the per-row log-normaliser.

Two entry points: `vocab_parallel_logprobs` from logits[..., V/tp], and `output_layer_logprobs` from the hidden
states before the output layer and its weight[V/tp, h], which computes logits only for the rows that carry a
loss, chunk by chunk, and returns the gradients of the hidden states and the weight directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _tp_group_and_rank(group: Optional[dist.ProcessGroup]) -> tuple[Optional[dist.ProcessGroup], int, int]:
    """(group, rank in it, its size); the megatron TP group when none is given and one exists."""
    if group is None and dist.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_tensor_model_parallel_group()
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def _local_labels(labels: torch.Tensor, rank: int, v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ids labels[n] -> (column in this rank's slice, clamped into range; whether this rank owns it)[n]."""
    local = labels - rank * v_local
    owned = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), owned


def _softmax_statistics(z: torch.Tensor, local_labels: torch.Tensor, owned: torch.Tensor,
                        group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled logits z[c, V/tp] fp32 (overwritten) -> (log p(label), entropy, log-normaliser)[c] over the full vocab.

    Collectives: all-reduce MAX of the row max, so every rank shifts by the same global max; all-reduce SUM of
    [sum exp, sum exp * z, label logit], because each rank sees only its vocab slice of these sums (the label
    logit is nonzero on the one rank owning the label).
    """
    zmax = z.amax(dim=-1)
    if group is not None:
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    z -= zmax[:, None]
    label_z = z.gather(1, local_labels[:, None]).squeeze(1) * owned
    e = z.exp()
    sum_exp = e.sum(-1)
    sum_ez = e.mul_(z).sum(-1)  # in place: two [c, V/tp] buffers in all
    del e
    sums = torch.stack([sum_exp, sum_ez, label_z])  # [3, c]
    if group is not None:
        dist.all_reduce(sums, group=group)
    sum_exp, sum_ez, label_z = sums
    log_norm = sum_exp.log()
    return label_z - log_norm, log_norm - sum_ez / sum_exp, log_norm + zmax


def _scaled_logit_grad(z: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, grad_logp: Optional[torch.Tensor],
                       grad_entropy: Optional[torch.Tensor], local_labels: torch.Tensor, owned: torch.Tensor
                       ) -> torch.Tensor:
    """d(g_lp . log p(label) + g_H . H)/dz_j = g_lp (1[j = label] - p_j) - g_H p_j (log p_j + H) for scaled
    logits z[c, V/tp] fp32 (overwritten and returned: no collective, each rank's slice needs only its own z and
    the global per-row lse[c] and entropy H[c]); grad_logp, grad_entropy: [c], at least one of them given."""
    log_p = z.sub_(lse[:, None])
    if grad_entropy is None:  # the usual case (entropy only logged): -g_lp p, in place, one buffer
        g = log_p.exp_().mul_(-grad_logp[:, None])
    else:
        p = log_p.exp()
        g = log_p.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
        if grad_logp is not None:
            g -= p.mul_(grad_logp[:, None])
        del p
    if grad_logp is not None:
        g.scatter_add_(1, local_labels[:, None], (grad_logp[:, None] * owned[:, None]).to(g.dtype))
    return g


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(label) and entropy H of softmax(logits / T) for the rows `index` of vocab-parallel logits[N, V/tp]
    (other rows: 0, with zero gradient).

    Collectives: forward, the two all-reduces of `_softmax_statistics` per chunk. Backward needs none: the
    gradient of a rank's logits depends only on its slice and the global per-row log-normaliser and entropy
    saved from forward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, inv_temperature: float,
                chunk_size: int, group: Optional[dist.ProcessGroup], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an output nobody differentiates (often the entropy) costs no backward
        local_labels, owned = _local_labels(labels.index_select(0, index), rank, logits.shape[1])
        n = index.numel()
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy, logp = torch.empty_like(lse), torch.empty_like(lse)
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            z = logits.index_select(0, index[lo:hi]).float()  # [c, V/tp] fp32, a fresh buffer
            z *= inv_temperature
            logp[lo:hi], entropy[lo:hi], lse[lo:hi] = _softmax_statistics(z, local_labels[lo:hi], owned[lo:hi], group)
        ctx.save_for_backward(logits, index, local_labels, owned, lse, entropy)
        ctx.inv_temperature, ctx.chunk_size = inv_temperature, chunk_size
        zeros = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        return zeros.index_copy(0, index, logp), zeros.index_copy(0, index, entropy)

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        """grad logits[N, V/tp]: `_scaled_logit_grad` times 1/T on the rows `index`, zero elsewhere."""
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        logits, index, local_labels, owned, lse, entropy = ctx.saved_tensors
        inv_t, chunk_size = ctx.inv_temperature, ctx.chunk_size
        grad = torch.zeros_like(logits)
        for lo in range(0, index.numel(), chunk_size):
            hi = min(lo + chunk_size, index.numel())
            rows = index[lo:hi]
            z = logits.index_select(0, rows).float()
            z *= inv_t
            g = _scaled_logit_grad(z, lse[lo:hi], entropy[lo:hi],
                                   None if grad_logp is None else grad_logp.index_select(0, rows),
                                   None if grad_entropy is None else grad_entropy.index_select(0, rows),
                                   local_labels[lo:hi], owned[lo:hi])
            g *= inv_t
            grad.index_copy_(0, rows, g.to(grad.dtype))
        return grad, None, None, None, None, None, None


def _fp32_or_wider(dtype: torch.dtype) -> torch.dtype:
    """The softmax's working dtype: fp32, or the input's when wider (float64 exactness tests)."""
    return torch.promote_types(dtype, torch.float32)


PADDED_LOGIT = -1.0e4  # exp() underflows to 0 in any dtype, and p * logit stays 0 in the entropy (no -inf * 0)


def _output_layer_logits(hidden: torch.Tensor, weight: torch.Tensor, inv_temperature: float,
                         first_padded: int) -> torch.Tensor:
    """z[c, V/tp] = hidden[c, h] @ weight[V/tp, h]^T / T in fp32 (or wider), columns >= first_padded at
    PADDED_LOGIT."""
    # 1/T as the GEMM's alpha: no extra pass over [c, V/tp], and one rounding in bf16 as megatron's logits have
    z = torch.addmm(hidden.new_zeros(()), hidden, weight.t(), beta=0, alpha=inv_temperature)
    z = z.to(_fp32_or_wider(z.dtype))
    if first_padded < z.shape[1]:
        z[:, max(first_padded, 0):] = PADDED_LOGIT
    return z


class _OutputLayerLogProbs(torch.autograd.Function):
    """log p(label) and entropy H of softmax(hidden[n, h] @ weight[V/tp, h]^T / T) for every row, the logits
    computed chunk by chunk and never kept; backward recomputes a chunk's logits and returns grad hidden[n, h]
    and grad weight[V/tp, h] directly (no [n, V] gradient is formed beyond one chunk).

    Collectives: forward, the two all-reduces of `_softmax_statistics` per chunk (global max, then the sums).
    Backward, one all-reduce SUM of grad hidden[n, h] over the TP group, because d/dh = sum_j g_j W_j runs over
    the whole vocabulary and each rank holds the terms of its slice (megatron's ColumnParallelLinear does the
    same all-reduce on its input gradient); grad weight needs none, each rank owning its rows of W.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inv_temperature: float,
                first_padded: int, chunk_size: int, group: Optional[dist.ProcessGroup], rank: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        local_labels, owned = _local_labels(labels, rank, weight.shape[0])
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=_fp32_or_wider(hidden.dtype), device=hidden.device)
        entropy, logp = torch.empty_like(lse), torch.empty_like(lse)
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            z = _output_layer_logits(hidden[lo:hi], weight, inv_temperature, first_padded)
            logp[lo:hi], entropy[lo:hi], lse[lo:hi] = _softmax_statistics(z, local_labels[lo:hi], owned[lo:hi], group)
        ctx.save_for_backward(hidden, weight, local_labels, owned, lse, entropy)
        ctx.inv_temperature, ctx.first_padded, ctx.chunk_size, ctx.group = (inv_temperature, first_padded,
                                                                            chunk_size, group)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        """grad hidden = G W / T and grad weight = G^T hidden / T, G[c, V/tp] = `_scaled_logit_grad` per chunk."""
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None, None
        hidden, weight, local_labels, owned, lse, entropy = ctx.saved_tensors
        inv_t = ctx.inv_temperature
        grad_hidden = torch.empty_like(hidden)
        # fp32 accumulation over chunks; the same buffer when the weight is fp32
        grad_weight = torch.zeros_like(weight, dtype=_fp32_or_wider(weight.dtype))
        for lo in range(0, hidden.shape[0], ctx.chunk_size):
            hi = min(lo + ctx.chunk_size, hidden.shape[0])
            z = _output_layer_logits(hidden[lo:hi], weight, inv_t, ctx.first_padded)
            g = _scaled_logit_grad(z, lse[lo:hi], entropy[lo:hi], None if grad_logp is None else grad_logp[lo:hi],
                                   None if grad_entropy is None else grad_entropy[lo:hi], local_labels[lo:hi],
                                   owned[lo:hi]).to(weight.dtype)
            torch.addmm(grad_hidden[lo:hi], g, weight, beta=0, alpha=inv_t, out=grad_hidden[lo:hi])
            if grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(g.t(), hidden[lo:hi], alpha=inv_t)
            else:
                grad_weight.add_(g.t() @ hidden[lo:hi], alpha=inv_t)
        if ctx.group is not None:
            dist.all_reduce(grad_hidden, group=ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def _check_inputs(labels: torch.Tensor, temperature: float, chunk_size: int, mask: Optional[torch.Tensor]) -> None:
    """Raise ValueError naming the value when the mask's shape, the temperature or the chunk size is wrong."""
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the labels' shape {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def mask_padded_vocab(logits: torch.Tensor, vocab_size: Optional[int],
                      group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """logits[..., V/tp] with the columns of ids >= vocab_size (megatron's vocab padding) set to a very low
    value, so log-probs normalize over the real vocabulary, as the engines that never sample padding do."""
    _, rank, _ = _tp_group_and_rank(group)
    local = logits.shape[-1]
    first_padded = (vocab_size if vocab_size is not None else 1 << 62) - rank * local
    if first_padded >= local:
        return logits
    padded = torch.arange(local, device=logits.device) >= first_padded
    return logits.masked_fill(padded, PADDED_LOGIT)


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                            chunk_size: int = 1024, group: Optional[dist.ProcessGroup] = None,
                            mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels[...]) and entropy[...] of softmax(logits[..., V/tp] / temperature) over the full vocab.

    `labels` are global vocabulary ids; `group` defaults to megatron's tensor-parallel group (none: the
    logits hold the whole vocabulary). With `mask[...]`, only masked positions are computed (the rest are 0 and
    get no gradient): an RL row trains a few generated tokens after a long prompt. Outputs are fp32 and
    differentiable; every rank of the group must pass the same mask.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on the "
                         "leading dims (expected logits[..., V/tp] and labels[...])")
    _check_inputs(labels, temperature, chunk_size, mask)
    group, rank, _ = _tp_group_and_rank(group)
    flat = logits.reshape(-1, logits.shape[-1])
    index = (torch.arange(flat.shape[0], device=logits.device) if mask is None
             else mask.reshape(-1).nonzero().squeeze(1))
    logp, entropy = _VocabParallelLogProbs.apply(flat, labels.reshape(-1).long(), index, 1.0 / temperature,
                                                 chunk_size, group, rank)
    return logp.view(labels.shape), entropy.view(labels.shape)


def output_layer_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0, chunk_size: int = 1024, mask: Optional[torch.Tensor] = None,
                          vocab_size: Optional[int] = None, sequence_parallel: bool = False,
                          group: Optional[dist.ProcessGroup] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels[b, s]) and entropy[b, s] of softmax(hidden[s, b, h] @ weight[V/tp, h]^T / temperature) over
    the ids < vocab_size, only at `mask[b, s]` (the rest are 0 and get no gradient).

    `hidden` is megatron's sequence-first final hidden state (after the final norm) and `weight` the output
    layer's (or tied embedding's) vocab-parallel weight. The masked rows are gathered before the matmul, so the
    cost scales with the tokens that carry a loss, and no [b, s, V] logits or zero-filled [T, V] gradient
    exist. Under sequence parallelism (`hidden[s/tp, b, h]`) the sequence is all-gathered first, as the output
    layer would (its backward keeps each rank's slice, the gradient being already summed over the vocabulary
    by the all-reduce of `_OutputLayerLogProbs`). `group` defaults to megatron's TP group; every rank of it must
    pass the same mask.
    """
    if hidden.dim() != 3 or hidden.shape[1] != labels.shape[0] or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"expected hidden[s, b, h], weight[V/tp, h] and labels[b, s], got hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    _check_inputs(labels, temperature, chunk_size, mask)
    group, rank, tp = _tp_group_and_rank(group)
    if sequence_parallel and tp > 1:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=group)
    if hidden.shape[0] != labels.shape[1]:
        raise ValueError(f"hidden holds {hidden.shape[0]} positions (sequence_parallel={sequence_parallel}, "
                         f"tp={tp}) but labels {tuple(labels.shape)} hold {labels.shape[1]}")
    # megatron's [s, b] order: row i of the flattened hidden is (s, b) = divmod(i, b)
    labels_sb = labels.t().reshape(-1)
    index = (torch.arange(labels_sb.numel(), device=hidden.device) if mask is None
             else mask.t().reshape(-1).nonzero().squeeze(1))
    rows = hidden.reshape(-1, hidden.shape[2]).index_select(0, index)
    first_padded = (vocab_size if vocab_size is not None else 1 << 62) - rank * weight.shape[0]
    logp, entropy = _OutputLayerLogProbs.apply(rows, weight, labels_sb.index_select(0, index).long(),
                                               1.0 / temperature, first_padded, chunk_size, group, rank)
    zeros = torch.zeros(labels_sb.numel(), dtype=logp.dtype, device=hidden.device)
    s, b = labels.shape[1], labels.shape[0]
    return (zeros.index_copy(0, index, logp).view(s, b).t(), zeros.index_copy(0, index, entropy).view(s, b).t())
