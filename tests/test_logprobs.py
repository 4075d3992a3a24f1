"""Vocab-parallel log-probs and entropy: forward and backward against a float64 full-vocabulary reference at
TP1, TP2 and TP4 (gloo ranks), at a temperature, with chunks that do not divide the rows; from logits, and from
hidden states and the output weight (grads of both), with a mask and a padded vocabulary."""

from __future__ import annotations

import pytest
import torch

from rntp_megatron.rl.logprobs import output_layer_logprobs, vocab_parallel_logprobs
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


SEQ, BATCH, HIDDEN, REAL_VOCAB = 5, 3, 8, 70  # REAL_VOCAB < VOCAB: ids 70..95 are megatron's padding


def _head_problem() -> tuple[torch.Tensor, ...]:
    """hidden[SEQ, BATCH, HIDDEN], weight[VOCAB, HIDDEN], labels[BATCH, SEQ] < REAL_VOCAB, mask[BATCH, SEQ] and
    upstream grads[BATCH, SEQ] for log-probs and entropy (fixed seed, float64)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, REAL_VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.rand(BATCH, SEQ, generator=g) < 0.6
    return (hidden, weight, labels, mask, torch.randn(BATCH, SEQ, generator=g, dtype=torch.float64),
            torch.randn(BATCH, SEQ, generator=g, dtype=torch.float64))


def _head_reference(hidden, weight, labels, mask, g_lp, g_h):
    """float64 log_softmax of (hidden @ weight^T)[b, s, :REAL_VOCAB] / T: (logp, entropy, grad hidden, grad weight)
    of sum over mask of g_lp.logp + g_h.H."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = torch.einsum("sbh,vh->bsv", h, w)[..., :REAL_VOCAB]
    logsm = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    logp = logsm.gather(-1, labels[..., None]).squeeze(-1) * mask
    entropy = -(logsm.exp() * logsm).sum(-1) * mask
    ((logp * g_lp).sum() + (entropy * g_h).sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def _head_ours(hidden, weight, labels, mask, g_lp, g_h, lo, hi, group=None, dtype=torch.float32):
    """output_layer_logprobs on the weight rows [lo, hi): logp, entropy, grad hidden, grad weight slice."""
    h = hidden.to(dtype).requires_grad_(True)
    w = weight[lo:hi].to(dtype).requires_grad_(True)
    logp, entropy = output_layer_logprobs(h, w, labels, TEMPERATURE, chunk_size=4, mask=mask,
                                          vocab_size=REAL_VOCAB, group=group)
    ((logp * g_lp.float()).sum() + (entropy * g_h.float()).sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


HEAD_OUTPUTS = ("logp", "entropy", "grad hidden", "grad weight")


def test_output_layer_tp1_matches_float64_reference():
    problem = _head_problem()
    ours = _head_ours(*problem, 0, VOCAB)
    for o, r, what in zip(ours, _head_reference(*problem), HEAD_OUTPUTS, strict=True):
        _assert_close(o, r, what)
    mask = problem[3]
    assert ours[0][~mask].abs().sum() == 0 and ours[0][mask].abs().min() > 0
    assert ours[3][REAL_VOCAB:].abs().sum() == 0, "padded vocab rows of the weight got a gradient"


def test_output_layer_bf16_inputs_give_bf16_grads():
    hidden, weight, labels, mask, g_lp, g_h = _head_problem()
    hidden, weight = hidden.bfloat16().double(), weight.bfloat16().double()  # the reference sees the rounded inputs
    ours = _head_ours(hidden, weight, labels, mask, g_lp, g_h, 0, VOCAB, dtype=torch.bfloat16)
    assert ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16
    for o, r, what in zip(ours, _head_reference(hidden, weight, labels, mask, g_lp, g_h), HEAD_OUTPUTS,
                          strict=True):
        # logits in bf16 (as megatron's output layer makes them), grads rounded to bf16
        torch.testing.assert_close(o.double(), r, rtol=5e-2, atol=5e-2, msg=lambda m, what=what: f"bf16 {what}: {m}")


def test_output_layer_bad_shapes_name_them():
    with pytest.raises(ValueError, match=r"hidden \(4, 2, 8\), weight \(16, 8\), labels \(3, 4\)"):
        output_layer_logprobs(torch.zeros(4, 2, 8), torch.zeros(16, 8), torch.zeros(3, 4, dtype=torch.long))


def head_tp_rank_result(rank: int, world: int) -> tuple:
    """One rank of a gloo TP group: output_layer_logprobs on its weight rows (no megatron import)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    per = VOCAB // world
    out = _head_ours(*_head_problem(), rank * per, (rank + 1) * per, group=dist.group.WORLD)
    dist.destroy_process_group()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_output_layer_tensor_parallel_matches_float64_reference(tp):
    """TP4 puts ranks 2 and 3 partly and wholly in the padded vocabulary (ids >= 70)."""
    ref_logp, ref_entropy, ref_grad_h, ref_grad_w = _head_reference(*_head_problem())
    per = VOCAB // tp
    for rank, (logp, entropy, grad_h, grad_w) in enumerate(run_ranks(head_tp_rank_result, tp)):
        _assert_close(logp, ref_logp, f"TP{tp} rank {rank} logp")
        _assert_close(entropy, ref_entropy, f"TP{tp} rank {rank} entropy")
        _assert_close(grad_h, ref_grad_h, f"TP{tp} rank {rank} grad hidden (all-reduced over the vocab slices)")
        _assert_close(grad_w, ref_grad_w[rank * per:(rank + 1) * per], f"TP{tp} rank {rank} grad weight slice")
