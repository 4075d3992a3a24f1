"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits[..., V/tp] for its slice [rank * V/tp, (rank + 1) * V/tp) of the
(padded) vocabulary. The softmax normaliser is assembled from per-rank partial results: the max (for a stable
exp) and three sums. Work runs in chunks of rows so the fp32 temporaries are [chunk, V/tp], never [T, V];
backward recomputes the softmax of a chunk from the saved logits and the per-row log-normaliser.
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


class _VocabParallelLogProbs(torch.autograd.Function):
    """log p(label) and entropy H of softmax(logits / T) for the rows `index` of vocab-parallel logits[N, V/tp]
    (other rows: 0, with zero gradient).

    Collectives (forward only, one pair per chunk): all-reduce MAX of the row max, so every rank shifts by the
    same global max; all-reduce SUM of [sum exp, sum exp * z, label logit], because each rank sees only its
    vocab slice of these sums (the label logit is nonzero on the one rank owning the label). Backward needs
    no collective: the gradient of a rank's logits depends only on its slice and the global per-row
    log-normaliser and entropy saved from forward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, inv_temperature: float,
                chunk_size: int, group: Optional[dist.ProcessGroup], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        v_local = logits.shape[1]
        local_labels = labels.index_select(0, index) - rank * v_local
        owned = (local_labels >= 0) & (local_labels < v_local)
        local_labels = local_labels.clamp(0, v_local - 1)
        n = index.numel()
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy, logp = torch.empty_like(lse), torch.empty_like(lse)
        for lo in range(0, n, chunk_size):
            hi = min(lo + chunk_size, n)
            z = logits.index_select(0, index[lo:hi]).float()  # [c, V/tp] fp32, a fresh buffer
            z *= inv_temperature
            zmax = z.max(dim=-1).values
            if group is not None:
                dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            z -= zmax[:, None]
            label_z = z.gather(1, local_labels[lo:hi, None]).squeeze(1) * owned[lo:hi]
            e = z.exp()
            sum_exp = e.sum(-1)
            sum_ez = e.mul_(z).sum(-1)  # in place: two [c, V/tp] buffers in all
            del e, z
            sums = torch.stack([sum_exp, sum_ez, label_z])  # [3, c]
            if group is not None:
                dist.all_reduce(sums, group=group)
            sum_exp, sum_ez, label_z = sums
            log_norm = sum_exp.log()
            logp[lo:hi] = label_z - log_norm
            entropy[lo:hi] = log_norm - sum_ez / sum_exp
            lse[lo:hi] = log_norm + zmax
        ctx.save_for_backward(logits, index, local_labels, owned, lse, entropy)
        ctx.inv_temperature, ctx.chunk_size = inv_temperature, chunk_size
        zeros = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        return zeros.index_copy(0, index, logp), zeros.index_copy(0, index, entropy)

    @staticmethod
    def backward(ctx, grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]):
        """d/dz_j: g_lp (1[j = label] - p_j) - g_H p_j (log p_j + H), times 1/T for the raw logits."""
        logits, index, local_labels, owned, lse, entropy = ctx.saved_tensors
        inv_t, chunk_size = ctx.inv_temperature, ctx.chunk_size
        grad = torch.zeros_like(logits)
        for lo in range(0, index.numel(), chunk_size):
            hi = min(lo + chunk_size, index.numel())
            rows = index[lo:hi]
            # in place on two [c, V/tp] fp32 buffers: g starts as log p, p as the softmax
            g = logits.index_select(0, rows).float()
            g *= inv_t
            g -= lse[lo:hi, None]
            p = g.exp()
            if grad_entropy is not None:
                g += entropy[lo:hi, None]
                g *= p
                g *= -grad_entropy.index_select(0, rows)[:, None]
            else:
                g.zero_()
            if grad_logp is not None:
                g_lp = grad_logp.index_select(0, rows)[:, None]
                p *= g_lp
                g -= p
                g.scatter_add_(1, local_labels[lo:hi, None], (g_lp * owned[lo:hi, None]).to(g.dtype))
            del p
            g *= inv_t
            grad.index_copy_(0, rows, g.to(grad.dtype))
        return grad, None, None, None, None, None, None


PADDED_LOGIT = -1.0e4  # exp() underflows to 0 in any dtype, and p * logit stays 0 in the entropy (no -inf * 0)


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
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the labels' shape {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    group, rank, _ = _tp_group_and_rank(group)
    flat = logits.reshape(-1, logits.shape[-1])
    index = (torch.arange(flat.shape[0], device=logits.device) if mask is None
             else mask.reshape(-1).nonzero().squeeze(1))
    logp, entropy = _VocabParallelLogProbs.apply(flat, labels.reshape(-1).long(), index, 1.0 / temperature,
                                                 chunk_size, group, rank)
    return logp.view(labels.shape), entropy.view(labels.shape)
