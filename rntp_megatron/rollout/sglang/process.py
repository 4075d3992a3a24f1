"""An SGLang server as a child process: command line, start, health wait, logs in the run folder, stop.

The server runs in its own virtualenv (tools/install_sglang.sh) and its own process group, bound to
rollout.sglang.host (the loopback address unless told otherwise) with an API key; it is stopped by PID (the whole
group), never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from rntp_megatron.config import SGLangConfig
from rntp_megatron.rollout.sglang.client import HTTPClient, SGLangServerError
from rntp_megatron.rollout.sglang.plugins import served_env
from rntp_megatron.runtime.distributed import rank_info
from rntp_megatron.runtime.netif import socket_ifname_env


# torch.distributed / torchrun variables of the trainer's own job. Inherited, they make the server's own
# rendezvous join the trainer's (e.g. TORCHELASTIC_USE_AGENT_STORE turns its TCPStore into a client: a hang).
TRAINER_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
TRAINER_DIST_ENV_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_")
WILDCARDS = ("0.0.0.0", "::")  # bind addresses that listen on every interface


def on_cpu() -> bool:
    """Whether the server runs on CPU (no CUDA here): the CPU engine flags of docs/design.md apply."""
    return not torch.cuda.is_available()


def server_command(python: str, model_path: str, cfg: SGLangConfig, port: int, api_key: str,
                   dtype: str, colocated: bool = False, gpu: Optional[bool] = None) -> list[str]:
    """argv of `python -m sglang.launch_server` for the model. Without a GPU (gpu None: detected), the CPU
    flags; on a GPU a colocated server gets --enable-memory-saver (torch_memory_saver: its KV cache, weights and
    CUDA graphs can be released while the trainer trains; the CPU build has no memory saver, so the flag is never
    passed there). rollout.sglang.quantization adds --quantization (a GPU server only)."""
    gpu = not on_cpu() if gpu is None else gpu
    argv = [python, "-m", "sglang.launch_server", "--model-path", model_path, "--host", cfg.host,
            "--port", str(port), "--api-key", api_key, "--dtype", dtype, "--skip-server-warmup",
            "--log-level", "info"]
    if not gpu:
        if cfg.quantization is not None:
            raise SGLangServerError(f"rollout.sglang.quantization: {cfg.quantization!r} needs a GPU server; the CPU "
                                    "build of SGLang has no FP8 kernels (leave it null on CPU)")
        # Measured recipe for SGLang on these CPUs (docs/design.md, "Running on CPU").
        argv += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                 "--mem-fraction-static", "0.05", "--max-total-tokens", "4096"]
    elif colocated:
        argv += ["--enable-memory-saver"]
    if cfg.quantization is not None:
        argv += ["--quantization", cfg.quantization]
    return argv + list(cfg.extra_args)


def server_env(base: Mapping[str, str], delta_sync: bool = False) -> dict[str, str]:
    """The server's environment: ours without PYTHONPATH and the trainer's torch.distributed variables; with
    delta_sync, the served classes' package (rollout/sglang/plugins.served_env: PYTHONPATH is its folder alone)."""
    env = {k: v for k, v in base.items()
           if k != "PYTHONPATH" and k not in TRAINER_DIST_ENV and not k.startswith(TRAINER_DIST_ENV_PREFIXES)}
    if on_cpu():
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    if delta_sync:
        env.update(served_env())
    return env


class ServerProcess:
    """One launched server: its process (own process group), log file and URL."""

    def __init__(self, python: str, model_path: str, cfg: SGLangConfig, run_dir: Path, port: int, api_key: str,
                 dtype: str, attempt: int, colocated: bool = False):
        exe = shutil.which(python) if os.sep not in python else str(Path(python).absolute())  # cwd changes below
        if exe is None or not Path(exe).exists():
            raise SGLangServerError(f"rollout.sglang.python {python!r} does not exist; install the server with "
                                    "tools/install_sglang.sh (it creates sglang-venv/)")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / f"sglang_server.{attempt}.log"
        self.port = port
        # a server bound to every address is reached at this host's name (what the other hosts resolve)
        self.url = f"http://{socket.gethostname() if cfg.host in WILDCARDS else cfg.host}:{port}"
        env = server_env(os.environ, cfg.delta_sync)
        if cfg.weight_sync == "distributed":  # its side of the weight group must use the route to the trainer
            env.update(socket_ifname_env(cfg.group_host or rank_info().master_addr, os.environ))
        argv = server_command(exe, model_path, cfg, port, api_key, dtype, colocated)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=run_dir, start_new_session=True)

    def alive(self) -> bool:
        """Whether the server's process still runs."""
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the server's log."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_healthy(self, client: HTTPClient, timeout_s: float) -> float:
        """Seconds until GET /health answered 200; SGLangServerError when the process dies or time runs out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if not self.alive():
                raise SGLangServerError(f"SGLang server exited with code {self.proc.returncode} while starting; "
                                        f"log {self.log_path}:\n{self.log_tail()}")
            try:
                client.call("/health", timeout=5)
                return time.monotonic() - start
            except (SGLangServerError, OSError):
                time.sleep(1.0)
        self.stop()
        raise SGLangServerError(f"SGLang server not healthy after {timeout_s:.0f} s (rollout.sglang.startup_timeout_s);"
                                f" log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left of it after grace_s."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children (scheduler, detokenizer) share the group
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._log.close()
