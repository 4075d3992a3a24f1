"""Rollout placement and one-step-off rollouts in the trainer.

Fast: the config refuses placements that make no sense; the prefetcher hands out batches in step order with
each step's seed, generates the next step in a background thread while the current one trains, keeps the
batch generated ahead in a checkpoint (torch.load(weights_only=True)) and hands it out after a resume.

With a real SGLang server (sglang-venv): a tiny model trains 3 RL steps with (a) a colocated server the
trainer starts from its exported weights (asleep during each train step, weights through shared memory),
(b) a separate server attached by URL (weights over a gloo group), (c) the same, one step ahead (b and c
share one server: two server starts in all); the server's weight version follows the trainer's after every push, the
trainer's log-probs of the rollouts match the server's (fp32, on-policy), and one step ahead the rollouts are
exactly one version old, generated while the previous step trained, with TIS active and finite losses.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from rntp_megatron.config import ConfigError, build_config
from rntp_megatron.data.episode import Episode
from rntp_megatron.metrics import is_timing
from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams
from rntp_megatron.rollout.prefetch import RolloutPrefetcher

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = Path(os.environ.get("RNTP_SGLANG_PYTHON", ROOT / "sglang-venv" / "bin" / "python"))
LOGPROB_TOL = 2e-4  # mean |logp_trainer - logp_rollout| with the server in float32 (as tests/test_sglang_engine.py)


# --------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("overrides, field", [
    (["rollout.placement=separate"], "rollout.placement"),  # the in-process engine is colocated by nature
    (["rollout.engine=sglang", "rollout.off_policy_steps=1", "rl.tis_cap=2.0"], "rollout.off_policy_steps"),
    (["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
      "rollout.off_policy_steps=1"], "rl.tis_cap"),
    (["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
      "rollout.off_policy_steps=2", "rl.tis_cap=2.0"], "rollout.off_policy_steps"),
    (["rollout.engine=sglang", "rollout.placement=separate"], "rollout.sglang.weight_sync"),  # tensor: colocated
    (["rollout.engine=sglang", "rollout.sglang.weight_sync=distributed"], "rollout.sglang.weight_sync"),
])
def test_config_refuses_placements_that_make_no_sense(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config({}, overrides)


def test_config_accepts_each_sensible_placement():
    build_config({}, ["rollout.engine=sglang", "rollout.placement=colocated", "rollout.sglang.weight_sync=tensor"])
    build_config({}, ["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=disk",
                      "rollout.off_policy_steps=1", "rl.icepop=[0.5, 2.0]"])


# --------------------------------------------------------------------------------------------------
# prefetcher


class RecordingEngine(RolloutEngine):
    """Rollouts whose token is the call's seed; records (seed, thread name); blocks while `gate` is clear."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.weight_version = 0

    def generate(self, prompts, sampling):
        self.calls.append((sampling.seed, threading.current_thread().name))
        assert self.gate.wait(timeout=30)
        return [Rollout(prompt_ids=p, token_ids=[sampling.seed], text="", logprobs=[-0.5], finish_reason="length",
                        weight_version=self.weight_version, prompt_index=i)
                for i, p in enumerate(prompts) for _ in range(sampling.n)]

    def update_weights(self, named_tensors, version):
        self.weight_version = version


class Plan:
    """Step s: two episodes whose prompt is [s, i]; the sampling seed is 100 + s; records the steps planned."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def __call__(self, step: int):
        self.steps.append(step)
        episodes = [Episode(prompt_ids=[step, i], context_ids=[step], continuation_ids=[i], continuation_text="x",
                            site=1, meta={"chunk": step}) for i in range(2)]
        return episodes, SamplingParams(n=2, seed=100 + step)


def test_prefetcher_on_policy_generates_each_step_when_asked():
    engine, plan = RecordingEngine(), Plan()
    prefetcher = RolloutPrefetcher(engine, plan, off_policy_steps=0)
    for step in range(3):
        batch = prefetcher.batch(step)
        assert batch.step == step and batch.seed == 100 + step and plan.steps == list(range(step + 1))
        assert [r.token_ids for r in batch.rollouts] == [[100 + step]] * 4
        assert [e.prompt_ids for e in batch.episodes] == [[step, 0], [step, 1]]
    assert [thread for _, thread in engine.calls] == [threading.current_thread().name] * 3
    assert prefetcher.state_dict() == {}  # nothing is generated ahead on-policy


def test_prefetcher_one_step_ahead_overlaps_and_hands_out_batches_in_order():
    engine, plan = RecordingEngine(), Plan()
    prefetcher = RolloutPrefetcher(engine, plan, off_policy_steps=1)
    first = prefetcher.batch(0)
    assert first.step == 0 and first.seed == 100 and plan.steps == [0, 1]  # step 1 planned before step 0 trains
    engine.gate.clear()  # step 1's generation is in flight (or about to be) while step 0 "trains"
    deadline = time.monotonic() + 10
    while len(engine.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.calls[1] == (101, "rollouts-step-1")
    engine.gate.set()
    prefetcher.wait()  # before the weights change
    engine.update_weights(iter(()), 1)
    second = prefetcher.batch(1)
    assert second.step == 1 and second.seed == 101 and [r.token_ids for r in second.rollouts] == [[101]] * 4
    assert {r.weight_version for r in second.rollouts} == {0}  # generated before the update: one version old
    last = prefetcher.batch(2, prefetch_next=False)
    assert last.step == 2 and plan.steps == [0, 1, 2] and len(engine.calls) == 3
    assert prefetcher.state_dict() == {}  # nothing left ahead after the last step


def test_prefetcher_state_survives_a_checkpoint_and_is_not_generated_again(tmp_path):
    engine, plan = RecordingEngine(), Plan()
    prefetcher = RolloutPrefetcher(engine, plan, off_policy_steps=1)
    prefetcher.batch(0)
    torch.save({"rollouts_ahead": prefetcher.state_dict()}, tmp_path / "rank.pt")
    expected = prefetcher.batch(1)
    state = torch.load(tmp_path / "rank.pt", weights_only=True)["rollouts_ahead"]
    resumed_engine, resumed_plan = RecordingEngine(), Plan()
    resumed = RolloutPrefetcher(resumed_engine, resumed_plan, off_policy_steps=1)
    resumed.load_state_dict(state)
    got = resumed.batch(1, prefetch_next=False)
    assert resumed_engine.calls == [] and resumed_plan.steps == []  # the saved batch, not a new one
    assert got == expected
    # a saved batch for another step is not handed out in its place
    other = RolloutPrefetcher(RecordingEngine(), Plan(), off_policy_steps=0)
    other.load_state_dict(state)
    assert other.batch(2).seed == 102


def test_prefetcher_raises_a_failed_generation_in_the_main_thread():
    class Failing(RecordingEngine):
        def generate(self, prompts, sampling):
            if sampling.seed == 101:
                raise OSError("server gone")
            return super().generate(prompts, sampling)

    prefetcher = RolloutPrefetcher(Failing(), Plan(), off_policy_steps=1)
    prefetcher.batch(0)
    with pytest.raises(RuntimeError, match="step 1 failed.*server gone"):
        prefetcher.wait()


# --------------------------------------------------------------------------------------------------
# exact resume one step ahead (a stand-in engine beside the trainer, no server)


class WeightHashEngine(RolloutEngine):
    """A deterministic engine beside the trainer: tokens drawn from (seed, a checksum of the pushed weights),
    so a batch regenerated from newer weights differs from the one generated ahead."""

    def __init__(self) -> None:
        self.checksum, self.weight_version = 0, 0

    def update_weights(self, named_tensors, version):
        self.checksum = int(sum(t.double().abs().sum().item() for _, t in named_tensors) * 1e6) % (2**31)
        self.weight_version = version

    def generate(self, prompts, sampling):
        gen = torch.Generator().manual_seed(sampling.seed * 7919 + self.checksum)
        return [Rollout(prompt_ids=p, token_ids=(ids := torch.randint(0, 256, (sampling.max_new_tokens,),
                                                                      generator=gen).tolist()),
                        text=bytes(ids).decode("utf-8", errors="replace"), logprobs=[-5.0] * len(ids),
                        finish_reason="length", weight_version=self.weight_version, prompt_index=i)
                for i, p in enumerate(prompts) for _ in range(sampling.n)]


def _resume_runs(rank: int, world_size: int, base: list[str], root: str) -> list[list[dict]]:
    """Metrics of an uninterrupted 3-step run, and of one preempted after step 1 and resumed (same process)."""
    import signal

    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import EXIT_PREEMPTED, Trainer

    def trainer(name: str) -> Trainer:
        return Trainer(build_config({}, [*base, f"logging.dir={root}/{name}"]), engine=WeightHashEngine())

    try:
        assert trainer("whole").run() == 0
        preempted = trainer("resumed")
        push = preempted.placement.push_weights

        def push_then_preempt(version):
            push(version)
            if version == 2:  # after step 1: the batch of step 2 was generated ahead from version 1
                preempted._stop_signal = signal.SIGTERM

        preempted.placement.push_weights = push_then_preempt
        assert preempted.run() == EXIT_PREEMPTED
        resumed = trainer("resumed")
        assert resumed.step == 2 and resumed.rollouts.wait().step == 2  # the batch ahead came back
        assert resumed.run() == 0
    finally:
        destroy_distributed()
    return [[{k: v for k, v in json.loads(line).items() if not is_timing(k)}
             for line in (Path(root) / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
            for name in ("whole", "resumed")]


@pytest.mark.slow
@pytest.mark.distributed
def test_one_step_off_resumes_exactly_with_the_batch_generated_ahead(tmp_path):
    from rntp_megatron.runtime.spawn import run_ranks

    base = [o for o in _overrides(tmp_path, []) if not o.startswith(("rollout.sglang.python", "logging.dir"))]
    base += ["rollout.placement=separate", "rollout.sglang.weight_sync=distributed", "rollout.off_policy_steps=1",
             "rl.tis_cap=2.0", "checkpoint.save_interval=1"]
    [(whole, resumed)] = run_ranks(_resume_runs, 1, (base, str(tmp_path)), timeout_s=600)
    assert [m["step"] for m in whole] == [0, 1, 2] and [m["rollout_staleness"] for m in whole] == [0, 1, 1]
    assert resumed == whole


# --------------------------------------------------------------------------------------------------
# the trainer with a real SGLang server

STEPS = 3


def sglang_test(fn):
    """Marked like tests/test_sglang_engine.py: a real server, skipped (failed under CI) without its venv."""
    missing = f"SGLang server virtualenv missing ({SGLANG_PYTHON}); run tools/install_sglang.sh"
    for mark in (pytest.mark.sglang, pytest.mark.slow, pytest.mark.distributed,
                 pytest.mark.skipif(not SGLANG_PYTHON.exists(), reason=missing)):
        fn = mark(fn)
    return fn


def _overrides(run_dir: Path, extra: list[str]) -> list[str]:
    return [
        "model.card=tiny", "model.vocab_size=262", "rl.group_size=4", "schedule.global_batch_size=8",
        "schedule.micro_batch_size=4", f"schedule.train_steps={STEPS}", "schedule.seq_length=96", "schedule.lr=3e-3",
        "data.context_len=64", "data.min_context=8", "rollout.max_new_tokens=12", "rollout.temperature=1.0",
        "reward.name=prob", "rollout.engine=sglang", f"rollout.sglang.python={SGLANG_PYTHON}",
        f"logging.dir={run_dir}", "logging.progress=false", *extra,
    ]


def tiny_hf_folder(folder: Path) -> Path:
    """folder/hf: a random tiny llama of these tests' card as an HF folder with a byte tokenizer (a server starts
    from it; the trainer then pushes its own weights)."""
    import transformers

    from rntp_megatron.model import hf_mapping
    from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer
    from rntp_megatron.weights.buckets import bucketed
    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

    model_cfg = build_config({}, _overrides(folder, [])).model
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**hf_mapping.hf_config(model_cfg, torch_dtype="float32")))
    return save_hf_checkpoint(bucketed(model.state_dict().items(), 1 << 30), folder / "hf", model_cfg,
                              tokenizer_dir=write_byte_tokenizer(folder / "tokenizer", eos_id=None))


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the runs that attach by URL: a random tiny llama (the trainer pushes its own weights)."""
    from rntp_megatron.config import SGLangConfig
    from rntp_megatron.rollout.sglang.engine import SGLangEngine
    from rntp_megatron.runtime.spawn import free_port

    folder = tmp_path_factory.mktemp("shared_server")
    tiny_hf_folder(folder)
    engine = SGLangEngine(SGLangConfig(python=str(SGLANG_PYTHON), port=free_port(), max_restarts=0),
                          model_path=folder / "hf", run_dir=folder / "server", dtype="float32")
    yield engine
    engine.close()


def _train_with_sglang(rank: int, world_size: int, overrides: list[str]) -> dict:
    """Train STEPS steps; after every weight push, the trainer's and the server's version (and each replica's);
    the metrics; when the engine slept; (start, end, thread) of each generate call and (start, end) of each train
    step; whether the pushes came from the shared-memory mirror."""
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    trainer = Trainer(build_config({}, overrides))
    out: dict = {"versions": [], "replica_versions": [], "sleeps": [], "generate": [], "train": [],
                 "mirror": trainer.placement.mirror is not None}
    try:
        engine, placement = trainer.engine, trainer.placement
        push, generate, training = placement.push_weights, engine.generate, placement.training
        sleep = engine.sleep

        def recorded_push(version):
            push(version)
            out["versions"].append((trainer.weight_version, engine.server_weight_version()))
            out["replica_versions"].append([r.engine.server_weight_version() for r in engine.replicas])

        def recorded_generate(prompts, sampling):
            t0 = time.monotonic()
            rollouts = generate(prompts, sampling)
            out["generate"].append((sampling.seed, t0, time.monotonic(), threading.current_thread().name))
            return rollouts

        def recorded_sleep():
            out["sleeps"].append(trainer.step)
            sleep()

        class RecordedTraining:
            def __enter__(self):
                self.inner, self.t0 = training(), time.monotonic()
                return self.inner.__enter__()

            def __exit__(self, *exc):
                out["train"].append((self.t0, time.monotonic()))
                return self.inner.__exit__(*exc)

        placement.push_weights, engine.generate, engine.sleep = recorded_push, recorded_generate, recorded_sleep
        placement.training = RecordedTraining
        assert trainer.run() == 0
    finally:
        trainer.close()
        destroy_distributed()
    out["metrics"] = logged_metrics(trainer)
    return out


def logged_metrics(trainer) -> list[dict]:
    """The records of the run's metrics.jsonl."""
    lines = (Path(trainer.cfg.logging.dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _run(tmp_path: Path, extra: list[str]) -> dict:
    from rntp_megatron.runtime.spawn import run_ranks

    [result] = run_ranks(_train_with_sglang, 1, (_overrides(tmp_path / "run", extra),), timeout_s=600)
    return result


def _attach(server) -> list[str]:
    return [f"rollout.sglang.url={server.client.url}", f"rollout.sglang.api_key={server.api_key}"]


def _check_on_policy(result: dict) -> None:
    """Versions follow the trainer; on-policy rollouts; the trainer's log-probs are the server's."""
    assert result["versions"] == [(v, v) for v in range(STEPS + 1)]  # the start push, then one per step
    metrics = result["metrics"]
    assert [m["weight_version"] for m in metrics] == list(range(1, STEPS + 1))
    for m in metrics:
        assert m["rollout_staleness"] == 0
        assert m["logp_abs_diff_rollout"] < LOGPROB_TOL, m
        assert math.isfinite(m["loss"]) and m["policy_tokens"] > 0


@sglang_test
def test_trainer_colocated_with_its_own_sglang_server(tmp_path):
    from rntp_megatron.runtime.spawn import free_port

    result = _run(tmp_path, ["rollout.placement=colocated", "rollout.sglang.weight_sync=tensor",
                             f"rollout.sglang.port={free_port()}"])
    _check_on_policy(result)
    assert result["sleeps"] == list(range(STEPS))  # released during every train step
    assert all(thread == "MainThread" for *_, thread in result["generate"])


@sglang_test
def test_trainer_separate_from_an_attached_sglang_server(tmp_path, shared_server):
    result = _run(tmp_path, ["rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
                             *_attach(shared_server)])
    _check_on_policy(result)
    assert result["sleeps"] == []  # a separate server serves on while the trainer trains
    assert shared_server.server_weight_version() == STEPS


@sglang_test
def test_trainer_one_step_off_with_sglang(tmp_path, shared_server):
    result = _run(tmp_path, ["rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
                             "rollout.off_policy_steps=1", "rl.tis_cap=2.0", *_attach(shared_server)])
    assert result["versions"] == [(v, v) for v in range(STEPS + 1)]
    metrics = result["metrics"]
    assert [m["rollout_staleness"] for m in metrics] == [0.0] + [1.0] * (STEPS - 1)
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in ("loss", "pg_loss", "grad_norm", "is_weight"))
        assert abs(m["ratio"] - 1) < 1e-5  # anchored at the trainer's own pre-update log-probs
    assert metrics[0]["logp_abs_diff_rollout"] < LOGPROB_TOL  # step 0: generated from the weights it trains
    for m in metrics[1:]:  # one version old: the gap is the update, which TIS weighs
        assert m["logp_abs_diff_rollout"] > 10 * LOGPROB_TOL and m["is_weight"] != 1.0
    # step 0 generated inline; steps 1.. in the background, each started before the previous step trained
    generate, train = result["generate"], result["train"]
    assert [thread for *_, thread in generate] == ["MainThread"] + [f"rollouts-step-{s}" for s in range(1, STEPS)]
    for s in range(1, STEPS):
        assert generate[s][1] < train[s - 1][0]


@sglang_test
def test_attached_server_without_routed_experts_is_named(shared_server):
    """rollout.sglang.routed_experts asks an attached server for the experts it routed: one started without
    --enable-return-routed-experts (this one) returns none, and attaching fails saying how to fix it."""
    import dataclasses

    from rntp_megatron.rollout.sglang.client import SGLangServerError
    from rntp_megatron.rollout.sglang.engine import SGLangEngine

    cfg = dataclasses.replace(shared_server.cfg, url=shared_server.client.url, api_key=shared_server.api_key)
    with pytest.raises(SGLangServerError, match=r"--enable-return-routed-experts.*rollout.sglang.routed_experts"):
        SGLangEngine(cfg, routed_experts=(2, 2))
