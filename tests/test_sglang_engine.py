"""SGLangEngine against a real SGLang server (its own virtualenv, tools/install_sglang.sh).

Sharded Megatron models (TP2 and PP2, gloo ranks) take one SGD step on a next-token loss, their weights are
gathered through weights/export and pushed through each channel (tensor, distributed over gloo, disk); the
server's log-probs on fixed prompts must then match the trainer's own forward. Also: the RolloutEngine
contract, an update while a request is in flight (pause, update, continue), and a killed server that is
detected and restarted with the current weights. Two server starts in all (module fixture + restart test).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from rntp_megatron.config import SGLangConfig, build_config
from rntp_megatron.runtime.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = Path(os.environ.get("RNTP_SGLANG_PYTHON", ROOT / "sglang-venv" / "bin" / "python"))
pytestmark = [
    pytest.mark.sglang, pytest.mark.slow,
    pytest.mark.skipif(not SGLANG_PYTHON.exists(),
                       reason=f"SGLang server virtualenv missing ({SGLANG_PYTHON}); run tools/install_sglang.sh"),
]
PROMPTS = [[72, 101, 108, 108, 111, 44, 32, 119], [1, 5, 9, 200, 3, 77, 31, 4, 4, 90], [10, 11, 12]]
LOGPROB_TOL = 2e-4  # server in float32; the remaining gap is kernel order (torch_native attention vs megatron)


def model_cfg():
    return build_config({"model": {"card": "tiny_qwen2", "transformer_impl": "local"}}).model


def write_initial_model(folder: Path) -> dict[str, torch.Tensor]:
    """A random tiny_qwen2 HF folder (weights, config.json, byte tokenizer) to start the server from."""
    import transformers

    from rntp_megatron.model import hf_mapping
    from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer
    from rntp_megatron.weights.buckets import bucketed
    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

    cfg = model_cfg()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**hf_mapping.hf_config(cfg, torch_dtype="float32"))).float()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tok = write_byte_tokenizer(folder.parent / "tokenizer", eos_id=None)  # no EOS: lengths are exact
    save_hf_checkpoint(bucketed(state.items(), 1 << 30), folder, cfg, tokenizer_dir=tok)
    return state


def _train_step_and_export(rank: int, world_size: int, tp: int, pp: int, init: dict, out_file: str) -> None:
    """One SGD step of next-token loss on a TP/PP-sharded model; rank 0 saves the gathered HF tensors and the
    trainer's log-probs of PROMPTS after the step (TP: megatron's own forward; PP: the same weights in HF)."""
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import gather_hf_state_dict
    from rntp_megatron.weights.hf_checkpoint import load_hf_weights

    cfg = model_cfg()
    parallel = build_config({"parallel": {"tensor_model_parallel_size": tp,
                                          "pipeline_model_parallel_size": pp}}).parallel
    init_distributed(parallel, seed=3)
    try:
        model = build_model(cfg, parallel)
        load_hf_weights(model, init, cfg)
        tokens = torch.tensor([PROMPTS[1][:8], PROMPTS[0][:8]])
        positions = torch.arange(8).expand_as(tokens)
        if pp == 1:
            loss = model(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).mean()
            loss.backward()
        else:  # the pipeline's own forward/backward schedule
            from megatron.core.pipeline_parallel import get_forward_backward_func

            def forward_step(_, m):
                return m(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]), lambda out: (
                    out.mean(), {"loss": out.mean().detach()})

            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                        num_microbatches=1, seq_length=7, micro_batch_size=2, forward_only=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 5.0 * p.grad  # a large step, so that stale weights would show in the log-probs
        state = gather_hf_state_dict(model, cfg)
        trainer_logprobs = None
        if pp == 1:
            with torch.no_grad():
                trainer_logprobs = []
                for prompt in PROMPTS:
                    ids = torch.tensor([prompt])
                    logits = model(ids, torch.arange(len(prompt))[None], None)
                    parts = [torch.empty_like(logits) for _ in range(tp)]
                    torch.distributed.all_gather(parts, logits.contiguous(),
                                                 group=parallel_state.get_tensor_model_parallel_group())
                    lp = torch.log_softmax(torch.cat(parts, -1)[0, :, :cfg.vocab_size].double(), -1)
                    trainer_logprobs.append(lp[torch.arange(len(prompt) - 1), ids[0, 1:]].tolist())
        if rank == 0:
            save_file(state, out_file)
            torch.save(trainer_logprobs, out_file + ".logprobs")
    finally:
        destroy_distributed()


def hf_model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The tiny model in HF transformers, float64, eager attention, with these (tied) weights."""
    import transformers

    from rntp_megatron.model import hf_mapping

    config = transformers.AutoConfig.for_model(**hf_mapping.hf_config(model_cfg(), torch_dtype="float32"))
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    model.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    return model


def hf_logprobs(state: dict[str, torch.Tensor]) -> list[list[float]]:
    """log p(prompt[t] | prompt[<t]) of PROMPTS under HF transformers in float64 with these weights."""
    model = hf_model(state)
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
            out.append(lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].tolist())
    return out


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sglang")


@pytest.fixture(scope="module")
def initial(workdir):
    return write_initial_model(workdir / "init")


@pytest.fixture(scope="module")
def trained(workdir, initial):
    """{(tp, pp): (gathered HF tensors after one step, trainer log-probs or None)} from gloo ranks."""
    from safetensors.torch import load_file

    out = {}
    for tp, pp in [(2, 1), (1, 2)]:
        path = str(workdir / f"tp{tp}pp{pp}.safetensors")
        run_ranks(_train_step_and_export, tp * pp, (tp, pp, initial, path))
        out[(tp, pp)] = (load_file(path), torch.load(path + ".logprobs"))
    return out


@pytest.fixture(scope="module")
def engine(workdir, initial):
    from rntp_megatron.rollout.sglang.engine import SGLangEngine

    cfg = SGLangConfig(python=str(SGLANG_PYTHON), port=_port(), max_restarts=0)
    eng = SGLangEngine(cfg, model_path=workdir / "init", run_dir=workdir / "run", dtype="float32")
    yield eng
    eng.close()


def _port() -> int:
    from rntp_megatron.runtime.spawn import free_port

    return free_port()


def test_generate_follows_the_rollout_contract(engine, initial):
    from rntp_megatron.rollout.engine import SamplingParams

    rollouts = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=5))
    assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1]
    for r in rollouts:
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert len(r.token_ids) == len(r.logprobs) == 6 and r.finish_reason == "length"
        assert all(lp <= 0 for lp in r.logprobs) and r.weight_version == engine.weight_version
        assert r.text == bytes(r.token_ids).decode("utf-8", errors="replace")
    # the rollout log-probs are the served model's: re-score the sampled tokens by teacher forcing
    first = rollouts[0]
    scored = engine.prompt_logprobs([first.prompt_ids + first.token_ids])[0][len(first.prompt_ids) - 1:]
    assert max(abs(a - b) for a, b in zip(scored, first.logprobs)) < 1e-3
    assert max_gap(engine.prompt_logprobs(PROMPTS), hf_logprobs(initial)) < LOGPROB_TOL
    with pytest.raises(ValueError, match="non-empty"):
        engine.generate([[]], SamplingParams())


def test_padding_ids_are_never_sampled(engine, initial):
    """Ids beyond the tokenizer's vocabulary (here: pretend it ends at 200 of the model's 256) are never sampled,
    and the rollout log-probs are those of the softmax over the real ids, as the trainer recomputes them."""
    from rntp_megatron.rollout.engine import SamplingParams
    from rntp_megatron.rollout.sglang.engine import SGLangEngine

    real = 200
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=11)
    unmasked = [t for r in engine.generate(PROMPTS, sampling) for t in r.token_ids]
    assert max(unmasked) >= real  # near-uniform random weights: without the bias, padding ids do come out
    attached = SGLangEngine(SGLangConfig(url=engine.client.url, api_key=engine.api_key),
                            padding_ids=range(real, model_cfg().vocab_size))
    rollouts = attached.generate(PROMPTS, sampling)
    assert max(t for r in rollouts for t in r.token_ids) < real
    model = hf_model(initial)
    with torch.no_grad():
        for r in rollouts[::4]:
            ids = torch.tensor([r.prompt_ids + r.token_ids])
            logits = model(ids).logits[0, len(r.prompt_ids) - 1:-1, :real]
            expected = torch.log_softmax(logits, -1)[torch.arange(len(r.token_ids)), ids[0, len(r.prompt_ids):]]
            assert max(abs(a - b) for a, b in zip(expected.tolist(), r.logprobs)) < 1e-3


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("channel", ["tensor", "distributed", "disk"])
def test_pushed_weights_match_trainer_forward(engine, trained, initial, channel, layout):
    from rntp_megatron.weights.buckets import bucketed

    state, trainer_lp = trained[layout]
    reference = trainer_lp if trainer_lp is not None else hf_logprobs(state)
    if trainer_lp is not None:  # the TP2 trainer's own forward agrees with HF on the gathered weights
        assert max_gap(trainer_lp, hf_logprobs(state)) < 1e-5
    before = engine.prompt_logprobs(PROMPTS)
    assert max_gap(before, reference) > 50 * LOGPROB_TOL  # the step changed the model visibly
    version = engine.weight_version + 1
    engine.cfg.weight_sync = channel
    engine.update_weights_from_buckets(bucketed(state.items(), 48 * 1024), version)  # several buckets
    assert max_gap(engine.prompt_logprobs(PROMPTS), reference) < LOGPROB_TOL
    assert engine.server_weight_version() == version
    # back to the initial weights, so that every case starts from the same served model
    engine.update_weights(initial.items(), version + 1)
    assert max_gap(engine.prompt_logprobs(PROMPTS), hf_logprobs(initial)) < LOGPROB_TOL


def _mirror_push(rank: int, world_size: int, init: dict, url: str, api_key: str, version: int, out_file: str
                 ) -> None:
    """TP2 x PP2 ranks change the initial weights, then push them from a SharedHFMirror to the server (attached
    by URL on rank 0, tensor channel); rank 0 saves the transfer stream's HF tensors as the reference."""
    from safetensors.torch import save_file

    from rntp_megatron.model.provider import build_model
    from rntp_megatron.rollout.sglang.engine import SGLangEngine
    from rntp_megatron.runtime import destroy_distributed, init_distributed
    from rntp_megatron.weights.export import gather_hf_state_dict
    from rntp_megatron.weights.hf_checkpoint import load_hf_weights
    from rntp_megatron.weights.shared_mirror import shared_mirror

    cfg = model_cfg()
    parallel = build_config({"parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}}).parallel
    init_distributed(parallel, seed=3)
    try:
        model = build_model(cfg, parallel)
        load_hf_weights(model, init, cfg)
        torch.manual_seed(11)  # the same change on every TP rank, so replicated norms stay replicas
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        state = gather_hf_state_dict(model, cfg)
        mirror = shared_mirror(model, cfg, bucket_bytes=48 * 1024)
        assert mirror is not None
        if rank == 0:
            attached = SGLangEngine(SGLangConfig(url=url, api_key=api_key, weight_sync="tensor"))
            attached.update_weights_from_buckets(mirror.stream(), version)
            save_file(state, out_file)
        else:
            list(mirror.stream())
    finally:
        destroy_distributed()


def test_tp2_pp2_shared_mirror_pushes_into_the_server(engine, workdir, initial):
    from safetensors.torch import load_file

    path, version = str(workdir / "mirror.safetensors"), engine.weight_version + 1
    run_ranks(_mirror_push, 4, (initial, engine.client.url, engine.api_key, version, path))
    state = load_file(path)
    reference = hf_logprobs(state)
    assert max_gap(hf_logprobs(initial), reference) > 50 * LOGPROB_TOL  # the change shows in the log-probs
    assert max_gap(engine.prompt_logprobs(PROMPTS), reference) < LOGPROB_TOL
    assert engine.server_weight_version() == version
    engine.weight_version = version
    engine.update_weights(initial.items(), version + 1)


def test_update_while_a_request_is_in_flight(engine, trained, initial):
    from rntp_megatron.rollout.engine import SamplingParams

    engine.cfg.weight_sync = "distributed"
    state, _ = trained[(2, 1)]
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=engine.generate(
        [PROMPTS[2]], SamplingParams(temperature=1.0, max_new_tokens=500))))  # 503 of the 512 positions
    version = engine.weight_version + 1
    worker.start()
    time.sleep(0.5)
    with engine.paused():
        assert worker.is_alive(), "the request finished before the pause; nothing was in flight"
        time.sleep(1.0)
        assert worker.is_alive()  # retracted: it cannot finish while paused
        engine.update_weights(state.items(), version)
    worker.join(timeout=300)
    [rollout] = result["r"]
    assert rollout.weight_version == version and len(rollout.token_ids) == 500
    assert engine.server_weight_version() == version
    engine.update_weights(initial.items(), version + 1)


def test_killed_server_is_detected_and_restarted_with_current_weights(workdir, trained):
    from rntp_megatron.rollout.engine import SamplingParams
    from rntp_megatron.rollout.sglang.client import SGLangServerError
    from rntp_megatron.rollout.sglang.engine import SGLangEngine

    state, _ = trained[(1, 2)]
    cfg = SGLangConfig(python=str(SGLANG_PYTHON), port=_port(), max_restarts=1, weight_sync="tensor")
    eng = SGLangEngine(cfg, model_path=workdir / "init", run_dir=workdir / "run_restart", dtype="float32")
    try:
        eng.update_weights(state.items(), 5)
        url = eng.client.url
        os.killpg(eng.process.proc.pid, signal.SIGKILL)  # a crash: the whole server dies at once
        eng.process.proc.wait()
        rollouts = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))  # detected, restarted, retried
        assert eng.restarts == 1 and rollouts[0].weight_version == 5
        assert eng.client.url == url  # same port: ranks that attached by URL (DP > 1) still reach it
        assert max_gap(eng.prompt_logprobs(PROMPTS), hf_logprobs(state)) < LOGPROB_TOL
        assert (workdir / "run_restart" / "sglang_server.1.log").exists()
        os.killpg(eng.process.proc.pid, signal.SIGKILL)
        eng.process.proc.wait()
        with pytest.raises(SGLangServerError, match="after 1 restarts"):
            eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))
    finally:
        eng.close()
