"""The in-process rollout engine: batched sampling from the trainer's own Megatron-Core GPTModel.

Prompts of equal length are prefilled together once through Megatron's `StaticInferenceContext` (its KV
cache); the cache rows are then repeated n times, so the n samples of a prompt share its prefill, and all
rows decode in lockstep, one token a forward. Logits stay vocab-parallel over the TP group:

- plain temperature sampling and greedy use the Gumbel-max trick on each rank's vocab slice, then one
  all-gather of (best score, token id) per row: the full vocab is never gathered;
- top-k / top-p need the global ranking of tokens: each rank contributes its local top-k candidates (its
  whole slice for top-p alone, i.e. the full vocab is gathered then) to one all-gather;
- the log-prob of the sampled token comes from a vocab-parallel log-softmax (all-reduce of max and sum).

The decode loop keeps no Python per row: a step's sampled ids reach the host in one transfer (its one sync),
stop tokens are matched on them at once, and stop strings only at the rows whose new token can end one
(rollout/stop_strings.py: exact, without decoding whole rows); log-probs stay on the device to the end.

Under pipeline parallelism (PP > 1) each stage runs its layers on the prefill and on every decode step, with
its own KV cache, and sends its hidden states [s, b, h] to the next stage; the last stage samples and
broadcasts (id, log-prob) of each row to every stage of its pipeline, which all keep the same rollouts.
Runs at any TP x PP, on CPU and GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts.static_context import StaticInferenceContext

from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams
from rntp_megatron.rollout.stop_strings import StopStrings
from rntp_megatron.runtime.cpu_compat import cuda_redirects_paused


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_logprob(scores: torch.Tensor, token_ids: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """log softmax(scores)[token] over the TP-sharded vocab: scores[N, V/tp] (this rank's slice starting at
    vocab_start), token_ids[N] global ids -> [N]. All-reduces the row max, the sum of exps and the picked
    score (each rank contributes only where it owns the token)."""
    group = _tp_group()
    if dist.get_world_size(group) == 1:  # the whole vocab is here: no collective
        return scores.log_softmax(dim=-1).gather(1, token_ids[:, None])[:, 0]
    row_max = scores.max(dim=-1).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (scores - row_max[:, None]).exp().sum(dim=-1)
    dist.all_reduce(sum_exp, group=group)
    local = token_ids - vocab_start
    owned = (local >= 0) & (local < scores.shape[-1])
    picked = torch.where(owned, scores.gather(1, local.clamp(0, scores.shape[-1] - 1)[:, None])[:, 0],
                         torch.zeros_like(row_max))
    dist.all_reduce(picked, group=group)
    return picked - row_max - sum_exp.log()


def gumbel_argmax(scores: torch.Tensor, vocab_start: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A sample of softmax(scores) over the TP-sharded vocab (argmax of scores + Gumbel noise; plain argmax
    when generator is None): scores[N, V/tp] -> global ids [N]. One all-gather of (best, id) per rank;
    each rank's generator must differ (seeded per TP rank) so the noise is independent across slices."""
    if generator is not None:
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(min=1e-20)
        scores = scores - (-uniform.log()).log()
    best, idx = scores.max(dim=-1)
    world = dist.get_world_size(_tp_group())
    if world == 1:
        return idx + vocab_start
    pairs = torch.stack([best, (idx + vocab_start).to(best.dtype)], dim=-1)  # [N, 2]
    gathered = [torch.empty_like(pairs) for _ in range(world)]
    dist.all_gather(gathered, pairs, group=_tp_group())
    stacked = torch.stack(gathered, dim=1)  # [N, tp, 2]; ties go to the lowest rank, like a plain argmax
    winner = stacked[..., 0].argmax(dim=1)
    return stacked[torch.arange(len(winner), device=winner.device), winner, 1].round().long()


def truncated_sample(scores: torch.Tensor, vocab_start: int, top_k: int, top_p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """A sample from softmax(scores) restricted to the top_k tokens and then the top_p nucleus:
    scores[N, V/tp] -> global ids [N]. All-gathers each rank's top-k candidates (values and ids), or its whole
    slice when only top_p is set (the nucleus needs the global ranking); the generator must be identical on
    all TP ranks so every rank draws the same token."""
    k_local = min(top_k, scores.shape[-1]) if top_k > 0 else scores.shape[-1]
    values, idx = scores.topk(k_local, dim=-1)
    world = dist.get_world_size(_tp_group())
    cand = torch.cat([values, (idx + vocab_start).to(values.dtype)], dim=-1)  # [N, 2k]
    gathered = [torch.empty_like(cand) for _ in range(world)]
    dist.all_gather(gathered, cand, group=_tp_group())
    values = torch.cat([g[:, :k_local] for g in gathered], dim=-1)
    ids = torch.cat([g[:, k_local:] for g in gathered], dim=-1).round().long()
    values, order = values.sort(dim=-1, descending=True)
    ids = ids.gather(1, order)
    if top_k > 0:
        values, ids = values[:, :top_k], ids[:, :top_k]
    probs = values.softmax(dim=-1)
    if top_p < 1.0:
        # keep token i while the mass before it is below top_p (the first token always stays)
        before = probs.cumsum(dim=-1) - probs
        probs = torch.where(before < top_p, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return ids.gather(1, choice[:, None])[:, 0]


def _from_last_stage(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last pipeline stage's sampled ids[N] and their log-probs[N] on every stage (one broadcast of both as
    float64, exact for ids below 2**53); unchanged at PP = 1."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return ids, logprobs
    both = torch.stack([ids.double(), logprobs.double()])
    dist.broadcast(both, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return both[0].long(), both[1].float()


class MegatronEngine(RolloutEngine):
    """A colocated RolloutEngine over the trainer's GPTModel stage (any TP and PP).

    It shares the trainer's module, so `update_weights` loads nothing: it only records the version that
    later rollouts report. `tokenizer` decodes text for stop strings (Tokenizer protocol of data/tokenizer);
    ids at or above tokenizer.vocab_size (Megatron's vocab padding) are never sampled and are left out of
    the log-probs. Log-probs are those of softmax(logits / temperature) before top-k/top-p truncation
    (temperature 1 for greedy), the distribution the trainer recomputes. Every TP rank of a group must
    call generate() with the same prompts, and so must every stage of a pipeline; all return the same rollouts.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self._stops: dict[tuple[str, ...], StopStrings] = {}  # per set of stop strings: its vocab mask

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """No-op for the colocated engine (it samples from the trainer's module); records `version`."""
        self.weight_version = version

    def _seed(self, seed: Optional[int]) -> int:
        """The call's seed: the given one, else one drawn on TP rank 0 and broadcast (ranks must agree)."""
        drawn = seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))
        value = torch.tensor([drawn], device=next(self.model.parameters()).device)
        if seed is None:
            dist.broadcast(value, src=parallel_state.get_tensor_model_parallel_src_rank(), group=_tp_group())
        return int(value)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """sampling.n rollouts per prompt, grouped by prompt in input order (prompt 0's n first).

        Under expert parallelism a forward is a collective of the EP group whose ranks must bring equally many
        tokens (the MoE dispatcher all-gathers them), while each data-parallel rank has prompts of its own: the
        group runs its ranks' calls one after another, every rank taking part in each with that rank's prompts
        and seed, and each keeps its own. A rank's rollouts are those it samples alone (as at EP1), for EP times
        the generation work; an SGLang server is the engine for expert-parallel runs at scale."""
        group = parallel_state.get_expert_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return self._generate(prompts, sampling)
        calls: list = [None] * dist.get_world_size(group)  # every EP rank's (prompts, sampling), seed resolved
        dist.all_gather_object(calls, (prompts, dataclasses.replace(sampling, seed=self._seed(sampling.seed))),
                               group=group)
        return [self._generate(*call) for call in calls][dist.get_rank(group)]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """generate() on this rank (and its TP group) alone."""
        if sampling.n < 1 or sampling.max_new_tokens < 1:
            raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got n={sampling.n} "
                             f"max_new_tokens={sampling.max_new_tokens}")
        if sampling.n > self.max_batch_size:
            raise ValueError(f"n={sampling.n} samples per prompt exceed max_batch_size={self.max_batch_size}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token; got an empty prompt")
        limit = self.model.max_sequence_length
        longest = max((len(p) for p in prompts), default=0)
        if longest + sampling.max_new_tokens > limit:
            raise ValueError(f"prompt length {longest} + max_new_tokens {sampling.max_new_tokens} exceeds the "
                             f"model's max_sequence_length {limit}")
        seed = self._seed(sampling.seed)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        device = next(self.model.parameters()).device
        shared = torch.Generator(device=device).manual_seed(seed)
        local = torch.Generator(device=device).manual_seed(seed * 1009 + 7919 * (tp_rank + 1))
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        results: dict[int, list[Rollout]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            per_batch = max(1, self.max_batch_size // sampling.n)
            for length in sorted(by_length):
                indices = by_length[length]
                for start in range(0, len(indices), per_batch):
                    chunk = indices[start:start + per_batch]
                    rollouts = self._generate_batch([prompts[i] for i in chunk], sampling, shared, local, device)
                    for j, i in enumerate(chunk):
                        group = rollouts[j * sampling.n:(j + 1) * sampling.n]
                        for r in group:
                            r.prompt_index = i
                        results[i] = group
        finally:
            self.model.train(was_training)
        return [r for i in range(len(prompts)) for r in results[i]]

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams, shared: torch.Generator,
                        local: torch.Generator, device: torch.device) -> list[Rollout]:
        """Prefill equal-length prompts[P][L] once, repeat the cache n times, decode P*n rows in lockstep."""
        n, rows, length = sampling.n, len(prompts) * sampling.n, len(prompts[0])
        context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=length + sampling.max_new_tokens)
        tokens = torch.tensor(prompts, dtype=torch.long, device=device)
        positions = torch.arange(length, device=device).expand(len(prompts), length)
        logits = self._forward(tokens, positions, context)  # [P, V/tp] on the last stage, None before it
        for layer, (keys, values) in context.key_value_memory_dict.items():  # [seq, batch, groups, dim]
            keys[:length, :rows] = keys[:length, :len(prompts)].repeat_interleave(n, dim=1)
            values[:length, :rows] = values[:length, :len(prompts)].repeat_interleave(n, dim=1)
        context.sequence_len_offset = length
        last_stage = logits is not None
        if last_stage:
            logits = logits.repeat_interleave(n, dim=0)
            vocab_start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
            padding = (torch.arange(vocab_start, vocab_start + logits.shape[-1], device=device)
                       >= self.tokenizer.vocab_size)
        # host side: ids[rows, max_new] filled a column a step; device side: log-probs until the end
        stops = self._stop_strings(sampling.stop)
        stop_ids = np.array(sampling.stop_token_ids, dtype=np.int64)
        generated = np.zeros((rows, sampling.max_new_tokens), dtype=np.int64)
        logprobs = torch.zeros(rows, sampling.max_new_tokens, device=device)
        lengths = np.zeros(rows, dtype=np.int64)
        stopped = np.zeros(rows, dtype=bool)
        # The decode steps reach none of megatron's device='cuda' literals (the prefill's causal mask does),
        # so on CPU they run without the compat mode's hop on each of a forward's ~570 torch calls. They run
        # under inference_mode, the prefill not: the rotary table megatron caches per length is made by the
        # prefill and reused by training forwards, so it must stay a normal tensor.
        with cuda_redirects_paused(), torch.inference_mode():
            for step in range(sampling.max_new_tokens):
                next_ids = next_lp = torch.zeros(rows, dtype=torch.long, device=device)
                if last_stage:
                    scores = logits.float().masked_fill(padding, float("-inf"))
                    if sampling.temperature > 0:
                        scores = scores / sampling.temperature
                    if sampling.temperature > 0 and (sampling.top_k > 0 or sampling.top_p < 1.0):
                        next_ids = truncated_sample(scores, vocab_start, sampling.top_k, sampling.top_p, shared)
                    else:
                        next_ids = gumbel_argmax(scores, vocab_start, local if sampling.temperature > 0 else None)
                    next_lp = vocab_parallel_logprob(scores, next_ids, vocab_start)
                next_ids, next_lp = _from_last_stage(next_ids, next_lp)
                logprobs[:, step] = next_lp
                generated[:, step] = next_ids.cpu().numpy()  # the step's one host sync
                active = ~stopped
                lengths[active] = step + 1
                stopped |= active & np.isin(generated[:, step], stop_ids)
                if stops is not None:
                    for r in np.flatnonzero(~stopped & active & stops.may_end[generated[:, step]]):
                        stopped[r] = stops.completed_by_last(generated[r, :step + 1])
                if stopped.all() or step == sampling.max_new_tokens - 1:
                    break
                position = torch.full((rows, 1), length + step, dtype=torch.long, device=device)
                logits = self._forward(next_ids[:, None], position, context)
                context.sequence_len_offset += 1
        token_ids, logprobs = generated.tolist(), logprobs.tolist()
        return [Rollout(prompt_ids=list(prompts[r // n]), token_ids=token_ids[r][:lengths[r]],
                        text=self.tokenizer.decode(token_ids[r][:lengths[r]]), logprobs=logprobs[r][:lengths[r]],
                        finish_reason="stop" if stopped[r] else "length", weight_version=self.weight_version)
                for r in range(rows)]

    def _stop_strings(self, stops: list[str]) -> Optional[StopStrings]:
        """The StopStrings of `stops` (None when there are none), built once per set of stops."""
        key = tuple(s for s in stops if s)
        if not key:
            return None
        if key not in self._stops:
            self._stops[key] = StopStrings(self.tokenizer, key)
        return self._stops[key]

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                 context: StaticInferenceContext) -> Optional[torch.Tensor]:
        """This stage's forward of tokens[b, s] (KV cache in `context`): hidden states [s, b, h] come from the
        previous stage and go to the next; the last stage returns the logits of the last position [b, V/tp]."""
        if not parallel_state.is_pipeline_first_stage():
            config = self.model.config
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], config.hidden_size, device=tokens.device,
                                 dtype=config.pipeline_dtype or config.params_dtype)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        out = self.model(tokens, positions, None, inference_context=context)
        if not parallel_state.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return out[:, -1]
