"""Lossless delta weight sync (rollout.sglang.delta_sync): weights/delta.py on the trainer, the served classes of
rollout/sglang/plugins on the server.

Fast: the codec round-trips both encodings bit for bit (NaN, -0.0) and picks the fewer bytes; the sender sends
whole when told, and a tensor denser than the cap; the config refuses the knob where it cannot work, naming it;
slurm/train.sbatch starts its replicas with the served classes' environment when the knob is on.

With a real SGLang server started with the served classes (one start): bf16 weights pushed full, then deltas
(sparse one-bf16-step changes, one dense tensor that goes whole) through the distributed and the disk channel:
the served weights (GET /get_weights_by_name) equal the trainer's bit for bit, and differ from the last full push
(a server that ignored the deltas would fail); a relaunched server gets the next push whole; a server without the
classes is refused at attach. A tiny model trains RL steps with delta sync through each channel (attached to that
server): the rollouts' log-probs match the trainer's and the bytes sent are logged.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rntp_megatron.config import ConfigError, build_config
from rntp_megatron.rollout.sglang.plugins.rntp_delta_models import codec
from rntp_megatron.weights.delta import DeltaSender
from tests.test_trainer_placement import (LOGPROB_TOL, SGLANG_PYTHON, _overrides, _train_with_sglang, sglang_test,
                                          tiny_hf_folder)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@pytest.mark.parametrize("changed", [3, 700], ids=["index", "mask"])
def test_codec_round_trips_bit_for_bit_with_the_fewer_bytes(changed):
    torch.manual_seed(0)
    old = torch.randn(4096).bfloat16()
    new = old.clone()
    where = torch.randperm(4096)[:changed]
    _bits(new)[where] += 1  # one bf16 step away from zero
    new[where[0]], old[5000 % 4096] = float("nan"), -0.0  # bits, not values, are compared
    entries = dict(codec.encode("w", new, old, max_density=0.5))
    k = int(codec.changed(new, old).sum())
    assert set(entries) == {"w" + (codec.INDEX if changed == 3 else codec.MASK), "w" + codec.VALUE}
    sent = sum(t.numel() * t.element_size() for t in entries.values())
    assert sent == min(6 * k, 4096 // 8 + 2 * k) < 2 * 4096  # index 6k bytes, mask n/8 + 2k
    rebuilt = codec.apply(old.clone(), {codec.split(n)[1]: t for n, t in entries.items()})
    assert torch.equal(_bits(rebuilt), _bits(new))
    assert codec.encode("w", new, old, max_density=(k - 1) / 4096) is None  # denser than the cap: whole


def test_sender_sends_whole_when_told_and_deltas_otherwise():
    weights = [("a", torch.zeros(64, dtype=torch.bfloat16)), ("b", torch.ones(64, dtype=torch.bfloat16))]
    sender = DeltaSender(max_density=0.5)
    [first] = sender.encode([weights], full=False)  # nothing sent before: whole anyway
    assert [n for n, _ in first] == ["a", "b"] and sender.stats()["weights/sent_fraction"] == 1.0
    weights[0][1][3] = 1.0  # one element of a; b unchanged
    [second] = sender.encode([weights], full=False)
    assert [n for n, _ in second] == ["a.delta_index", "b.delta_index", "a.delta_value", "b.delta_value"]
    assert sender.sent_bytes == 6 and sender.deltas == 2
    [third] = sender.encode([weights], full=True)
    assert [n for n, _ in third] == ["a", "b"] and sender.deltas == 0


@pytest.mark.parametrize("overrides, field", [
    (["rollout.engine=sglang", "rollout.sglang.delta_sync=true"], "rollout.sglang.delta_sync"),  # tensor channel
    (["rollout.engine=sglang", "rollout.placement=separate", "rollout.sglang.weight_sync=distributed",
      "rollout.sglang.delta_sync=true", "rollout.sglang.quantization=fp8"], "rollout.sglang.delta_sync"),
    (["rollout.sglang.delta_sync=true"], "rollout.sglang.delta_sync"),  # the in-process engine: nothing is sent
    (["rollout.engine=sglang", "rollout.sglang.delta_max_density=1.5"], "rollout.sglang.delta_max_density"),
])
def test_config_refuses_delta_sync_where_it_cannot_work(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config({}, overrides)


def test_sbatch_starts_fleet_replicas_with_the_served_classes_when_delta_sync_is_on(tmp_path):
    """slurm/train.sbatch starts the replicas itself: with delta_sync each gets the served classes' environment."""
    from rntp_megatron.rollout.sglang.plugins import served_env
    from tests.test_launch import _dry_run, _steps

    steps = _steps(_dry_run(tmp_path, {"RNTP_NODES": "n1 n2", "RNTP_SGLANG_NODES": "1"},
                            "--set", "rollout.sglang.delta_sync=true"))
    [replica] = [step for step in steps if "sglang.launch_server" in step]
    assert all(f"{k}={v}" in replica for k, v in served_env().items()), replica


# --------------------------------------------------------------------------------------------------
# a real server


@pytest.fixture(scope="module")
def delta_server(tmp_path_factory):
    """An owned server of a random tiny llama, started with the served classes (float32: bf16 pushes load
    exactly, and the trainer's float32 runs match its log-probs)."""
    from rntp_megatron.config import SGLangConfig
    from rntp_megatron.rollout.sglang.engine import SGLangEngine
    from rntp_megatron.runtime.spawn import free_port

    folder = tmp_path_factory.mktemp("delta_server")
    tiny_hf_folder(folder)
    cfg = SGLangConfig(python=str(SGLANG_PYTHON), port=free_port(), max_restarts=0, weight_sync="distributed",
                       delta_sync=True)
    engine = SGLangEngine(cfg, model_path=folder / "hf", run_dir=folder / "server", dtype="float32")
    yield engine, folder / "hf"
    engine.close()


def _served(engine, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server's weights of these HF names (float32 lists from GET /get_weights_by_name) as bf16, cut to the
    trainer's shapes (the CPU server pads the vocabulary and the MLP width)."""
    out = {}
    for name, t in like.items():
        reply = engine.client.call("/get_weights_by_name", {"name": name, "truncate_size": 1 << 20})
        out[name] = torch.tensor(reply, dtype=torch.float32).bfloat16()[tuple(slice(0, n) for n in t.shape)]
    return out


def _differing(served: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> list[str]:
    """Names whose served tensor is not the trainer's, bit for bit."""
    return [k for k in weights if not torch.equal(_bits(served[k]), _bits(weights[k]))]


def _one_step(t: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """t with a random `fraction` of its elements moved by one bf16 step (what a small-lr update does)."""
    moved = t.clone()
    _bits(moved).view(-1)[torch.rand(t.numel(), generator=gen) < fraction] += 1  # one bf16 step away from zero
    return moved


@sglang_test
def test_delta_pushes_serve_the_trainers_weights_exactly(delta_server):
    from safetensors.torch import load_file

    engine, initial = delta_server
    weights = {k: v.bfloat16() for k, v in load_file(str(initial / "model.safetensors")).items()}
    names = sorted(weights)
    gen = torch.Generator().manual_seed(0)

    def push(version: int) -> dict[str, float]:
        engine.update_weights(list(weights.items()), version)
        return engine.push_stats()

    assert push(1)["weights/sent_fraction"] == 1.0  # the first push is whole
    pushed_whole = dict(weights)
    assert _differing(_served(engine, weights), weights) == []
    for version, channel in [(2, "distributed"), (3, "distributed"), (4, "disk"), (5, "disk")]:
        engine.cfg.weight_sync = channel
        weights = {k: _one_step(v, 0.9 if k == "model.embed_tokens.weight" else 0.02, gen) for k, v in weights.items()}
        stats = push(version)
        assert 0 < engine.delta.sender.deltas == len(names) - 1, channel  # the dense embedding went whole
        assert stats["weights/sent_fraction"] < 0.5, stats
        assert _differing(_served(engine, weights), weights) == [], channel
    # a server that ignored the deltas would still serve the whole push of version 1
    assert sorted(_differing(pushed_whole, weights)) == names
    assert engine.server_weight_version() == 5

    engine.relaunch()  # a new process: no base copy; it starts from the last whole folder
    engine.cfg.weight_sync = "distributed"
    weights = {k: _one_step(v, 0.02, gen) for k, v in weights.items()}
    assert push(6)["weights/sent_fraction"] == 1.0
    assert _differing(_served(engine, weights), weights) == []


@sglang_test
def test_a_server_without_the_served_classes_is_refused_at_attach(delta_server, monkeypatch):
    """Attaching asks GET /get_weights_by_name for the marker; SGLang's own classes answer an error for a name that
    is no weight of theirs (a marker this server's classes do not know stands in for one started without them)."""
    from rntp_megatron.rollout.sglang.engine import SGLangEngine

    server, _ = delta_server
    cfg = dataclasses.replace(server.cfg, url=server.client.url, api_key=server.api_key)
    SGLangEngine(cfg)  # served: attaches
    monkeypatch.setattr(codec, "MARKER", "model.no_such.weight")
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.delta_sync: the SGLang server .* SGLANG_EXTERNAL_MODEL"):
        SGLangEngine(cfg)


@sglang_test
@pytest.mark.parametrize("channel", ["distributed", "disk"])
def test_trainer_pushes_deltas_through_each_channel(tmp_path, delta_server, channel):
    from rntp_megatron.runtime.spawn import run_ranks

    server, _ = delta_server
    # lr 1e-9 leaves about half of the float32 weights unchanged per step (those above ~lr / 2^-24 in size), so
    # deltas are sent; float32 keeps the log-prob comparison as tight as the other server tests
    overrides = [o for o in _overrides(tmp_path, []) if not o.startswith("schedule.train_steps")] + [
        "schedule.train_steps=2", "schedule.lr=1e-9", "rollout.placement=separate",
        f"rollout.sglang.weight_sync={channel}", "rollout.sglang.delta_sync=true",
        f"rollout.sglang.url={server.client.url}", f"rollout.sglang.api_key={server.api_key}"]
    [result] = run_ranks(_train_with_sglang, 1, (overrides,), timeout_s=600)
    metrics = result["metrics"]
    assert result["versions"] == [(0, 0), (1, 1), (2, 2)]  # the server follows the trainer
    for m in metrics:
        assert m["logp_abs_diff_rollout"] < LOGPROB_TOL, m  # the rollouts come from the trainer's weights
        assert math.isfinite(m["loss"]) and 0 < m["weights/sent_fraction"] < 1, m
        assert m["weights/sent_bytes"] > 0
