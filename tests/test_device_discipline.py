"""Device discipline, checked on the CPU the way a GPU would check it.

On a GPU node a tensor made without an explicit device lands on the CPU while the model is on CUDA, and the first
op that mixes them (or the NCCL collective that receives it) fails. On a CPU-only machine that bug is invisible:
everything is on the CPU. Here the model and every deliberately placed tensor live on the CPU, while a tensor that
our package makes without naming a device becomes a `meta` tensor: the first op that mixes it with real data fails,
as a CPU tensor meeting a CUDA one would. Only factories called from rntp_megatron are redirected: megatron-core's
own code is not ours to fix (e.g. its local_multi_tensor_l2_norm builds `torch.tensor(list of norms)` on the host
by design, which works on a GPU too).

The guard covers: a next-token step, an RNTP step with the in-process engine (rollouts, rewards, likelihood
scoring, the loss hook), a checkpoint save and load, and the HF weight export.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import rntp_megatron
from rntp_megatron.config import build_config
from rntp_megatron.runtime import destroy_distributed

pytestmark = [pytest.mark.slow]

PACKAGE = str(Path(rntp_megatron.__file__).parent) + "/"
TORCH = str(Path(torch.__file__).parent) + "/"


def _called_from_package() -> bool:
    """Whether the innermost caller outside torch (and outside this guard) is a module of rntp_megatron."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH) or frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.endswith("runtime/cpu_compat.py")):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PACKAGE)


class _PackageTensorsOnMeta(TorchFunctionMode):
    """A tensor factory called from rntp_megatron without a device makes a meta tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and _called_from_package():
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_default_device():
    """Inside the block, tensors our package makes without a device are not real."""
    with _PackageTensorsOnMeta():
        yield


def _tiny(tmp_path: Path, *extra: str):
    return build_config({}, [
        "model.card=tiny", "model.vocab_size=262", "rl.group_size=4", "schedule.global_batch_size=8",
        "schedule.micro_batch_size=4", "schedule.train_steps=2", "schedule.seq_length=64", "data.context_len=40",
        "data.min_context=8", "rollout.max_new_tokens=8", "rollout.temperature=1.0", "checkpoint.save_interval=1",
        f"logging.dir={tmp_path}", "logging.progress=false", "logging.plot=false", *extra])


def _guarded_run(cfg):
    from rntp_megatron.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        with meta_default_device():
            assert trainer.run() == 0
        return trainer
    finally:
        trainer.close()
        destroy_distributed()


def _assert_real(trainer) -> None:
    for name, p in trainer.model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name


def test_guard_catches_a_tensor_our_package_makes_without_a_device():
    """The guard itself: such a tensor cannot meet a real one; one made with a device, or by others, can."""
    made_here = eval(compile("torch.tensor([1.0, 2.0])", PACKAGE + "rewards/guard_probe.py", "eval"))
    with meta_default_device():
        made_in_package = eval(compile("torch.tensor([1.0, 2.0])", PACKAGE + "rewards/guard_probe.py", "eval"))
        placed = eval(compile("torch.tensor([1.0, 2.0], device='cpu')", PACKAGE + "rewards/guard_probe.py", "eval"))
        elsewhere = torch.tensor([1.0, 2.0])
    assert made_here.device.type == "cpu" and made_in_package.device.type == "meta"
    assert placed.device.type == "cpu" and elsewhere.device.type == "cpu"
    with pytest.raises((RuntimeError, NotImplementedError)):
        (placed + made_in_package).tolist()


def test_next_token_step_save_and_resume_under_the_guard(tmp_path):
    cfg = _tiny(tmp_path, "rl.objective=ntp")
    trainer = _guarded_run(cfg)
    _assert_real(trainer)
    assert (tmp_path / "checkpoints" / "latest").exists()
    # resume (checkpoint load, data cursor, RNG) and one more step, still guarded
    trainer = _guarded_run(_tiny(tmp_path, "rl.objective=ntp", "schedule.train_steps=3"))
    assert trainer.step == 3


@pytest.mark.parametrize("reward", ["exact", "info_gain"])
def test_rntp_step_with_the_in_process_engine_under_the_guard(tmp_path, reward):
    """Rollouts, string or likelihood rewards, advantages, the loss hook and the optimizer step."""
    trainer = _guarded_run(_tiny(tmp_path, "rl.objective=mixed", "reward.ntp_weight=0.1", f"reward.name={reward}"))
    _assert_real(trainer)
    assert trainer.step == 2


def test_side_models_under_the_guard(tmp_path):
    """Entropy sites scored by the frozen reference, its KL term, and the RLP EMA baseline of info_gain."""
    from rntp_megatron.trainer import Trainer

    start = _tiny(tmp_path / "start", "rl.objective=ntp", "schedule.train_steps=1")
    trainer = Trainer(start)
    try:
        assert trainer.run() == 0
    finally:
        trainer.close()
        destroy_distributed()
    trainer = _guarded_run(_tiny(tmp_path / "rl", "data.site_selection=entropy", "data.entropy_threshold=0.5",
                                 "rl.kl_coef=0.1", "reward.name=info_gain", "reward.baseline=ema",
                                 f"checkpoint.load={tmp_path / 'start' / 'checkpoints'}"))
    _assert_real(trainer)
    assert trainer.step == 2


def test_hf_export_under_the_guard(tmp_path):
    """The weight stream (TP/PP transfers, HF conversion, bucket packing) and the safetensors writer."""
    from safetensors.torch import load_file

    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import init_distributed
    from rntp_megatron.weights.export import stream_hf_weights
    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

    cfg = _tiny(tmp_path)
    init_distributed(cfg.parallel, cfg.seed)
    try:
        model = build_model(cfg.model, cfg.parallel)
        with meta_default_device():
            save_hf_checkpoint(stream_hf_weights(model, cfg.model), tmp_path / "hf", cfg.model)
        tensors = {}
        for f in sorted((tmp_path / "hf").glob("*.safetensors")):
            tensors.update(load_file(f))
        embed = tensors["model.embed_tokens.weight"]
        assert torch.equal(embed, model.embedding.word_embeddings.weight.detach()[:embed.shape[0]])
    finally:
        destroy_distributed()


def _guarded_ranks(rank: int, world_size: int, root: str, extra: list[str]) -> int:
    """One guarded run on this rank of a TP/PP layout, then the HF export (every rank iterates the stream)."""
    from rntp_megatron.weights.export import stream_hf_weights

    cfg = _tiny(Path(root), *extra)
    from rntp_megatron.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        with meta_default_device():
            assert trainer.run() == 0
            names = [name for bucket in stream_hf_weights(trainer.model, cfg.model) for name, _ in bucket]
        assert rank != 0 or "model.embed_tokens.weight" in names
        return trainer.step
    finally:
        trainer.close()
        destroy_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("extra", [
    ["rl.objective=ntp", "parallel.pipeline_model_parallel_size=2"],
    ["rl.objective=mixed", "reward.ntp_weight=0.1", "reward.name=prob", "parallel.tensor_model_parallel_size=2"],
], ids=["ntp-pp2", "rntp-tp2"])
def test_model_parallel_steps_under_the_guard(tmp_path, extra):
    """The collectives of model parallelism (PP send/recv and broadcasts, TP gathers of the engine and the weight
    stream) with every tensor our package makes on a named device."""
    from rntp_megatron.runtime.spawn import run_ranks

    assert run_ranks(_guarded_ranks, 2, args=(str(tmp_path), extra)) == [2, 2]
