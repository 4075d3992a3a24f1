"""Vocab-parallel log-probs and entropy: forward and backward against a float64 full-vocabulary reference at
TP1, TP2 and TP4 (gloo ranks), at a temperature, with chunks that do not divide the rows."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.rl.logprobs import vocab_parallel_logprobs
from rntp_megatron.runtime.spawn import run_ranks

ROWS, VOCAB, TEMPERATURE = 13, 96, 0.7


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits[ROWS, V], labels[ROWS], upstream grads[ROWS] for log-probs and entropy (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    return logits, labels, torch.randn(ROWS, generator=g, dtype=torch.float64), torch.randn(ROWS, generator=g,
                                                                                              dtype=torch.float64)


def _reference(logits, labels, g_lp, g_h):
    """float64 log_softmax over the full vocabulary: (logp, entropy, d(g_lp.logp + g_h.H)/dlogits)."""
    x = logits.clone().requires_grad_(True)
    logsm = torch.log_softmax(x / TEMPERATURE, dim=-1)
    logp = logsm.gather(1, labels[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    ((logp * g_lp).sum() + (entropy * g_h).sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def _ours(logits, labels, g_lp, g_h, lo, hi, group=None):
    """Our function on the vocab slice [lo, hi) in fp32; returns logp, entropy, grad of the slice."""
    x = logits[:, lo:hi].float().clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(x, labels, temperature=TEMPERATURE, chunk_size=5, group=group)
    ((logp * g_lp.float()).sum() + (entropy * g_h.float()).sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def _assert_close(ours, ref, what):
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_tp1_matches_float64_reference():
    logits, labels, g_lp, g_h = _problem()
    ref = _reference(logits, labels, g_lp, g_h)
    for ours, r, what in zip(_ours(logits, labels, g_lp, g_h, 0, VOCAB), ref, ("logp", "entropy", "grad")):
        _assert_close(ours, r, what)


def test_leading_dims_and_bf16_input():
    logits, labels, *_ = _problem()
    x = logits[:12].float().view(3, 4, VOCAB)
    logp, entropy = vocab_parallel_logprobs(x.bfloat16(), labels[:12].view(3, 4), chunk_size=7)
    assert logp.shape == (3, 4) and logp.dtype == torch.float32 and entropy.dtype == torch.float32
    ref = torch.log_softmax(x.bfloat16().double(), -1).gather(-1, labels[:12].view(3, 4, 1)).squeeze(-1)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 8\) and labels \(2, 4\)"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        vocab_parallel_logprobs(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), temperature=0)


def tp_rank_result(rank: int, world: int) -> tuple:
    """One rank of a gloo group of size TP (no megatron import: spawns stay cheap): outputs on its vocab slice.
    The megatron TP group default is exercised by tests/test_rl_loss_parallel.py."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits, labels, g_lp, g_h = _problem()
    per = VOCAB // world
    out = _ours(logits, labels, g_lp, g_h, rank * per, (rank + 1) * per, group=dist.group.WORLD)
    dist.destroy_process_group()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_float64_reference(tp):
    logits, labels, g_lp, g_h = _problem()
    ref_logp, ref_entropy, ref_grad = _reference(logits, labels, g_lp, g_h)
    results = run_ranks(tp_rank_result, tp)
    for rank, (logp, entropy, grad) in enumerate(results):
        _assert_close(logp, ref_logp, f"TP{tp} rank {rank} logp")
        _assert_close(entropy, ref_entropy, f"TP{tp} rank {rank} entropy")
        per = VOCAB // tp
        _assert_close(grad, ref_grad[:, rank * per:(rank + 1) * per], f"TP{tp} rank {rank} grad slice")


def test_mask_computes_only_masked_rows():
    logits, labels, g_lp, g_h = _problem()
    ref_logp, ref_entropy, ref_grad = _reference(logits, labels, g_lp * 0 + 1, g_h * 0 + 1)
    mask = torch.zeros(ROWS, dtype=torch.bool)
    mask[[0, 3, 4, 11]] = True
    x = logits.float().clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(x, labels, temperature=TEMPERATURE, chunk_size=3, mask=mask)
    (logp.sum() + entropy.sum()).backward()
    assert logp[~mask].abs().sum() == 0 and entropy[~mask].abs().sum() == 0 and x.grad[~mask].abs().sum() == 0
    _assert_close(logp[mask], ref_logp[mask], "masked logp")
    _assert_close(entropy[mask], ref_entropy[mask], "masked entropy")
    # the reference's grad rows are per-row, so the masked rows' grads equal them
    _assert_close(x.grad[mask], ref_grad[mask], "masked grad")
