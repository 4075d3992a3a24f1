"""Memory per GPU of a run: what `rntp plan --config` prints and `rntp doctor` checks against the device.

For the most loaded rank (first pipeline stage, or the last when it holds more) of a layout TP x PP x CP x DP:

- parameters P (this rank's shard: matrices / TP, norms and routers whole; of a mixture of experts, the E / EP
  experts of its EP rank, each split over expert-TP = TP) in model.params_dtype;
- gradients: Megatron DDP's fp32 grad buffer, 4 P (grad_reduce_in_fp32);
- Adam: m and v in fp32 (8 P) plus an fp32 master copy (4 P) when the params are 16-bit; the distributed
  optimizer shards all of it over DP (/ DP), the experts over expert-DP (world / (TP x EP x PP));
- activations of one micro-batch [s, b] (s / CP), per layer, in elements of the params dtype:
    the local spec (what runs without Transformer Engine: model/attention.SDPAttention keeps no [s, s] scores;
    counted from the tensors autograd saves): 7 sbh + sb (2a + 3g) d / TP (the qkv output, rotated q and k, the
    attention output) + b a s / TP (fp32 logsumexp) + 5 sbf / TP; with 16-bit params 4 of the 7 sbh are fp32
    (the norms' input and output). (Megatron's DotProductAttention, before SDPAttention, also kept the
    b a s^2 / TP fp32 probabilities, and in 16 bits a second copy: measured on the CPU and an H200, BENCHMARKS.md)
    fused attention (TE, flash): 4 sbh + sb (a + 2g) d / TP + sb a d / TP + 3 sbf / TP
  (h-sized terms / TP under sequence parallelism), times the micro-batches the schedule keeps in flight on
  the first stage (min(PP, micro-batches) under 1F1B); full recomputation keeps only each layer's input
  sbh plus one layer's activations;
- the loss: next-token training keeps fp32 logits [s, b, V/TP]; the RL loss (rl/logprobs.py) only
  [logprob_chunk_size, V/TP] fp32 chunks and an fp32 grad of the output weight;
- the in-process engine's KV cache: 2 (K and V) x layers x rows x (prompt + max_new_tokens) x g/TP x d in
  the params dtype, rows = the rollouts of one generate batch (at most 256), plus the prefill's logits;
- EMA / frozen baseline and reference-model copies (P each, params dtype) when the config turns them on.

Peak = parameters + gradients + optimizer + copies + max(training activations + loss, rollout KV cache +
prefill): the colocated engine's cache lives only while it generates, between training steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rntp_megatron.config import ModelConfig, ParallelConfig, RunConfig, padded_vocab_size

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ENGINE_MAX_BATCH = 256  # rows of one MegatronEngine generate batch (rollout/megatron_engine.py default)
GiB = 1 << 30


@dataclass
class MemoryTerm:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    """Bytes per GPU by term; `peak` is the plan's high-water mark (see the module docstring)."""

    static: list[MemoryTerm] = field(default_factory=list)
    training: list[MemoryTerm] = field(default_factory=list)
    rollout: list[MemoryTerm] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(t.bytes for t in self.static) + max(sum(t.bytes for t in self.training),
                                                       sum(t.bytes for t in self.rollout))

    def table(self) -> str:
        """One line a term, in GiB, then the peak."""
        lines = []
        for title, terms in (("held", self.static), ("while training", self.training),
                             ("while generating", self.rollout)):
            for t in terms:
                lines.append(f"  {title:<17}{t.name:<34}{t.bytes / GiB:10.3f} GiB  {t.note}")
        lines.append(f"  {'peak per GPU':<51}{self.peak / GiB:10.3f} GiB")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def layer_parameters(m: ModelConfig, tp: int) -> int:
    """One transformer layer's parameters on a TP rank, experts left out: qkv [h, (a + 2g) d], proj [a d, h] split
    over TP; a dense SwiGLU MLP fc1 [h, 2f], fc2 [f, h] split over TP, or a mixture of experts' router [E, h]
    (whole); two RMSNorms (h) and the optional q/k norms (d each) whole."""
    d = head_dim(m)
    qkv = m.hidden_size * (m.num_attention_heads + 2 * m.num_query_groups) * d
    qkv_bias = (m.num_attention_heads + 2 * m.num_query_groups) * d if m.qkv_bias else 0
    proj = m.num_attention_heads * d * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size if m.num_moe_experts is None else 0
    router = m.hidden_size * m.num_moe_experts if m.num_moe_experts is not None else 0
    norms = 2 * m.hidden_size + (2 * d if m.qk_layernorm else 0)
    return (qkv + qkv_bias + proj + mlp) // tp + router + norms


def layer_expert_parameters(m: ModelConfig, ep: int, etp: int) -> int:
    """One layer's experts on an expert rank: E / EP local SwiGLU experts, fc1 [h, 2 f_moe] and fc2 [f_moe, h]
    each split over expert-TP (0 for a dense model)."""
    if m.num_moe_experts is None:
        return 0
    width = m.moe_ffn_hidden_size or m.ffn_hidden_size
    return m.num_moe_experts // ep * 3 * m.hidden_size * width // etp


def stage_parameters(m: ModelConfig, tp: int, pp: int, first: bool, last: bool, ep: int = 1) -> int:
    """Parameters of one pipeline stage on a TP rank: its layers (with the experts of its EP rank, expert-TP = TP
    as megatron sets it by default), the embedding [V_pad/TP, h] on the first stage, the final norm and the output
    layer on the last (a second copy of the embedding when tied and PP > 1)."""
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp) * m.hidden_size // tp
    total = m.num_layers // pp * (layer_parameters(m, tp) + layer_expert_parameters(m, ep, tp))
    if first:
        total += vocab
    if last:
        total += m.hidden_size + (vocab if not m.tie_word_embeddings or not first else 0)
    return total


def layer_activation_elements(m: ModelConfig, p: ParallelConfig, seq: int, micro_batch: int, fused: bool
                              ) -> tuple[float, float]:
    """(elements in the params dtype, fp32 elements) one layer saves for backward for a micro-batch [s, b]."""
    tp = p.tensor_model_parallel_size
    s, b = seq / p.context_parallel_size, micro_batch
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, head_dim(m), m.ffn_hidden_size
    sp = tp if p.sequence_parallel else 1
    if fused:
        return 4 * s * b * h / sp + s * b * (2 * a + 2 * g) * d / tp + 3 * s * b * f / tp, 0.0
    # the local spec's SDPAttention (no [s, s] scores kept): the fused qkv output (a + 2g heads, which v views),
    # the rotated q and k (a + g) and the output SDPA keeps with its fp32 logsumexp (a values a token)
    attention, lse = s * b * (2 * a + 3 * g) * d / tp, b * a * s / tp
    if m.params_dtype == "float32":
        return 7 * s * b * h / sp + attention + 5 * s * b * f / tp, lse
    # 16-bit: the two norms (fp32 weights, composite) keep their input and normalised output in fp32
    return 3 * s * b * h / sp + attention + 5 * s * b * f / tp, 4 * s * b * h / sp + lse


def memory_plan(cfg: RunConfig, world_size: int, fused_attention: bool, recompute: bool = False) -> MemoryPlan:
    """The plan of `cfg` at `world_size` GPUs (see the module docstring for every term)."""
    m, p, s, r = cfg.model, cfg.parallel, cfg.schedule, cfg.rollout
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = max(world_size // (tp * pp * p.context_parallel_size), 1)
    ep = p.expert_model_parallel_size
    edp = max(world_size // (tp * ep * pp), 1)  # expert-data-parallel: the copies of each expert shard
    e = DTYPE_BYTES[m.params_dtype]
    params = max(stage_parameters(m, tp, pp, True, pp == 1, ep), stage_parameters(m, tp, pp, pp == 1, True, ep))
    experts = m.num_layers // pp * layer_expert_parameters(m, ep, tp)
    plan = MemoryPlan()
    held = f"{params / 1e6:,.1f} M on this rank" + (f" ({experts / 1e6:,.1f} M experts at EP={ep})" if experts else "")
    plan.static.append(MemoryTerm("parameters", params * e, f"{held}, {m.params_dtype}"))
    plan.static.append(MemoryTerm("gradients", params * 4, "fp32 grad buffer"))
    per_param = 8 + (4 if e < 4 else 0)
    adam = params * per_param
    sharded_adam = (params - experts) * per_param / dp + experts * per_param / edp  # experts over expert-DP
    sharded = p.use_distributed_optimizer
    over = f"DP={dp}" + (f", experts over expert-DP={edp}" if experts else "")
    plan.static.append(MemoryTerm(
        "optimizer (Adam)", sharded_adam if sharded else adam,
        f"{'distributed over ' + over if sharded else 'replicated'}; "
        f"{'replicated' if sharded else 'distributed'}: {(adam if sharded else sharded_adam) / GiB:.3f} GiB"))
    rl_on = cfg.rl.objective != "ntp"
    baseline = getattr(cfg.reward, "baseline", "policy")
    if rl_on and baseline in ("ema", "frozen"):
        plan.static.append(MemoryTerm(f"{baseline} baseline copy", params * e, "reward.baseline"))
    if rl_on and cfg.rl.kl_coef > 0:
        plan.static.append(MemoryTerm("reference model", params * e, "rl.kl_coef > 0"))

    microbatches = max(s.global_batch_size // (s.micro_batch_size * dp), 1)
    in_flight = min(pp, microbatches) if pp > 1 else 1
    layers = m.num_layers // pp
    act, act32 = layer_activation_elements(m, p, s.seq_length, s.micro_batch_size, fused_attention)
    one_layer = act * e + act32 * 4
    tokens = s.seq_length / p.context_parallel_size * s.micro_batch_size
    h_sp = m.hidden_size / (tp if p.sequence_parallel else 1)
    # embedding output, final norm input and its normalised output (the last two fp32 when 16-bit, unfused spec)
    outer = tokens * h_sp * (3 * e if fused_attention or e == 4 else e + 2 * 4)
    full = layers * one_layer + outer
    recomputed = layers * tokens * h_sp * e + one_layer + outer
    plan.training.append(MemoryTerm(
        "activations", (recomputed if recompute else full) * in_flight,
        f"{in_flight} micro-batch(es) of [{s.seq_length}, {s.micro_batch_size}] in flight, "
        f"{'fused' if fused_attention else 'unfused'} attention; "
        f"{'without' if recompute else 'with full'} recomputation: "
        f"{(full if recompute else recomputed) * in_flight / GiB:.3f} GiB"))
    v_local = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp) / tp
    if rl_on:
        loss = 3 * min(cfg.rl.logprob_chunk_size, tokens) * v_local * 4 + v_local * m.hidden_size * 4
        plan.training.append(MemoryTerm("loss (chunked log-probs)", loss, f"chunks of {cfg.rl.logprob_chunk_size}"))
    else:
        plan.training.append(MemoryTerm("loss (logits)", tokens * v_local * 4, "fp32 logits [s, b, V/TP]"))

    if rl_on and r.engine == "megatron":
        rows_per_rank = s.global_batch_size // dp
        group = cfg.rl.group_size
        rows = min(rows_per_rank, max(ENGINE_MAX_BATCH // group, 1) * group)
        length = min(cfg.data.context_len + 2 + r.max_new_tokens, m.max_position_embeddings)
        kv = 2 * layers * rows * length * (m.num_query_groups / tp) * head_dim(m) * e
        plan.rollout.append(MemoryTerm("KV cache (in-process engine)", kv,
                                       f"{rows} rows x {length} positions"))
        prompts = max(rows // group, 1)
        plan.rollout.append(MemoryTerm("prefill logits", prompts * (cfg.data.context_len + 2) * v_local * e +
                                       rows * v_local * 4 * 3, f"{prompts} prompts"))
    elif rl_on:
        plan.notes.append("rollout.engine sglang: the server's memory is its own (rollout.sglang.extra_args "
                          "--mem-fraction-static) and not counted here")
    return plan


def device_memory_bytes() -> Optional[int]:
    """Total memory of this process's GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
