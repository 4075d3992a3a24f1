"""rollout/sglang/process: the launch command and clear errors, without starting a server."""

import pytest

from rntp_megatron.config import SGLangConfig
from rntp_megatron.rollout.sglang.client import SGLangServerError
from rntp_megatron.rollout.sglang.engine import SGLangEngine
from rntp_megatron.rollout.sglang.process import ServerProcess, server_command, server_env


def test_command_binds_localhost_with_api_key_and_cpu_flags():
    cfg = SGLangConfig(extra_args=["--max-running-requests", "8"])
    argv = server_command("/venv/bin/python", "/models/m", cfg, 31000, "secret", "bfloat16")
    assert argv[:3] == ["/venv/bin/python", "-m", "sglang.launch_server"]
    flag = {a: b for a, b in zip(argv, argv[1:])}
    assert flag["--host"] == "127.0.0.1" and flag["--port"] == "31000" and flag["--api-key"] == "secret"
    assert flag["--device"] == "cpu" and flag["--attention-backend"] == "torch_native"  # no GPU here
    assert argv[-2:] == ["--max-running-requests", "8"]


def test_missing_server_python_is_a_clear_error(tmp_path):
    with pytest.raises(SGLangServerError, match="install_sglang.sh"):
        ServerProcess(str(tmp_path / "nope" / "python"), "/m", SGLangConfig(), tmp_path, 31000, "k", "float32", 0)


def test_engine_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="weight_sync 'ftp'"):
        SGLangEngine(SGLangConfig(weight_sync="tensor").__class__(weight_sync="ftp"), model_path=tmp_path)
    with pytest.raises(ValueError, match="needs model_path"):
        SGLangEngine(SGLangConfig())


def test_server_does_not_inherit_the_trainers_distributed_world():
    trainer = {"RANK": "0", "WORLD_SIZE": "4", "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True",
               "PYTHONPATH": "/work/main", "HOME": "/root", "OMP_NUM_THREADS": "1"}
    env = server_env(trainer)
    assert env == {"HOME": "/root", "OMP_NUM_THREADS": "1", "SGLANG_USE_CPU_ENGINE": "1"}


def _flags(quantization=None, **kw):
    cfg = SGLangConfig(quantization=quantization)
    return server_command("/venv/bin/python", "/models/m", cfg, 31000, "k", "bfloat16", **kw)


def test_memory_saver_only_for_a_colocated_server_on_a_gpu():
    assert "--enable-memory-saver" in _flags(colocated=True, gpu=True)
    assert "--device" not in _flags(colocated=True, gpu=True)  # a GPU server takes SGLang's defaults
    assert "--enable-memory-saver" not in _flags(colocated=False, gpu=True)  # separate: serves while we train
    cpu = _flags(colocated=True, gpu=False)  # no torch_memory_saver on CPU: SGLang would not start
    assert "--enable-memory-saver" not in cpu and "--device" in cpu


def test_fp8_server_gets_the_quantization_flag_and_is_refused_on_cpu():
    argv = _flags(quantization="fp8", colocated=True, gpu=True)
    assert argv[argv.index("--quantization") + 1] == "fp8"
    assert "--quantization" not in _flags(gpu=True)
    with pytest.raises(SGLangServerError, match="rollout.sglang.quantization.*needs a GPU"):
        _flags(quantization="fp8", gpu=False)
