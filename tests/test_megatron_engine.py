"""MegatronEngine: KV-cache sampling agrees with a full forward of the same GPTModel, at TP1 and TP2; at PP2
(hidden states passed stage to stage) it writes the same rollouts as at PP1 from the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rntp_megatron.runtime.spawn import run_ranks

PROMPTS = ["#ab;c?<think>", "#xy;z?<think>", "hello world", "#ab;c?<think>"]  # two lengths, one repeated


def _setup(tp: int, seed: int = 11):
    from rntp_megatron.config import build_config
    from rntp_megatron.data.tokenizer import ByteTokenizer
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rollout.megatron_engine import MegatronEngine
    from rntp_megatron.runtime import init_distributed

    cfg = build_config({"model": {"card": "tiny", "vocab_size": 262},
                        "parallel": {"tensor_model_parallel_size": tp}})
    init_distributed(cfg.parallel, seed=seed)
    tok = ByteTokenizer()
    model = build_model(cfg.model, cfg.parallel)
    return model, tok, MegatronEngine(model, tok, max_batch_size=8)


@torch.no_grad()
def _full_logits(model, ids: list[int], vocab: int) -> torch.Tensor:
    """float64 logits[s, vocab] of one full forward, gathered over TP (the reference, no KV cache)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens = torch.tensor([ids])
    local = model(tokens, torch.arange(len(ids))[None], None)
    return gather_from_tensor_model_parallel_region(local)[0, :, :vocab].double()


def _check_rollouts(model, tok, rollouts, temperature: float, top_k: int = 0) -> float:
    """max |engine log-prob - full-forward log-prob|; asserts sampled ids are real and inside the top-k."""
    worst = 0.0
    for r in rollouts:
        assert len(r.logprobs) == len(r.token_ids) > 0
        logits = _full_logits(model, r.prompt_ids + r.token_ids, tok.vocab_size)
        steps = logits[len(r.prompt_ids) - 1:-1]
        ref = (steps / (temperature or 1.0)).log_softmax(-1)
        ids = torch.tensor(r.token_ids)
        got = torch.tensor(r.logprobs, dtype=torch.float64)
        worst = max(worst, (ref.gather(1, ids[:, None])[:, 0] - got).abs().max().item())
        if temperature == 0:
            assert r.token_ids == steps.argmax(-1).tolist()
        if top_k:
            assert all(int(i) in steps[j].topk(top_k).indices.tolist() for j, i in enumerate(ids))
    return worst


def _engine_checks(rank: int, world_size: int, tp: int) -> dict:
    from rntp_megatron.rollout.engine import SamplingParams
    from rntp_megatron.runtime import destroy_distributed

    model, tok, engine = _setup(tp)
    prompts = [tok.encode(p) for p in PROMPTS]
    out = {}
    sampled = engine.generate(prompts, SamplingParams(temperature=1.0, n=3, max_new_tokens=10, seed=5))
    assert [r.prompt_index for r in sampled] == [i for i in range(len(prompts)) for _ in range(3)]
    assert all(r.prompt_ids == prompts[r.prompt_index] for r in sampled)
    out["lp_t1"] = _check_rollouts(model, tok, sampled, 1.0)
    # n samples of one prompt differ (independent draws from the shared prefill)
    out["distinct"] = len({tuple(r.token_ids) for r in sampled[:3]})
    topk = engine.generate(prompts, SamplingParams(temperature=0.7, top_k=5, n=2, max_new_tokens=8, seed=6))
    out["lp_topk"] = _check_rollouts(model, tok, topk, 0.7, top_k=5)
    topp = engine.generate(prompts[:2], SamplingParams(temperature=0.7, top_p=0.3, n=2, max_new_tokens=8, seed=7))
    out["lp_topp"] = _check_rollouts(model, tok, topp, 0.7)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    g1 = engine.generate(prompts, greedy)
    out["lp_greedy"] = _check_rollouts(model, tok, g1, 0.0)
    g2 = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16, n=2))
    out["greedy_same"] = [r.token_ids for r in g1] == [r.token_ids for r in g2[::2]] == [r.token_ids for r in g2[1::2]]
    out["repeat_prompt_same"] = g1[0].token_ids == g1[3].token_ids
    # Decode forwards run under inference_mode: the rotary table megatron caches per length (called here as
    # GPTModel calls it) comes from the prefill and must stay a normal tensor, since training reuses it.
    rotary = model.rotary_pos_emb(len(prompts[0]) + greedy.max_new_tokens, packed_seq=False, cp_group=None)
    out["rotary_is_inference_tensor"] = rotary.is_inference()
    # stop token: the 4th greedy token of prompt 0 ends generation at its first occurrence
    ids = g1[0].token_ids
    stop_id = ids[3]
    cut = ids.index(stop_id) + 1
    stopped = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=[stop_id]))
    out["stop_token"] = (stopped[0].token_ids == ids[:cut], stopped[0].finish_reason)
    # stop string: two consecutive printable greedy tokens; reference = shortest prefix whose text contains it
    j = next(j for j in range(1, len(ids)) if all(32 <= t < 127 for t in ids[j - 1:j + 1]))
    stop = tok.decode(ids[j - 1:j + 1])
    cut = next(m for m in range(1, len(ids) + 1) if stop in tok.decode(ids[:m]))
    stopped = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=16, stop=[stop]))
    out["stop_string"] = (stopped[0].token_ids == ids[:cut], stopped[0].finish_reason, stopped[0].text.endswith(stop))
    out["length"] = (len(g1[1].token_ids), g1[1].finish_reason)
    engine.update_weights([], version=3)
    out["version"] = engine.generate(prompts[:1], greedy)[0].weight_version
    out["tokens"] = [r.token_ids for r in sampled + topk + g1]
    destroy_distributed()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_engine_matches_full_forward(tp):
    results = run_ranks(_engine_checks, tp, args=(tp,))
    out = results[0]
    for key in ("lp_t1", "lp_topk", "lp_topp", "lp_greedy"):
        assert out[key] < 1e-4, f"{key}: engine log-probs differ from the full forward by {out[key]}"
    assert out["distinct"] > 1
    assert out["greedy_same"] and out["repeat_prompt_same"]
    assert not out["rotary_is_inference_tensor"]
    assert out["stop_token"] == (True, "stop")
    assert out["stop_string"] == (True, "stop", True)
    assert out["length"] == (16, "length")
    assert out["version"] == 3
    # every TP rank returns the same rollouts
    assert all(r["tokens"] == out["tokens"] for r in results)


def _sampler_statistics(rank: int, world_size: int) -> dict:
    """Empirical token frequencies of the Gumbel-max and top-k samplers vs the exact distributions."""
    from rntp_megatron.rollout.megatron_engine import gumbel_argmax, truncated_sample
    from rntp_megatron.runtime import destroy_distributed

    _setup(world_size)
    torch.manual_seed(0)
    full = torch.randn(12) * 1.5  # same on every rank
    width = 12 // world_size
    local = full[rank * width:(rank + 1) * width]
    rows = 40000
    scores = local.expand(rows, width).contiguous()
    g = torch.Generator().manual_seed(100 + rank)
    gumbel = torch.bincount(gumbel_argmax(scores, rank * width, g), minlength=12).double() / rows
    shared = torch.Generator().manual_seed(5)
    topk = torch.bincount(truncated_sample(scores, rank * width, 4, 1.0, shared), minlength=12).double() / rows
    exact_topk = torch.full((12,), float("-inf"))
    keep = full.topk(4).indices
    exact_topk[keep] = full[keep]
    destroy_distributed()
    return {"gumbel": (gumbel - full.double().softmax(0)).abs().max().item(),
            "topk": (topk - exact_topk.double().softmax(0)).abs().max().item()}


@pytest.mark.distributed
def test_samplers_draw_from_the_right_distribution():
    out = run_ranks(_sampler_statistics, 2)[0]
    assert out["gumbel"] < 0.012, out
    assert out["topk"] < 0.012, out


def _pipeline_rollouts(rank: int, world_size: int, root: str) -> dict:
    """Greedy and sampled rollouts of the tiny model at PP = world_size; at PP1 it first saves its weights to
    `root`, at PP2 it loads them from there (a checkpoint loads at another layout)."""
    from rntp_megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from rntp_megatron.config import build_config
    from rntp_megatron.data.tokenizer import ByteTokenizer
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rollout.engine import SamplingParams
    from rntp_megatron.rollout.megatron_engine import MegatronEngine
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "tiny", "vocab_size": 262},
                        "parallel": {"pipeline_model_parallel_size": world_size}})
    init_distributed(cfg.parallel, seed=11)
    try:
        model = build_model(cfg.model, cfg.parallel)
        if world_size == 1:
            save_checkpoint(root, 1, [model], None, trainer_state={"step": 1}, rank_state={})
        else:
            load_checkpoint(latest_checkpoint(root), [model], optimizer=None)
        tok = ByteTokenizer()
        engine = MegatronEngine(model, tok, max_batch_size=8)
        prompts = [tok.encode(p) for p in PROMPTS]
        greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
        sampled = engine.generate(prompts, SamplingParams(temperature=1.0, n=2, max_new_tokens=12, seed=3,
                                                          stop_token_ids=[ord("a")]))
        return {name: [(r.token_ids, r.logprobs, r.finish_reason, r.prompt_index) for r in rollouts]
                for name, rollouts in (("greedy", greedy), ("sampled", sampled))}
    finally:
        destroy_distributed()


@pytest.mark.distributed
def test_engine_generates_at_pp2_as_at_pp1(tmp_path):
    [pp1] = run_ranks(_pipeline_rollouts, 1, args=(str(tmp_path),))
    pp2 = run_ranks(_pipeline_rollouts, 2, args=(str(tmp_path),))
    assert pp2[0] == pp2[1]  # both stages return the same rollouts
    for name in ("greedy", "sampled"):
        for (ids1, lp1, fin1, i1), (ids2, lp2, fin2, i2) in zip(pp1[name], pp2[0][name], strict=True):
            assert (ids1, fin1, i1) == (ids2, fin2, i2), name
            assert max(abs(a - b) for a, b in zip(lp1, lp2)) < 1e-5, name


def _old_loop_stops(tok, ids: list[int], stops: list[str], stop_ids: list[int]) -> int:
    """Where the loop before token-id stop matching cut a row: the first m at which ids[m-1] is a stop id or
    the text of ids[:m] holds a stop string in its last len(s) + len(text of ids[m-1]) - 1 characters (its
    `_hits_stop`, which decoded the whole row at every step); len(ids) + 1 when none did."""
    for m in range(1, len(ids) + 1):
        text, last = tok.decode(ids[:m]), len(tok.decode(ids[m - 1:m]))
        if ids[m - 1] in stop_ids or any(s in text[-(len(s) + last - 1):] for s in stops if s):
            return m
    return len(ids) + 1


class _CountingByteTokenizer:
    """The byte tokenizer, counting decode calls."""

    def __init__(self) -> None:
        from rntp_megatron.data.tokenizer import ByteTokenizer

        self.inner, self.decodes = ByteTokenizer(), 0
        self.vocab_size, self.eos_id, self.pad_id = self.inner.vocab_size, self.inner.eos_id, self.inner.pad_id

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        self.decodes += 1
        return self.inner.decode(ids)

    def token_bytes(self, token_id):
        return self.inner.token_bytes(token_id)


HOST_TRANSFERS = {"tolist", "item", "cpu", "__bool__", "__int__", "__float__", "__index__"}  # each one a sync on a GPU


def _decode_loop_checks(rank: int, world_size: int) -> dict:
    """The demo model (random weights) and the byte tokenizer: rollouts with stop strings and ids equal the
    unstopped rollouts cut where the old loop cut them; host transfers and decodes a generate call makes."""
    from torch.overrides import TorchFunctionMode

    from rntp_megatron.config import build_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rollout.engine import SamplingParams
    from rntp_megatron.rollout.megatron_engine import MegatronEngine
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = build_config({"model": {"card": "demo"}})
    init_distributed(cfg.parallel, seed=3)
    tok = _CountingByteTokenizer()
    engine = MegatronEngine(build_model(cfg.model, cfg.parallel), tok, max_batch_size=16)
    prompts = [tok.encode(p) for p in PROMPTS]
    out: dict = {"cases": []}
    for sampling in (SamplingParams(temperature=1.0, n=4, max_new_tokens=24, seed=5),
                     SamplingParams(temperature=0.0, n=1, max_new_tokens=24)):
        free = engine.generate(prompts, sampling)
        rows = [r.token_ids for r in free]
        printable = [bytes(r[j:j + 3]).decode() for r in rows for j in range(len(r) - 2)
                     if all(32 <= t < 127 for t in r[j:j + 3])]
        # a two-byte UTF-8 character sampled in some row: a stop string that straddles two byte tokens
        accented = [bytes(r[j:j + 2]).decode() for r in rows for j in range(len(r) - 1)
                    if 0xC2 <= r[j] <= 0xDF and 0x80 <= r[j + 1] <= 0xBF]
        stops = ["</answer>", printable[0][:2], printable[-1], *accented[:1]]
        stop_ids = [rows[1][5]] if sampling.n > 1 else []
        stopped = engine.generate(prompts, dataclasses.replace(sampling, stop=stops, stop_token_ids=stop_ids))
        want = []
        for r in free:
            cut = _old_loop_stops(tok, r.token_ids, stops, stop_ids)
            want.append((r.token_ids[:cut], tok.decode(r.token_ids[:cut]), r.logprobs[:cut],
                         "stop" if cut <= len(r.token_ids) else "length"))
        got = [(r.token_ids, r.text, r.logprobs, r.finish_reason) for r in stopped]
        out["cases"].append({"equal": got == want, "stops": stops, "accented": bool(accented),
                             "finished": sum(w[3] == "stop" for w in want), "rows": len(want)})

    class HostTransfers(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += getattr(func, "__name__", "") in HOST_TRANSFERS
            return func(*args, **(kwargs or {}))

    sampling = SamplingParams(temperature=1.0, n=4, max_new_tokens=16, seed=9, stop=["</answer>"])
    tok.decodes = 0
    with HostTransfers() as mode:
        rollouts = engine.generate(prompts, sampling)
    out["transfers"], out["decodes"] = mode.count, tok.decodes
    out["steps"] = sampling.max_new_tokens * len({len(p) for p in prompts})  # a batch per prompt length
    out["batches"] = len({len(p) for p in prompts})
    out["row_steps"] = sum(len(r.token_ids) for r in rollouts)
    out["rows"] = len(rollouts)
    out["may_end_tokens"] = sum(t in (ord(">"), *range(256, 262)) for r in rollouts for t in r.token_ids)
    destroy_distributed()
    return out


@pytest.mark.distributed
def test_decode_loop_matches_old_loop_with_one_transfer_a_step():
    [out] = run_ranks(_decode_loop_checks, 1)
    for case in out["cases"]:
        assert case["equal"], case
        assert case["finished"] > 0, case  # some rows did stop on a string or id
    assert out["cases"][0]["accented"], out["cases"][0]  # a stop string straddled two byte tokens
    # per decode step one device->host transfer (the sampled ids), two a batch at its end (ids and log-probs)
    # and the seed, whatever the row count; the old loop made two a step (ids and log-probs)
    assert out["transfers"] <= out["steps"] + 2 * out["batches"] + 1, out
    # a row's text is decoded once at the end, and a short tail (twice, or four times when the tail doubles)
    # only at steps whose token holds ">": the old loop decoded every active row's whole text twice a step
    assert out["decodes"] <= out["rows"] + 4 * out["may_end_tokens"] < out["row_steps"], out
