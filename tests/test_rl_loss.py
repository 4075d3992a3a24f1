"""Each loss variant of RNTPLoss.loss_func (objective = numerator / count, as finalize_model_grads divides)
matches an independent float64 reference on the logits hidden @ W^T, value and gradients with respect to the
hidden states and the output weight."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rntp_megatron.config import RLConfig as _RLConfig
from rntp_megatron.rl.batch import RLBatch, with_global_counts
from rntp_megatron.rl.loss import OutputLayerInput, RNTPLoss

B, S, V, H = 4, 7, 11, 6


def RLConfig(**kw) -> _RLConfig:  # noqa: N802 (stands in for the class)
    """The loss's config alone (no reward to resolve rl.train_on from): thought_and_answer unless given."""
    return _RLConfig(**{"train_on": "thought_and_answer", **kw})
TEMPERATURE = 0.7
MAX_LEN = 6


def make_batch(seed: int = 0, with_ref: bool = True) -> RLBatch:
    """Rows: a context part (ntp), then thought then answer tokens, then padding; log-probs near the truth."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    thought, answer, ntp = torch.zeros(B, S), torch.zeros(B, S), torch.zeros(B, S)
    for i, (c, t, a) in enumerate([(2, 3, 1), (1, 2, 2), (3, 1, 1), (0, 4, 2)]):
        ntp[i, :c] = 1
        thought[i, c:c + t] = 1
        answer[i, c + t:c + t + a] = 1
    old = -torch.rand(B, S, generator=g) * 3
    return RLBatch(tokens=tokens, position_ids=torch.arange(S).expand(B, S), labels=labels, thought_mask=thought,
                   answer_mask=answer, ntp_mask=ntp, old_logprobs=old,
                   rollout_logprobs=old + 0.4 * torch.randn(B, S, generator=g),
                   advantages=torch.tensor([1.5, -0.7, 0.3, -2.0]), rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                   ref_logprobs=(old + 0.3 * torch.randn(B, S, generator=g)) if with_ref else None)


def make_head(seed: int = 1, dtype: torch.dtype = torch.float32) -> OutputLayerInput:
    """Megatron-layout hidden[S, B, H] and output weight[V, H] (leaves that require grad)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8).to(dtype).requires_grad_(True)
    return OutputLayerInput(hidden, weight)


def head_logits(head: OutputLayerInput) -> torch.Tensor:
    """logits[B, S, V] = hidden @ weight^T, differentiable in both."""
    return torch.einsum("sbh,vh->bsv", head.hidden, head.weight)


def reference_objective(z: torch.Tensor, b: RLBatch, cfg: RLConfig, ntp_weight: float) -> torch.Tensor:
    """The step objective in float64, row by row, written from docs/method.md section 4 (not from loss.py)."""
    old, roll = b.old_logprobs.double(), b.rollout_logprobs.double()
    logp_t = torch.log_softmax(z / TEMPERATURE, -1).gather(-1, b.labels[..., None]).squeeze(-1)
    logp_1 = torch.log_softmax(z, -1).gather(-1, b.labels[..., None]).squeeze(-1)
    ntp_sum = -sum(logp_1[i][b.ntp_mask[i] > 0].sum() for i in range(B))
    ntp_n = b.ntp_mask.sum().item()
    if cfg.objective == "ntp":
        return ntp_sum / ntp_n
    row_losses, row_tokens = [], []
    for i in range(B):
        keep = (b.thought_mask[i] + (b.answer_mask[i] if cfg.train_on == "thought_and_answer" else 0)) > 0
        lp, o, r = logp_t[i][keep], old[i][keep], roll[i][keep]
        A = float(b.advantages[i])
        if cfg.ratio_type == "gspo":
            rho = torch.exp((lp - o).mean()).expand_as(lp)
        else:
            rho = torch.exp(lp - o)
        losses = []
        for k in range(len(lp)):
            l = max(-A * rho[k], -A * rho[k].clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high))
            if cfg.dual_clip_c is not None and A < 0:
                l = torch.clamp(l, max=-A * cfg.dual_clip_c)
            w = 1.0
            is_ratio = math.exp(float(o[k] - r[k]))
            if cfg.tis_cap is not None:
                w *= min(is_ratio, cfg.tis_cap)
            if cfg.icepop is not None:
                w *= float(cfg.icepop[0] <= is_ratio <= cfg.icepop[1])
            l = l * w
            if cfg.kl_coef:
                d = lp[k] - b.ref_logprobs.double()[i][keep][k]
                l = l + cfg.kl_coef * {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d}[cfg.kl_type]
            losses.append(l)
        row_losses.append(torch.stack(losses))
        row_tokens.append(len(losses))
    if cfg.aggregation == "token_mean":
        pg = torch.cat(row_losses).sum() / sum(row_tokens)
    elif cfg.aggregation == "seq_mean":
        pg = torch.stack([x.mean() for x in row_losses]).mean()
    else:
        pg = torch.cat(row_losses).sum() / (MAX_LEN * B)
    if cfg.objective == "mixed":
        pg = pg + ntp_weight * ntp_sum / ntp_n
    return pg


VARIANTS = {
    "ppo_clip": {},
    "clip_higher": {"clip_eps_low": 0.1, "clip_eps_high": 0.28},
    "dual_clip": {"clip_eps_low": 0.05, "clip_eps_high": 0.05, "dual_clip_c": 1.5},
    "gspo": {"ratio_type": "gspo", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4},
    "kl_k1": {"kl_coef": 0.1, "kl_type": "k1"},
    "kl_k2": {"kl_coef": 0.1, "kl_type": "k2"},
    "kl_k3": {"kl_coef": 0.1, "kl_type": "k3"},
    "tis": {"tis_cap": 1.2},
    "icepop": {"icepop": (0.8, 1.25)},
    "seq_mean": {"aggregation": "seq_mean"},
    "dr_grpo": {"aggregation": "dr_grpo"},
    "thought_only": {"train_on": "thought"},
    "mixed": {"objective": "mixed"},
    "ntp": {"objective": "ntp"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_float64_reference(variant):
    cfg = RLConfig(logprob_chunk_size=5, **VARIANTS[variant])
    batch = with_global_counts(make_batch(), cfg.train_on)
    ref_head = make_head(dtype=torch.float64)
    ref = reference_objective(head_logits(ref_head), batch, cfg, ntp_weight=0.3)
    ref.backward()
    head = make_head()
    loss = RNTPLoss(cfg, TEMPERATURE, ntp_weight=0.3, max_response_len=MAX_LEN)
    numerator, count, metrics = loss.loss_func(batch, head)
    (numerator / count).backward()
    assert count.dtype == torch.int32
    torch.testing.assert_close((numerator / count).double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.hidden.grad.double(), ref_head.hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), ref_head.weight.grad, rtol=1e-4, atol=1e-6)
    assert torch.isclose(metrics["loss"][0] / metrics["loss"][1], ref.detach(), rtol=1e-5)


def test_variants_exercise_their_branch():
    """Guard against a vacuous variant: clipping, dual clip, TIS caps and icepop masks actually fire here."""
    batch = with_global_counts(make_batch(), "thought_and_answer")
    head = make_head()

    def metric(name, **kw):
        m = RNTPLoss(RLConfig(**kw), TEMPERATURE).loss_func(batch, head)[2][name]
        return (m[0] / m[1]).item()

    assert 0 < metric("pg_clipfrac", clip_eps_low=0.1, clip_eps_high=0.28) < 1
    assert metric("is_weight", tis_cap=1.2) < metric("is_weight")
    assert 0 < metric("is_weight", icepop=(0.8, 1.25)) < 1
    plain = RNTPLoss(RLConfig(clip_eps_low=0.05, clip_eps_high=0.05), TEMPERATURE).loss_func(batch, head)[0]
    dual = RNTPLoss(RLConfig(clip_eps_low=0.05, clip_eps_high=0.05, dual_clip_c=1.5), TEMPERATURE).loss_func(batch, head)[0]
    assert dual < plain


def test_metrics_report_mismatch_entropy_and_kl():
    batch = with_global_counts(make_batch(), "thought_and_answer")
    head = make_head()
    _, _, m = RNTPLoss(RLConfig(), TEMPERATURE).loss_func(batch, head)
    mask = (batch.thought_mask + batch.answer_mask) > 0
    logits = head_logits(head).detach().double()
    logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, batch.labels[..., None]).squeeze(-1)
    expected = (logp - batch.rollout_logprobs.double()).abs()[mask].mean()
    assert torch.isclose(m["logp_abs_diff_rollout"][0] / m["logp_abs_diff_rollout"][1], expected, rtol=1e-5)
    assert {"kl", "entropy", "pg_clipfrac", "reward", "advantage"} <= set(m)
    assert (m["reward"][0] / m["reward"][1]).item() == pytest.approx(0.5)


def test_configuration_errors_name_the_field():
    batch = make_batch(with_ref=False)
    head = make_head()
    with pytest.raises(ValueError, match="rl.kl_coef=0.1 needs reference log-probs"):
        RNTPLoss(RLConfig(kl_coef=0.1), 1.0).loss_func(batch, head)
    with pytest.raises(ValueError, match="needs reward.ntp_weight > 0"):
        RNTPLoss(RLConfig(objective="mixed"), 1.0)
    with pytest.raises(ValueError, match="with_global_counts"):
        RNTPLoss(RLConfig(objective="mixed"), 1.0, ntp_weight=0.5).loss_func(batch, head)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RNTPLoss(RLConfig(), 0.0)
    assert dataclasses.replace(batch).num_rows == B
