"""The SGLang rollout engine: a real SGLang server (started as a child process, or attached by URL) behind
the RolloutEngine contract.

Weights reach the server through one of three channels (rollout.sglang.weight_sync), each inside
/begin_weight_update ... /end_weight_update and tagged with a weight version:
- "tensor": same machine; each bucket is pickled the way SGLang's MultiprocessingSerializer pickles (torch's
  ForkingPickler), once per server TP rank, and POST /update_weights_from_tensor maps it. The path follows the
  tensors' device (`sharing_path`): CUDA tensors stay on the GPU and travel as CUDA IPC handles (copy: trainer
  GPU -> server params); CPU tensors go through shared memory (torch's file_system strategy; copies: trainer ->
  shm, shm -> server params).
- "distributed": a gloo (CPU) or NCCL (GPU) group of this process (rank 0) and the server's ranks; each bucket
  is one flat byte buffer, on the group's device (weights/buckets.backend_device), broadcast while
  POST /update_weights_from_distributed (flattened_bucket) receives it.
- "disk": an HF checkpoint folder written with weights/hf_checkpoint, loaded with /update_weights_from_disk
  (fallback, and the only channel across clusters). The folder of a version appears whole (written aside, then
  renamed), under rollout.sglang.weights_dir when the servers need a shared filesystem to see it.
`peers` (set by rollout/sglang_fleet.py) are further servers that get every update this engine sends: one
folder loaded by all at once, each tensor payload sent to each, one broadcast group holding every server's ranks.
With rollout.sglang.delta_sync the distributed and disk channels send each tensor's changed elements
(weights/delta.py) when that is fewer bytes, to servers that run rntp's served classes (rollout/sglang_plugins);
the whole push goes full when a receiver did not get the previous one. With rollout.sglang.quantization "fp8"
every channel sends blockwise FP8 linear weights with their `weight_scale_inv` (weights/fp8.py). A colocated
server on a GPU runs with --enable-memory-saver: sleep() releases its KV cache, weights and CUDA graphs;
wake(("weights",)) brings the weights back for an update, wake() the rest.
`paused()` retracts running requests around an update so weights can change while requests are in flight
(they finish under the new version). An owned server that dies is restarted with the current weights (the
last full set pushed, kept in host memory, or the last disk folder) at most max_restarts times.
`padding_ids` (the served model's rows beyond the tokenizer's vocabulary, e.g. Qwen3's 151936 vs ~151669) are
never sampled (a logit bias of PADDING_BIAS), so rollouts and their log-probs follow the distribution over the
real vocabulary that the trainer recomputes (rl/logprobs.mask_padded_vocab).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import http.client
import io
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.parse
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from rntp_megatron.config import ConfigError, SGLangConfig
from rntp_megatron.rollout.engine import Rollout, RolloutEngine, SamplingParams
from rntp_megatron.rollout.sglang_server import HTTPClient, ServerProcess, SGLangServerError
from rntp_megatron.rollout.sglang_plugins import served_env
from rntp_megatron.rollout.sglang_plugins.rntp_delta_models import codec
from rntp_megatron.runtime.distributed import rank_info
from rntp_megatron.runtime.netif import socket_ifname_env
from rntp_megatron.runtime.spawn import free_port
from rntp_megatron.weights.buckets import DEFAULT_BUCKET_BYTES, NamedTensors, backend_device, bucketed, flatten
from rntp_megatron.weights.delta import DeltaSender
from rntp_megatron.weights.fp8 import fp8_buckets

CHANNELS = ("tensor", "distributed", "disk")
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES
PADDING_BIAS = -1.0e4  # added to a logit, exp() underflows to 0 in float32; JSON has no -inf


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
        self._group: Optional[Any] = None
        self._group_name = ""
        self._released: set[str] = set()  # memory tags the server has released (sleep) and not resumed
        self._server_info: Optional[dict[str, Any]] = None
        self._lock = threading.Lock()
        # delta_sync: this engine's sender (used while it leads a push) and which push the server holds as its base
        self._delta = DeltaSender(cfg.delta_max_density) if cfg.delta_sync else None
        self._delta_base: Optional[object] = None  # the sender's token of the last push this server got whole
        self._delta_folder: Optional[Path] = None  # disk: the last folder of deltas (model_path stays a full one)
        if cfg.url is not None:
            self.client = HTTPClient(cfg.url, self.api_key)
            self.startup_s = self._wait_attached()
            self._check_served_classes()
            if routed_experts is not None:  # refused here, before a fleet would take the error for a failure
                probe = self.client.call("/generate", {"input_ids": [0], "sampling_params": {"max_new_tokens": 1},
                                                       "return_routed_experts": True}, timeout=60)
                self._generated_experts(probe["meta_info"], 1, 1)
        else:
            self._start()

    # -------------------------------------------------------------------------------------------
    # server lifecycle

    def _wait_attached(self) -> float:
        """Seconds until an attached server answered GET /health, asked with back-off (0.5 s doubling to 10 s) for
        up to rollout.sglang.startup_timeout_s: a replica started beside the trainer may still be loading."""
        start, pause = time.monotonic(), 0.5
        while True:
            try:
                self.client.call("/health", timeout=30)
                return time.monotonic() - start
            except (SGLangServerError, OSError) as e:  # OSError: refused, unreachable, reset (URLError is one)
                waited = time.monotonic() - start
                if waited + pause > self.cfg.startup_timeout_s:
                    raise SGLangServerError(
                        f"the SGLang server at {self.cfg.url} did not answer /health within {waited:.0f} s "
                        f"(rollout.sglang.startup_timeout_s={self.cfg.startup_timeout_s:g}); last error: {e}") from None
            time.sleep(pause)
            pause = min(2 * pause, 10.0)

    def _start(self) -> None:
        # a restart keeps the port: the ranks that attached by URL (rollout/placement.py) know only this address
        port = self.cfg.port if self._server is None else self._server.port
        self._server = ServerProcess(self.cfg.python, self.model_path, self.cfg, self.run_dir, port, self.api_key,
                                     self.dtype, attempt=self.restarts, colocated=self.colocated)
        self._released, self._server_info, self._delta_base = set(), None, None
        self.client = HTTPClient(self._server.url, self.api_key)
        self.startup_s = self._server.wait_healthy(self.client, self.cfg.startup_timeout_s)
        self._check_served_classes()

    def _check_served_classes(self) -> None:
        """With delta_sync: ConfigError unless the server serves rntp_delta_models' classes (they answer
        GET /get_weights_by_name of codec.MARKER; SGLang's own classes do not, and would load deltas as no-ops)."""
        if self._delta is None:
            return
        try:
            reply = self.client.call("/get_weights_by_name", {"name": codec.MARKER, "truncate_size": 1}, timeout=60)
        except SGLangServerError as e:
            reply = repr(e)[:200]
        marker = [float(codec.FORMAT)]
        if reply != marker and not (isinstance(reply, list) and reply and all(r == marker for r in reply)):
            env = " ".join(f"{k}={v}" for k, v in served_env().items())
            raise ConfigError(
                f"rollout.sglang.delta_sync: the SGLang server at {self.client.url} does not serve rntp's "
                f"delta-taking model classes (GET /get_weights_by_name {codec.MARKER!r} answered {reply!r}); start "
                f"it with {env} (slurm/train.sbatch does when delta_sync is on) and a model of one of their "
                "architectures (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM), or set "
                "rollout.sglang.delta_sync: false")

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
            self._push_tensor(list(bucketed(current.items(), self.bucket_bytes)), self.weight_version)
        else:
            self.client.call("/update_weight_version", {"new_version": str(self.weight_version)})

    def held_weights(self) -> dict[str, torch.Tensor]:
        """The last full weights pushed, kept on the host for a server that comes back without them (the delta
        sender's base with delta_sync, else the host copy kept by pushes with keep_host_copy); {} when none."""
        return self._delta.last if self._delta is not None and self._delta.last else self._host_copy

    def serves(self, version: int) -> bool:
        """Whether the server answers and reports weight version `version` (a restarted one reports "default",
        the weights it started from, until a push)."""
        try:
            reply = self.client.call("/model_info", timeout=30)
        except (SGLangServerError, OSError, http.client.HTTPException):
            return False
        return isinstance(reply, dict) and str(reply.get("weight_version")) == str(version)

    def resync(self) -> None:
        """Push held_weights() whole, as weight_version, to a server that came back without them (an attached
        server that its supervisor restarted at the same address): a new weight group for the distributed channel;
        the disk channel loads the last complete folder pushed (and the deltas since)."""
        if self.cfg.weight_sync == "disk" and self.model_path is not None:
            for folder, complete in ((self.model_path, True), (self._delta_folder, False)):
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
                self._push_distributed(buckets, self.weight_version, keep_host_copy=False)
            else:
                self._push_tensor(buckets, self.weight_version)
        self._delta_base = self._delta.token if self._delta is not None else None  # it holds the sender's base

    def relaunch(self) -> None:
        """A fresh process for an owned server, from model_path (the initial or the last disk-pushed weights); the
        caller brings it to the current weights (_restart, or a fleet's next push)."""
        if self._server is None:
            raise SGLangServerError(f"the attached SGLang server at {self.client.url} is not ours to relaunch")
        if self._group is not None:
            self._leave_group()  # before the peer goes: gloo aborts the process when a live pair loses its peer
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
        if self.logit_bias:
            params["logit_bias"] = self.logit_bias
        request: dict[str, Any] = {"input_ids": expanded, "sampling_params": params, "return_logprob": True}
        if self.routed_experts is not None:
            request["return_routed_experts"] = True  # every position's; the prompt's are cut off below
        replies = self._call("/generate", request, timeout=self.cfg.request_timeout_s)
        rollouts = []
        for i, (prompt, reply) in enumerate(zip(expanded, replies)):
            meta = reply["meta_info"]
            finish = (meta.get("finish_reason") or {}).get("type", "length")
            if finish == "abort":
                raise SGLangServerError(f"request {i} was aborted by the server: {meta.get('finish_reason')}")
            tokens = [int(t[1]) for t in meta["output_token_logprobs"]]
            rollouts.append(Rollout(
                prompt_ids=list(prompt), token_ids=tokens,
                text=self.decode(tokens) if self.decode is not None else reply.get("text", ""),
                logprobs=[float(t[0]) for t in meta["output_token_logprobs"]],
                finish_reason="stop" if finish == "stop" else "length",
                weight_version=_version(meta.get("weight_version")), prompt_index=i // sampling.n,
                routed_experts=self._generated_experts(meta, len(prompt), len(tokens))))
        return rollouts

    def _generated_experts(self, meta: dict[str, Any], prompt_len: int, generated: int) -> Optional[torch.Tensor]:
        """int32[generated, layers, k]: of SGLang's routed experts of positions [0, prompt + generated - 1) (base64
        int32 [positions, layers, k]; the last token is never fed), those of the positions predicting the
        generated tokens, prompt_len - 1 on."""
        if self.routed_experts is None:
            return None
        if meta.get("routed_experts") is None:
            raise SGLangServerError(
                f"the SGLang server at {self.client.url} returned no routed experts: start it with "
                "--enable-return-routed-experts, or set rollout.sglang.routed_experts: false (no "
                "moe/rollout_routing_mismatch then)")
        layers, k = self.routed_experts
        flat = torch.frombuffer(bytearray(base64.b64decode(meta["routed_experts"])), dtype=torch.int32)
        positions = prompt_len + generated - 1
        if flat.numel() != positions * layers * k:
            raise SGLangServerError(f"the SGLang server at {self.client.url} returned {flat.numel()} routed experts "
                                    f"for {positions} positions of {layers} layers, top {k}: does it serve this "
                                    "model (model.num_layers, model.moe_router_topk)?")
        return flat.view(positions, layers, k)[prompt_len - 1:].clone()

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        """log p(prompt[t] | prompt[<t]) for t >= 1 of each prompt under the served weights (teacher forcing)."""
        replies = self._call("/generate", {"input_ids": prompts, "return_logprob": True, "logprob_start_len": 0,
                                           "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
        return [[float(t[0]) for t in r["meta_info"]["input_token_logprobs"][1:]] for r in replies]

    def server_weight_version(self) -> int:
        """The weight version the server reports."""
        return _version(self._call("/get_model_info", timeout=60).get("weight_version"))

    # -------------------------------------------------------------------------------------------
    # pause / colocation

    def pause(self) -> None:
        """Stop scheduling and retract running requests (they resume, re-prefilled, after continue_generation)."""
        self._call("/pause_generation", {"mode": "retract"}, timeout=120)

    def continue_generation(self) -> None:
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
        with self._delta_encoded(buckets) as buckets:
            if channel == "disk":
                return self._push_disk(buckets, version)
            keep_host_copy = keep_host_copy and self._delta is None  # a restart pushes self._delta.last
            with self._lock:
                if channel == "tensor":
                    timing = self._push_tensor(buckets, version, keep_host_copy)
                else:
                    timing = self._push_distributed(buckets, version, keep_host_copy)
        self.weight_version = version
        return timing

    @contextlib.contextmanager
    def _delta_encoded(self, buckets: Iterable[NamedTensors]) -> Iterator[Iterable[NamedTensors]]:
        """With delta_sync (distributed, disk): the buckets as deltas against the last push, or whole when some
        receiver did not get that push (never pushed to, restarted, rejoined, or a push that failed part-way); after
        the push every receiver holds it as its base. Else the buckets unchanged."""
        if self._delta is None or self.cfg.weight_sync == "tensor":
            yield buckets
            return
        receivers = self._receivers()
        full = self._delta.token is None or any(r._delta_base is not self._delta.token for r in receivers)
        try:
            yield self._delta.encode(buckets, full)
        except BaseException:
            for r in receivers:
                r._delta_base = None
            raise
        self._delta.token = object()
        for r in receivers:
            r._delta_base = self._delta.token

    def push_stats(self) -> dict[str, float]:
        """The latest push this engine led with delta_sync (weights/sent_bytes, sent_fraction, delta_encode_s)."""
        return self._delta.stats() if self._delta is not None and self._delta.token is not None else {}

    def _receivers(self) -> list["SGLangEngine"]:
        """This server and its peers: every server an update goes to."""
        return [self, *self.peers]

    @contextlib.contextmanager
    def _updating(self) -> Iterator[None]:
        """/begin_weight_update on every receiver at once ... /end_weight_update on every one opened, at once; each
        session opened is closed, also when another receiver or the block fails (a dead one is the caller's to
        drop). The first failure is raised, unless the block's own exception is on its way."""
        receivers = self._receivers()
        with _in_threads([functools.partial(r.client.call, "/begin_weight_update", {}) for r in receivers]) as begun:
            pass
        opened = [r for r, reply in zip(receivers, begun) if not isinstance(reply, Exception)]
        failure = next((reply for reply in begun if isinstance(reply, Exception)), None)
        try:
            if failure is None:
                yield
        finally:
            with _in_threads([functools.partial(r.client.call, "/end_weight_update", {}) for r in opened]) as ended:
                pass
            failure = failure or next((reply for reply in ended if isinstance(reply, Exception)), None)
        if failure is not None:
            raise failure

    def update_weights_from_disk(self, path: str | Path, version: int, complete: bool = True) -> None:
        """Load an HF checkpoint folder (weights/hf_checkpoint.save_hf_checkpoint) into every receiver; a complete
        one (not deltas) is where a restarted server starts from."""
        payload = {"model_path": str(path), "weight_version": str(version), "flush_cache": True}
        with self._lock, self._updating(), self._all_calling("/update_weights_from_disk", payload):
            pass  # the receivers load the folder concurrently (N replicas: one load's time, not N)
        for r in self._receivers():
            r.weight_version = version
            if complete:
                r.model_path = str(path)  # a restart starts from these weights
                r._host_copy.clear()

    def _push_disk(self, buckets: Iterable[NamedTensors], version: int) -> dict[str, float]:
        """Write an HF folder (config of the served model) under weights_dir (default run_dir/weights), load it into
        every receiver, drop the previous pushed version."""
        import json
        import shutil

        from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

        source = Path(self.model_path) if self.model_path else None
        if source is not None and (source / "config.json").exists():
            has_tokenizer = any((source / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
            config, tokenizer_dir = json.loads((source / "config.json").read_text()), source if has_tokenizer else None
        elif self.hf_config is not None:  # an attached server: the trainer knows what it serves
            config, tokenizer_dir = self.hf_config, None
        else:
            raise SGLangServerError("the disk channel needs the served model's config.json: a model_path folder or "
                                    "hf_config (the placement passes the trainer's)")
        t0 = time.perf_counter()
        root = Path(self.cfg.weights_dir) if self.cfg.weights_dir else self.run_dir / "weights"
        folder = save_hf_checkpoint(buckets, root / f"v{version}", config, tokenizer_dir=tokenizer_dir,
                                    overwrite=True)
        t1 = time.perf_counter()
        complete = self._delta is None or not self._delta.deltas  # a folder of deltas is no model to start from
        self.update_weights_from_disk(folder, version, complete)
        # older pushed versions (never the user's folder); the last complete one stays while deltas follow it
        for older in (self._delta_folder, source if complete else None):
            if older is not None and older.parent == folder.parent and older != folder:
                shutil.rmtree(older, ignore_errors=True)
        self._delta_folder = None if complete else folder
        return {"write_s": t1 - t0, "server_s": time.perf_counter() - t1}

    def _remember(self, bucket: NamedTensors, keep_host_copy: bool) -> None:
        if keep_host_copy:  # on the host: a GPU bucket is copied (no GPU memory held)
            self._host_copy.update((name, t.detach().to("cpu")) for name, t in bucket)

    def _server_ranks(self) -> dict[str, int]:
        """The server's tp, pp and dp sizes (GET /get_server_info, once per server start)."""
        if self._server_info is None:
            self._server_info = self._call("/get_server_info", timeout=60) or {}
        return {k: int(self._server_info.get(f"{k}_size", 1) or 1) for k in ("tp", "pp", "dp")}

    def _push_tensor(self, buckets: Iterable[NamedTensors], version: int, keep_host_copy: bool = False
                     ) -> dict[str, float]:
        """Tensors via POST /update_weights_from_tensor (CUDA IPC handles or shared memory, tensor_payloads), one
        call per bucket as it arrives, then an empty call that flushes the cache and sets the version (no
        lookahead: a bucket never waits for the next)."""
        elsewhere = [r.client.url for r in self._receivers() if not on_this_host(r.client.url)]
        if elsewhere:  # the shared-memory names (CUDA IPC handles) mean nothing on another machine
            raise SGLangServerError(f"rollout.sglang.weight_sync: 'tensor' shares this host's memory, but the servers "
                                    f"at {elsewhere} are not on this host; fix: rollout.sglang.weight_sync: disk, or "
                                    "rollout.placement: separate with weight_sync: distributed")
        timing = {"serialize_s": 0.0, "server_s": 0.0}
        with self._updating():
            for bucket in buckets:
                self._send_tensor_bucket(bucket, version, False, timing)
                self._remember(bucket, keep_host_copy)
            self._send_tensor_bucket([], version, True, timing)
        return timing

    def _send_tensor_bucket(self, bucket: NamedTensors, version: int, last: bool, timing: dict[str, float]) -> None:
        """One bucket to every receiver at once (each maps the same tensors), pickled anew for each TP rank of each
        (tensor_payloads: one pickle per unpickling process); the seconds spent serializing and in the servers are
        added to timing."""
        t0 = time.perf_counter()
        payloads = [{"serialized_named_tensors": tensor_payloads(bucket, r._server_ranks()["tp"]), "flush_cache": last,
                     "weight_version": str(version) if last else None} for r in self._receivers()]
        t1 = time.perf_counter()
        with self._all_calling("/update_weights_from_tensor", *payloads):
            pass
        timing["serialize_s"] += t1 - t0
        timing["server_s"] += time.perf_counter() - t1

    def _join_group(self) -> None:
        """Form the weight-update group: this process is rank 0, each receiver's ranks follow in turn (gloo on CPU),
        at the trainer's routable address (rollout.sglang.group_host, else MASTER_ADDR / the first Slurm node)."""
        port = free_port()
        self._group_name = f"rntp-weights-{secrets.token_hex(4)}"
        backend = weight_group_backend()
        host = self.cfg.group_host or rank_info().master_addr
        # this side's interface: the one the route to the (first) server leaves from, unless the user named one
        peer = urllib.parse.urlsplit(self._receivers()[0].client.url).hostname or host
        ifname = socket_ifname_env(peer, os.environ)
        offsets, world = [], 1
        for r in self._receivers():
            sizes = r._server_ranks()
            offsets.append(world)
            world += sizes["tp"] * sizes["pp"] * sizes["dp"]
        payload = {"master_address": host, "master_port": port, "world_size": world, "group_name": self._group_name,
                   "backend": backend}
        try:
            with self._all_calling("/init_weights_update_group", *({**payload, "rank_offset": o} for o in offsets)):
                self._group = _process_group(backend, host, port, world, self._group_name, ifname)
        except Exception as e:  # gloo/NCCL name an address at most: say which ends and interfaces met
            self._leave_group()
            raise SGLangServerError(
                f"the weight-update group at {host}:{port} (rollout.sglang.group_host, else MASTER_ADDR) did not form "
                f"between this trainer (interface {ifname['GLOO_SOCKET_IFNAME']}, the route to {peer}) and the servers "
                f"{[r.client.url for r in self._receivers()]} (whose GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME must name "
                f"their interface toward {host}; slurm/train.sbatch and owned servers set it): {e}") from e

    def leave_weight_group(self) -> None:
        """Dissolve the weight-update group on this side and on every receiver (a fleet re-forms it when its
        members change)."""
        if self._group is None:
            return
        self._leave_group()
        for r in self._receivers():
            with contextlib.suppress(SGLangServerError, OSError):
                r.client.call("/destroy_weights_update_group", {"group_name": self._group_name}, timeout=30)

    def _leave_group(self) -> None:
        """Destroy this process's side of the weight-update group (local; no collective)."""
        with contextlib.suppress(Exception):
            dist.destroy_process_group(self._group)
        self._group = None

    @contextlib.contextmanager
    def _all_calling(self, path: str, *payloads: dict[str, Any]) -> Iterator[None]:
        """POST path to every receiver at once, each in a thread (payloads[i] to receiver i, or the one payload to
        all), while the block runs (e.g. the broadcast they receive); after it, SGLangServerError if one failed."""
        receivers = self._receivers()
        payloads = payloads if len(payloads) == len(receivers) else payloads * len(receivers)
        with _in_threads([functools.partial(r.client.call, path, p) for r, p in zip(receivers, payloads)]) as replies:
            yield
        for reply in replies:
            _check({"success": False, "message": repr(reply)} if isinstance(reply, Exception) else reply, path)

    def _push_distributed(self, buckets: Iterable[NamedTensors], version: int, keep_host_copy: bool
                          ) -> dict[str, float]:
        """Each bucket as one flat byte buffer broadcast over the weight-update group (load_format flattened_bucket)."""
        if self._group is None:
            self._join_group()
        device = backend_device(weight_group_backend())
        timing = {"flatten_s": 0.0, "broadcast_s": 0.0, "server_s": 0.0}
        with self._updating():
            items = iter(buckets)
            bucket = next(items, None)
            while bucket is not None:
                following = next(items, None)
                t0 = time.perf_counter()
                flat, metas = flatten(bucket, device=device)
                timing["flatten_s"] += time.perf_counter() - t0
                payload = {"names": [m.name for m in metas],
                           "dtypes": [str(m.dtype).replace("torch.", "") for m in metas],
                           "shapes": [list(m.shape) for m in metas], "group_name": self._group_name,
                           "load_format": "flattened_bucket", "flush_cache": following is None,
                           "weight_version": str(version) if following is None else None}
                t1 = time.perf_counter()
                with self._all_calling("/update_weights_from_distributed", payload):
                    dist.broadcast(flat, src=0, group=self._group)  # this process is rank 0: one send feeds all
                    timing["broadcast_s"] += time.perf_counter() - t1
                timing["server_s"] += time.perf_counter() - t1
                self._remember(bucket, keep_host_copy)
                bucket = following
        return timing


def weight_group_backend() -> str:
    """The weight-update group's backend: NCCL between GPUs, gloo on a machine without one."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def sharing_path(bucket: NamedTensors) -> str:
    """How a bucket's tensors reach a server on this machine: "cuda_ipc" (CUDA tensors: a handle to the GPU
    memory, which stays where it is) or "shared_memory" (CPU tensors: a named shared-memory file)."""
    devices = {t.device.type for _, t in bucket} or {"cpu"}
    if len(devices) > 1:
        raise ValueError(f"a weight bucket mixes devices {sorted(devices)}; pack it on one (weights/buckets.packed)")
    (device,) = devices
    if device not in ("cuda", "cpu"):
        raise ValueError(f"tensors on {device!r} cannot be shared with a server process (only cuda or cpu)")
    return "cuda_ipc" if device == "cuda" else "shared_memory"


def tensor_payloads(bucket: NamedTensors, ranks: int) -> list[str]:
    """`serialized_named_tensors` for /update_weights_from_tensor: the bucket pickled by torch's ForkingPickler and
    base64-encoded (SGLang's MultiprocessingSerializer.serialize(..., output_str=True)), once per server TP rank.

    A pickle must be unpickled by exactly one process. A CUDA IPC handle is opened once per receiver; a CPU tensor
    (file_system strategy) pickles as the name of its shared-memory file plus one reference taken on that file's
    count (`_shared_incref`), which the unpickling process gives back (`_shared_decref`) after mapping it, and each
    mapping gives its own back when freed; at zero the file is unlinked. One pickle unpickled by two servers gives
    back two references for one taken: after a push the count of a tensor that lives on (SharedHFMirror's buffers,
    rewritten in place each sync) reaches zero, the file is unlinked while the trainer still maps it, and the next
    push's pickle names a file that no longer exists (the server fails to open it). So every receiving process
    (each server of a fleet, each TP rank of a server) gets a pickle of its own."""
    import torch.multiprocessing as tmp  # registers torch's reducers with ForkingPickler
    from multiprocessing.reduction import ForkingPickler

    if sharing_path(bucket) == "shared_memory":
        tmp.set_sharing_strategy("file_system")  # fds cannot cross HTTP; named shm files can
    items = [(n, t.detach().contiguous()) for n, t in bucket]

    def serialized() -> str:
        buf = io.BytesIO()  # a tensor already in shared memory (SharedHFMirror) pickles as its name alone
        ForkingPickler(buf).dump(items)
        return base64.b64encode(buf.getvalue()).decode()

    return [serialized() for _ in range(ranks)]


def on_this_host(url: str) -> bool:
    """Whether a server URL names an address of this machine: a socket binds to an address only where it is local."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0]: info[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        return False
    for address, family in addresses.items():
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            with contextlib.suppress(OSError):
                probe.bind((address, 0))
                return True
    return False


@contextlib.contextmanager
def _in_threads(calls: Sequence[Callable[[], Any]]) -> Iterator[list[Any]]:
    """Each call in a thread of its own while the block runs; after the block, the list holds each call's return
    value, or the exception it raised (one receiver's failure must not keep the others from being called)."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as e:  # handed to the caller, which decides what a failure means
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        for t in threads:
            t.join()


def _process_group(backend: str, host: str, port: int, world_size: int, group_name: str,
                   ifname: Mapping[str, str]) -> Any:
    """Rank 0 of a process group outside torch.distributed's default world, formed the way SGLang's
    init_custom_process_group forms the server's side (tcp rendezvous, store prefixed by the group name), over
    the interfaces `ifname` names (GLOO_/NCCL_SOCKET_IFNAME: read when the group's transport is made)."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(minutes=5)
    # This process hosts the store. (torch's tcp:// rendezvous would not under torchrun: with
    # TORCHELASTIC_USE_AGENT_STORE it only connects as a client, and the group never forms.)
    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    saved = {k: os.environ.get(k) for k in ifname}
    os.environ.update(ifname)
    try:  # torch has no public call for a group beside the default one; SGLang uses the same private helper.
        group, _ = c10d._new_process_group_helper(world_size, 0, [], c10d.Backend(backend),
                                                  c10d.PrefixStore(group_name, store), group_name=group_name,
                                                  backend_options=None, timeout=timeout)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _check(reply: Any, path: str) -> None:
    """Raise when an update call reports failure (HTTP 200 with success false, or a refused call)."""
    if isinstance(reply, dict) and reply.get("success") is False:
        raise SGLangServerError(f"{path} failed: {reply.get('message')}")


def _version(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0  # the server's initial version ("default")
