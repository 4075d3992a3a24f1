"""Generation through SGLang's /generate: the request for sampling.n samples per prompt, and rollouts (tokens,
log-probs, weight version, routed experts) read from its replies.

`padding_ids` (the served model's rows beyond the tokenizer's vocabulary, e.g. Qwen3's 151936 vs ~151669) are
never sampled (a logit bias of PADDING_BIAS), so rollouts and their log-probs follow the distribution over the
real vocabulary that the trainer recomputes (rl/logprobs.mask_padded_vocab)."""

from __future__ import annotations

import base64
from typing import Any, Callable, Optional

import torch

from rntp_megatron.rollout.engine import Rollout, SamplingParams
from rntp_megatron.rollout.sglang.client import SGLangServerError, reply_version

PADDING_BIAS = -1.0e4  # added to a logit, exp() underflows to 0 in float32; JSON has no -inf


def generate_request(prompts: list[list[int]], sampling: SamplingParams, logit_bias: dict[str, float],
                     routed_experts: bool) -> dict[str, Any]:
    """The /generate request: sampling.n requests per prompt (prompt 0's first), with per-token log-probs."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs non-empty prompts (lists of token ids)")
    # One request per sample, prompts repeated: SGLang's radix cache shares each prompt's prefill.
    expanded = [p for p in prompts for _ in range(sampling.n)]
    params: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                              "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                              "max_new_tokens": sampling.max_new_tokens, "stop": list(sampling.stop),
                              "stop_token_ids": list(sampling.stop_token_ids), "skip_special_tokens": False,
                              "no_stop_trim": True}
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    if logit_bias:
        params["logit_bias"] = logit_bias
    request: dict[str, Any] = {"input_ids": expanded, "sampling_params": params, "return_logprob": True}
    if routed_experts:
        request["return_routed_experts"] = True  # every position's; the prompt's are cut off by generated_experts
    return request


def rollouts_from_replies(request: dict[str, Any], replies: list[dict[str, Any]], n: int, url: str,
                          decode: Optional[Callable[[list[int]], str]] = None,
                          routed_experts: Optional[tuple[int, int]] = None) -> list[Rollout]:
    """One Rollout per reply of the request (n per prompt): tokens, their log-probs, the weight version that made
    them; SGLangServerError for a request the server aborted."""
    rollouts = []
    for i, (prompt, reply) in enumerate(zip(request["input_ids"], replies)):
        meta = reply["meta_info"]
        finish = (meta.get("finish_reason") or {}).get("type", "length")
        if finish == "abort":
            raise SGLangServerError(f"request {i} was aborted by the server: {meta.get('finish_reason')}")
        tokens = [int(t[1]) for t in meta["output_token_logprobs"]]
        rollouts.append(Rollout(
            prompt_ids=list(prompt), token_ids=tokens,
            text=decode(tokens) if decode is not None else reply.get("text", ""),
            logprobs=[float(t[0]) for t in meta["output_token_logprobs"]],
            finish_reason="stop" if finish == "stop" else "length",
            weight_version=reply_version(meta.get("weight_version")), prompt_index=i // n,
            routed_experts=generated_experts(meta, len(prompt), len(tokens), routed_experts, url)))
    return rollouts


def generated_experts(meta: dict[str, Any], prompt_len: int, generated: int,
                      routed_experts: Optional[tuple[int, int]], url: str) -> Optional[torch.Tensor]:
    """int32[generated, layers, k]: of SGLang's routed experts of positions [0, prompt + generated - 1) (base64
    int32 [positions, layers, k]; the last token is never fed), those of the positions predicting the
    generated tokens, prompt_len - 1 on; None unless routed_experts is (layers, k)."""
    if routed_experts is None:
        return None
    if meta.get("routed_experts") is None:
        raise SGLangServerError(
            f"the SGLang server at {url} returned no routed experts: start it with "
            "--enable-return-routed-experts, or set rollout.sglang.routed_experts: false (no "
            "moe/rollout_routing_mismatch then)")
    layers, k = routed_experts
    flat = torch.frombuffer(bytearray(base64.b64decode(meta["routed_experts"])), dtype=torch.int32)
    positions = prompt_len + generated - 1
    if flat.numel() != positions * layers * k:
        raise SGLangServerError(f"the SGLang server at {url} returned {flat.numel()} routed experts "
                                f"for {positions} positions of {layers} layers, top {k}: does it serve this "
                                "model (model.num_layers, model.moe_router_topk)?")
    return flat.view(positions, layers, k)[prompt_len - 1:].clone()
