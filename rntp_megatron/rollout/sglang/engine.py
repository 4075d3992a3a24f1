"""The SGLang rollout engine: a real SGLang server (started as a child process, or attached by URL) behind
the RolloutEngine contract.

Weights reach the server through one of three channels (rollout.sglang.weight_sync), each inside
/begin_weight_update ... /end_weight_update and tagged with a weight version: "tensor" (same machine; CUDA IPC
handles or shared memory, tensor_channel.py), "distributed" (a broadcast over a gloo/NCCL weight-update group,
distributed_channel.py and group.py) or "disk" (an HF checkpoint folder, disk_channel.py).
`peers` (set by fleet.py) are further servers that get every update this engine sends: one folder loaded by all
at once, each tensor payload sent to each, one broadcast group holding every server's ranks (receivers.py).
With rollout.sglang.delta_sync the distributed and disk channels send deltas (delta.py). With
rollout.sglang.quantization "fp8" every channel sends blockwise FP8 linear weights with their `weight_scale_inv`
(weights/fp8.py). A colocated server on a GPU runs with --enable-memory-saver: sleep() releases its KV cache,
weights and CUDA graphs; wake(("weights",)) brings the weights back for an update, wake() the rest.
`paused()` retracts running requests around an update so weights can change while requests are in flight
(they finish under the new version). An owned server that dies is restarted with the current weights (the
last full set pushed, kept in host memory, or the last disk folder) at most max_restarts times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import secrets
import threading
import urllib.error
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from rntp_megatron.config import SGLangConfig
from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams
from rntp_megatron.rollout.sglang import receivers
from rntp_megatron.rollout.sglang.client import HTTPClient, SGLangServerError, reply_version
from rntp_megatron.rollout.sglang.delta import DeltaSync, check_served_classes
from rntp_megatron.rollout.sglang.disk_channel import DiskChannel
from rntp_megatron.rollout.sglang.distributed_channel import push_distributed
from rntp_megatron.rollout.sglang.generation import (PADDING_BIAS, generate_request, generated_experts,
                                                     rollouts_from_replies)
from rntp_megatron.rollout.sglang.group import WeightGroup
from rntp_megatron.rollout.sglang.process import ServerProcess
from rntp_megatron.rollout.sglang.tensor_channel import push_tensor
from rntp_megatron.weights.buckets import DEFAULT_BUCKET_BYTES, NamedTensors, bucketed
from rntp_megatron.weights.fp8 import fp8_buckets

CHANNELS = ("tensor", "distributed", "disk")
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES


class SGLangEngine(RolloutEngine):
    """Rollouts from an SGLang server; weights pushed by tensor, distributed (gloo/NCCL) or disk channel."""

    def __init__(self, cfg: SGLangConfig, model_path: Optional[str | Path] = None, run_dir: str | Path = "runs/sglang",
                 dtype: str = "bfloat16", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 decode: Optional[Callable[[list[int]], str]] = None, padding_ids: range = range(0),
                 hf_config: Optional[dict] = None, colocated: bool = False,
                 routed_experts: Optional[tuple[int, int]] = None):
        if cfg.weight_sync not in CHANNELS:
            raise ValueError(f"rollout.sglang.weight_sync {cfg.weight_sync!r} is not one of {CHANNELS}")
        if cfg.url is None and model_path is None:
            raise ValueError("SGLangEngine needs model_path (an HF folder to start the server) or rollout.sglang.url")
        self.cfg = cfg
        # absolute: the server runs in run_dir, and the disk channel names folders to it
        self.model_path = str(Path(model_path).absolute()) if model_path is not None else None
        self.run_dir = Path(run_dir).absolute()
        self.dtype = dtype
        self.bucket_bytes = bucket_bytes
        self.decode = decode
        self.colocated = colocated  # an owned server on a GPU then runs with the memory saver
        self.logit_bias = {str(i): PADDING_BIAS for i in padding_ids}
        self.hf_config = hf_config  # config.json of the served model, for disk pushes to an attached server
        # (layers, k) of an MoE model whose routed experts each rollout carries (an owned server gets the flag)
        self.routed_experts = routed_experts
        if routed_experts is not None and cfg.url is None:
            self.cfg = cfg = dataclasses.replace(cfg, extra_args=[*cfg.extra_args, "--enable-return-routed-experts"])
        self.weight_version = 0
        self.restarts = 0
        self.peers: list["SGLangEngine"] = []  # more servers that receive every weight update (a fleet)
        self.api_key = cfg.api_key or (secrets.token_hex(16) if cfg.url is None else None)
        self._server: Optional[ServerProcess] = None
        self._host_copy: dict[str, torch.Tensor] = {}  # the newest pushed tensors, for a restart
        self._group = WeightGroup(cfg.group_host)
        self._disk = DiskChannel(Path(cfg.weights_dir) if cfg.weights_dir else self.run_dir / "weights")
        self._released: set[str] = set()  # memory tags the server has released (sleep) and not resumed
        self._server_info: Optional[dict[str, Any]] = None
        self._lock = threading.Lock()
        # delta_sync: this engine's sender (used while it leads a push) and which push the server holds as its base
        self.delta = DeltaSync(cfg.delta_max_density) if cfg.delta_sync else None
        self.delta_base: Optional[object] = None  # the sender's token of the last push this server got whole
        if cfg.url is not None:
            self.client = HTTPClient(cfg.url, self.api_key)
            self.startup_s = self.client.wait_answering(cfg.startup_timeout_s)
            self._check_served_classes()
            if routed_experts is not None:  # refused here, before a fleet would take the error for a failure
                probe = self.client.call("/generate", {"input_ids": [0], "sampling_params": {"max_new_tokens": 1},
                                                       "return_routed_experts": True}, timeout=60)
                generated_experts(probe["meta_info"], 1, 1, routed_experts, self.client.url)
        else:
            self._start()

    # -------------------------------------------------------------------------------------------
    # server lifecycle

    def _start(self) -> None:
        # a restart keeps the port: the ranks that attached by URL (rollout/placement.py) know only this address
        port = self.cfg.port if self._server is None else self._server.port
        self._server = ServerProcess(self.cfg.python, self.model_path, self.cfg, self.run_dir, port, self.api_key,
                                     self.dtype, attempt=self.restarts, colocated=self.colocated)
        self._released, self._server_info, self.delta_base = set(), None, None
        self.client = HTTPClient(self._server.url, self.api_key)
        self.startup_s = self._server.wait_healthy(self.client, self.cfg.startup_timeout_s)
        self._check_served_classes()

    def _check_served_classes(self) -> None:
        """With delta_sync: ConfigError unless the server serves rntp's delta-taking classes (delta.py)."""
        if self.delta is not None:
            check_served_classes(self.client)

    @property
    def process(self) -> Optional[ServerProcess]:
        """An owned server's process; None for an attached server (or after close)."""
        return self._server

    def server_alive(self) -> bool:
        """Whether the server answers (an owned server: also whether its process runs)."""
        if self._server is not None and not self._server.alive():
            return False
        try:
            self.client.call("/health", timeout=10)
            return True
        except (SGLangServerError, OSError):
            return False

    def _restart(self, why: str) -> None:
        """Start a fresh server and load the current weights into it, or raise once restarts are used up."""
        if self._server is None:
            raise SGLangServerError(f"the attached SGLang server at {self.cfg.url} failed ({why}); it is not ours "
                                    "to restart")
        if self.restarts >= self.cfg.max_restarts:
            raise SGLangServerError(f"SGLang server failed ({why}) after {self.restarts} restarts "
                                    f"(rollout.sglang.max_restarts={self.cfg.max_restarts}); last log "
                                    f"{self._server.log_path}:\n{self._server.log_tail()}")
        self.relaunch()
        current = self.held_weights()
        if current:
            push_tensor(self.receivers(), list(bucketed(current.items(), self.bucket_bytes)), self.weight_version,
                        lambda bucket: None)
        else:
            self.client.call("/update_weight_version", {"new_version": str(self.weight_version)})

    def held_weights(self) -> dict[str, torch.Tensor]:
        """The last full weights pushed, kept on the host for a server that comes back without them (the delta
        sender's base with delta_sync, else the host copy kept by pushes with keep_host_copy); {} when none."""
        return self.delta.sender.last if self.delta is not None and self.delta.sender.last else self._host_copy

    def serves(self, version: int) -> bool:
        """Whether the server answers and reports weight version `version`: a restarted one reports "default" (the
        weights it started from) until a push, which is not a pushed version 0 (the trainer's initial weights)."""
        try:
            return self._reported_version(self.client.call) == str(version)
        except (SGLangServerError, OSError, http.client.HTTPException):
            return False

    def resync(self) -> None:
        """Push held_weights() whole, as weight_version, to a server that came back without them (an attached
        server that its supervisor restarted at the same address): a new weight group for the distributed channel;
        the disk channel loads the last complete folder pushed (and the deltas since)."""
        if self.cfg.weight_sync == "disk" and self.model_path is not None:
            for folder, complete in ((self.model_path, True), (self._disk.delta_folder, False)):
                if folder is not None:
                    self.update_weights_from_disk(folder, self.weight_version, complete)
            return
        held = self.held_weights()
        if not held:
            raise SGLangServerError(f"the SGLang server at {self.client.url} lost weight version "
                                    f"{self.weight_version} and no copy of it is held here to push again")
        self.leave_weight_group()  # the new process holds none of the old group
        buckets = list(bucketed(list(held.items()), self.bucket_bytes))
        with self._lock:
            if self.cfg.weight_sync == "distributed":
                push_distributed(self._group, self.receivers(), buckets, self.weight_version, lambda bucket: None)
            else:
                push_tensor(self.receivers(), buckets, self.weight_version, lambda bucket: None)
        self.delta_base = self.delta.sender.token if self.delta is not None else None  # it holds the sender's base

    def relaunch(self) -> None:
        """A fresh process for an owned server, from model_path (the initial or the last disk-pushed weights); the
        caller brings it to the current weights (_restart, or a fleet's next push)."""
        if self._server is None:
            raise SGLangServerError(f"the attached SGLang server at {self.client.url} is not ours to relaunch")
        if self._group.formed:
            self._group.leave()  # before the peer goes: gloo aborts the process when a live pair loses its peer
        self._server.stop()
        self.restarts += 1
        self._start()

    def _call(self, path: str, payload: Optional[dict] = None, timeout: float = 600.0) -> Any:
        """client.call with crash detection: a dead server is restarted (current weights) and the call retried."""
        for _ in range(self.cfg.max_restarts + 1):
            try:
                return self.client.call(path, payload, timeout=timeout)
            except (OSError, urllib.error.URLError) as e:  # connection refused/reset: did the server die?
                if self.server_alive():
                    raise SGLangServerError(f"{path}: {e!r} while the server is alive") from e
                self._restart(f"{path}: {e!r}")
        return self.client.call(path, payload, timeout=timeout)

    def close(self) -> None:
        """Leave the weight-update group and stop an owned server (its process group).

        The torch_shm_manager that the tensor channel starts is left alone: tensors of this process may still
        live in shared memory, and freeing one after the manager is gone aborts the process (broken pipe)."""
        self.leave_weight_group()
        if self._server is not None:
            self._server.stop()
            self._server = None

    # -------------------------------------------------------------------------------------------
    # generation

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        """sampling.n rollouts per prompt (prompt 0's first), with per-token log-probs and the weight version."""
        request = generate_request(prompts, sampling, self.logit_bias, self.routed_experts is not None)
        replies = self._call("/generate", request, timeout=self.cfg.request_timeout_s)
        return rollouts_from_replies(request, replies, sampling.n, self.client.url, self.decode, self.routed_experts)

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        """log p(prompt[t] | prompt[<t]) for t >= 1 of each prompt under the served weights (teacher forcing)."""
        replies = self._call("/generate", {"input_ids": prompts, "return_logprob": True, "logprob_start_len": 0,
                                           "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
        return [[float(t[0]) for t in r["meta_info"]["input_token_logprobs"][1:]] for r in replies]

    def server_weight_version(self) -> int:
        """The weight version the server reports, as an int ("default" is 0); an owned server that died is
        restarted first."""
        return reply_version(self._reported_version(self._call))

    @staticmethod
    def _reported_version(call: Callable[..., Any]) -> str:
        """GET /model_info's weight_version through `call`, as the server wrote it."""
        reply = call("/model_info", timeout=60)
        return str(reply.get("weight_version")) if isinstance(reply, dict) else ""

    # -------------------------------------------------------------------------------------------
    # pause / colocation

    def pause(self) -> None:
        """Stop scheduling and retract running requests (they resume, re-prefilled, after continue_generation)."""
        self._call("/pause_generation", {"mode": "retract"}, timeout=120)

    def continue_generation(self) -> None:
        """Resume scheduling after pause(): the retracted requests are prefilled again and finish."""
        self._call("/continue_generation", {}, timeout=120)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Pause (retract) around a block, e.g. a weight update while requests are in flight."""
        self.pause()
        try:
            yield
        finally:
            self.continue_generation()

    def flush_cache(self, timeout_s: float = 30.0) -> None:
        """Drop the prefix (KV) cache; waits up to timeout_s for running requests to drain."""
        self._call(f"/flush_cache?timeout={timeout_s:g}", {}, timeout=timeout_s + 30)

    def sleep(self) -> None:
        """Release the server's KV cache, weights and CUDA graphs for a colocated trainer (with the memory saver on
        a GPU; on CPU the server answers but frees nothing, see docs/design.md)."""
        self._call("/release_memory_occupation", {"tags": list(MEMORY_TAGS)}, timeout=300)
        self._released = set(MEMORY_TAGS)

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        """Take back the released memory of `tags` (default all; only those released, SGLang refuses others):
        ("weights",) first lets a weight update land before the KV cache comes back, as slime orders it."""
        tags = [t for t in MEMORY_TAGS if (tags is None or t in tags) and t in self._released]
        if tags:
            self._call("/resume_memory_occupation", {"tags": tags}, timeout=300)
            self._released.difference_update(tags)

    # -------------------------------------------------------------------------------------------
    # weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push full HF-named tensors through rollout.sglang.weight_sync, in buckets; later rollouts report version.
        The caller's tensors may change afterwards, so an owned server's restart copy is a copy."""
        if self._server is not None:
            named_tensors = ((name, t.detach().to("cpu", copy=True)) for name, t in named_tensors)
        self.update_weights_from_buckets(bucketed(named_tensors, self.bucket_bytes), version,
                                         keep_host_copy=self._server is not None)

    def update_weights_from_buckets(self, buckets: Iterable[NamedTensors], version: int,
                                    keep_host_copy: bool = True) -> dict[str, float]:
        """Push buckets (weights.export.stream_hf_weights, SharedHFMirror.stream) inside one begin/end; seconds
        spent per phase. The buckets must stay unchanged until the next update (true of weights/' streams: fresh
        buffers, or the mirror that only the next sync rewrites): an owned server's restart copy refers to them."""
        channel = self.cfg.weight_sync
        if self.cfg.quantization == "fp8":
            buckets = fp8_buckets(buckets)
        deltas = self.delta is not None and channel != "tensor"  # delta_sync: distributed and disk only
        encoded = self.delta.encoded(buckets, self.receivers()) if deltas else contextlib.nullcontext(buckets)
        with encoded as buckets:
            if channel == "disk":
                return self._disk.push(buckets, version, self.model_path, self.hf_config, self.delta,
                                       self.update_weights_from_disk)
            keep_host_copy = keep_host_copy and self.delta is None  # a restart pushes self.delta.sender.last
            sent = self._remember if keep_host_copy else (lambda bucket: None)
            with self._lock:
                if channel == "tensor":
                    timing = push_tensor(self.receivers(), buckets, version, sent)
                else:
                    timing = push_distributed(self._group, self.receivers(), buckets, version, sent)
        self.weight_version = version
        return timing

    def push_stats(self) -> dict[str, float]:
        """The latest push this engine led with delta_sync (weights/sent_bytes, sent_fraction, delta_encode_s)."""
        return self.delta.stats() if self.delta is not None else {}

    def receivers(self) -> list["SGLangEngine"]:
        """This server and its peers: every server an update goes to."""
        return [self, *self.peers]

    def updating(self) -> contextlib.AbstractContextManager[None]:
        """The /begin_weight_update ... /end_weight_update session on every receiver (receivers.updating)."""
        return receivers.updating(self.receivers())

    def update_weights_from_disk(self, path: str | Path, version: int, complete: bool = True) -> None:
        """Load an HF checkpoint folder (weights/hf_checkpoint.save_hf_checkpoint) into every receiver; a complete
        one (not deltas) is where a restarted server starts from."""
        payload = {"model_path": str(path), "weight_version": str(version), "flush_cache": True}
        with self._lock, self.updating(), receivers.all_calling(self.receivers(), "/update_weights_from_disk",
                                                                payload):
            pass  # the receivers load the folder concurrently (N replicas: one load's time, not N)
        for r in self.receivers():
            r.loaded_from_disk(path, version, complete)

    def loaded_from_disk(self, path: str | Path, version: int, complete: bool) -> None:
        """Record that the server loaded the folder `path` as `version`; a complete one is where a restart starts
        from (no host copy needed then)."""
        self.weight_version = version
        if complete:
            self.model_path = str(path)
            self._host_copy.clear()

    def _remember(self, bucket: NamedTensors) -> None:
        """Keep a pushed bucket for a restart, on the host: a GPU bucket is copied (no GPU memory held)."""
        self._host_copy.update((name, t.detach().to("cpu")) for name, t in bucket)

    def server_ranks(self) -> dict[str, int]:
        """The server's tp, pp and dp sizes (GET /get_server_info, once per server start)."""
        if self._server_info is None:
            self._server_info = self._call("/get_server_info", timeout=60) or {}
        return {k: int(self._server_info.get(f"{k}_size", 1) or 1) for k in ("tp", "pp", "dp")}

    def leave_weight_group(self) -> None:
        """Dissolve the weight-update group on this side and on every receiver (a fleet re-forms it when its
        members change)."""
        self._group.dissolve(self.receivers())
