"""Where the rollout engine runs relative to the trainer (rollout.placement), and what that means around a step.

colocated: the engine shares the trainer's devices. The in-process MegatronEngine samples from the trainer's
  own module, so there is nothing to send and nothing to free. An SGLang server sleeps while the trainer
  trains (/release_memory_occupation of its KV cache, weights and CUDA graphs before the train step; on a GPU
  it runs with --enable-memory-saver, and the GPU memory free after the release is measured: memory_metrics),
  takes its weights back after the step, receives the new ones through the tensor channel (CUDA IPC on a GPU,
  shared memory on CPU), and only then takes back its KV cache.
separate: an SGLang server on devices of its own keeps serving while the trainer trains (this is what lets
  rollouts run one step ahead, rollout/prefetch.py); weights go through the distributed channel (a gloo group
  on CPU, NCCL on GPU).
config.validate_rollout refuses the combinations that make no sense (a separate in-process engine, one step
ahead while colocated, a channel that does not fit the placement).

Ranks, for an engine other than the in-process one: global rank 0 owns it (starts the server from the
trainer's current weights, or attaches to rollout.sglang.url; pushes weights; puts it to sleep). The first
rank of each model-parallel group sends its data-parallel rank's prompts (to rank 0's server, attached by
URL) and broadcasts the rollouts to the other ranks of its group, which share its episodes. The in-process
engine runs on every rank (its sampling is a TP collective).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import socket
import urllib.parse
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from rntp_megatron.config import ConfigError, RunConfig, SGLangConfig
from rntp_megatron.data.tokenizer import Tokenizer
from rntp_megatron.rollout.engine import Rollout, RolloutEngine
from rntp_megatron.runtime import device
from rntp_megatron.runtime.netif import is_loopback
from rntp_megatron.weights.export import stream_hf_weights
from rntp_megatron.weights.shared_mirror import shared_mirror


def check_reachable(sg: SGLangConfig, urls: list[str], hosts: set[str]) -> None:
    """ConfigError when the trainer's ranks run on several hosts (`hosts`) and the servers' URLs would name a
    loopback address, which each of those hosts reaches as its own: attached URLs, or the address an owned server
    binds (rollout.sglang.host; its URL goes to every rank)."""
    if len(hosts) < 2:
        return
    local = [u for u in urls if is_loopback(urllib.parse.urlsplit(u).hostname or "")]
    if local:
        raise ConfigError(f"rollout.sglang.urls: {local} name a loopback address, but the trainer's ranks run on "
                          f"hosts {sorted(hosts)}, each of which reaches its own loopback there; fix: the servers' "
                          "host names or addresses on the network the hosts share")
    if not urls and is_loopback(sg.host):
        raise ConfigError(f"rollout.sglang.host: {sg.host!r} is a loopback address, but the trainer's ranks run on "
                          f"hosts {sorted(hosts)} and those off rank 0's host cannot reach a server bound there; fix: "
                          "rollout.sglang.host: 0.0.0.0 (its URL is then rank 0's host name) or rank 0's address")


class EnginePlacement:
    """This rank's rollout engine (or None) and the placement's duties around a train step."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, tokenizer: Tokenizer, run_dir: Path,
                 engine: Optional[RolloutEngine] = None) -> None:
        from rntp_megatron.rollout.megatron_engine import MegatronEngine

        self.cfg, self.model = cfg, model
        self.colocated = cfg.rollout.placement == "colocated"
        self.owned = engine is None  # an engine the caller passed in is the caller's to close
        if engine is None and cfg.rollout.engine == "megatron":
            engine = MegatronEngine(model, tokenizer)
        self.in_process = isinstance(engine, MegatronEngine)
        if self.in_process and not self.colocated:  # e.g. passed in under a config written for a server
            raise ConfigError(f"rollout.placement: {cfg.rollout.placement!r} with an in-process MegatronEngine, "
                              "which samples from the trainer's own module and is colocated by nature; fix: "
                              "rollout.placement: colocated")
        self.mp_group = parallel_state.get_model_parallel_group()
        self.mp_source = dist.get_global_rank(self.mp_group, 0)
        if engine is None:
            engine = self._start_sglang(tokenizer, run_dir)
        # one host, CPU shards: each rank writes its shards in place into shared memory (no shard transfers)
        self.mirror = None if self.in_process else shared_mirror(model, cfg.model, self._bucket_bytes())
        self.engine = engine  # on every rank in-process; else on the ranks that generate (None elsewhere)
        self._memory: dict[str, float] = {}

    def _start_sglang(self, tokenizer: Tokenizer, run_dir: Path) -> Optional[RolloutEngine]:
        """Rank 0 starts rollout.sglang.replicas servers from the trainer's current weights (or attaches to
        rollout.sglang.url/urls): a fleet (rollout/sglang/fleet.py) that gets every weight push; the other
        model-parallel sources attach to the same servers by URL to generate. Every rank takes part in the weight
        export's gathers."""
        from rntp_megatron.model import hf_mapping
        from rntp_megatron.rl.rollout_routing import routed_experts
        from rntp_megatron.rollout.sglang.engine import SGLangEngine
        from rntp_megatron.rollout.sglang.fleet import SGLangFleet
        from rntp_megatron.runtime.spawn import free_port

        sg = self.cfg.rollout.sglang
        padding = range(tokenizer.vocab_size, self.cfg.model.vocab_size)  # sampled by no engine
        urls = [u for u in [sg.url, *sg.urls] if u]
        hosts: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        check_reachable(sg, urls, set(hosts))
        folder = None if urls else self._export_initial(tokenizer, run_dir / "sglang")
        count = len(urls) or sg.replicas
        # in a fleet the fleet restarts a dead server and brings it to the current weights; alone, it does so itself
        own = dataclasses.replace(sg, max_restarts=0) if count > 1 else sg
        common = dict(decode=tokenizer.decode, padding_ids=padding, bucket_bytes=self._bucket_bytes(),
                      dtype=self.cfg.model.params_dtype, routed_experts=routed_experts(self.cfg))
        fleet = None
        if dist.get_rank() == 0:
            if urls:
                engines = [SGLangEngine(dataclasses.replace(own, url=u), run_dir=run_dir / "sglang",
                                        hf_config=hf_mapping.hf_config(self.cfg.model), **common) for u in urls]
            else:
                engines = [SGLangEngine(dataclasses.replace(own, port=sg.port if i == 0 else free_port()),
                                        model_path=folder, run_dir=run_dir / "sglang" / f"replica{i}",
                                        colocated=self.colocated, **common)
                           for i in range(count)]
            fleet = SGLangFleet(engines, owned=not urls, max_restarts=sg.max_restarts,
                                retry_backoff_s=sg.retry_backoff_s)
            atexit.register(fleet.close)  # the servers are process groups of their own: never leave them behind
        addresses = [fleet.addresses() if fleet is not None else None]
        dist.broadcast_object_list(addresses, src=0)
        if fleet is None and dist.get_rank() == self.mp_source:
            fleet = SGLangFleet([SGLangEngine(dataclasses.replace(own, url=url, api_key=key), **common)
                                 for url, key in addresses[0]], owned=False, retry_backoff_s=sg.retry_backoff_s)
        return fleet

    def _export_initial(self, tokenizer: Tokenizer, folder: Path) -> Optional[Path]:
        """The trainer's current weights as an HF folder with a tokenizer (rank 0; None elsewhere)."""
        from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer
        from rntp_megatron.weights.fp8 import QUANTIZATION_CONFIG, fp8_buckets
        from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

        stream = stream_hf_weights(self.model, self.cfg.model, self._bucket_bytes())
        fp8 = self.cfg.rollout.sglang.quantization == "fp8"
        if dist.get_rank() != 0:
            for _ in stream:  # the gathers need every rank
                pass
            return None
        # A byte-vocabulary server needs tokenizer files only to start: the trainer sends token ids, passes
        # its stop tokens by id and decodes the replies itself (specials live above the 256 bytes).
        tok_dir = self.cfg.data.tokenizer.path or write_byte_tokenizer(folder / "tokenizer", eos_id=None)
        return save_hf_checkpoint(fp8_buckets(stream) if fp8 else stream, folder / "initial", self.cfg.model,
                                  tokenizer_dir=tok_dir, overwrite=True,
                                  torch_dtype=self.cfg.model.params_dtype if fp8 else None,
                                  quantization_config=QUANTIZATION_CONFIG if fp8 else None)

    def _bucket_bytes(self) -> int:
        """rollout.weight_bucket_mb in bytes: the largest piece of the weight stream held at once."""
        return self.cfg.rollout.weight_bucket_mb << 20

    # ---------------------------------------------------------------------------------------------
    def share(self, rollouts: Optional[list[Rollout]]) -> list[Rollout]:
        """The model-parallel group's rollouts on each of its ranks (the source's, broadcast when needed)."""
        if self.in_process or dist.get_world_size(self.mp_group) == 1:
            return rollouts
        box = [rollouts]
        dist.broadcast_object_list(box, src=self.mp_source, group=self.mp_group)
        return box[0]

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Around a train step: a colocated server sleeps, once no rank is generating any more; after the step
        it takes back its weights only (push_weights brings back the rest once the new weights are in)."""
        asleep = self.colocated and not self.in_process
        if asleep:
            dist.barrier()  # every rank's prompts are answered (releasing under a running request kills it)
            if dist.get_rank() == 0:
                self.engine.sleep()
                self._measure_release()
        try:
            yield
        finally:
            if asleep and dist.get_rank() == 0:
                self.engine.wake(("weights",))

    def _measure_release(self) -> None:
        """On a GPU: the device memory free after the server's release (torch.cuda.mem_get_info), printed once."""
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            return
        free, total = torch.cuda.mem_get_info(device)
        if not self._memory:
            print(f"SGLang server released its KV cache, weights and CUDA graphs: {free / 2**30:.1f} of "
                  f"{total / 2**30:.1f} GiB free on {device}", flush=True)
        self._memory = {"gpu_free_gib_after_release": free / 2**30, "gpu_total_gib": total / 2**30}

    def memory_metrics(self) -> dict[str, float]:
        """The GPU memory measured after the latest release ({} on CPU or with a server that never slept)."""
        return dict(self._memory)

    def push_weights(self, version: int) -> None:
        """The trainer's weights to the engine, tagged `version`; no rank generates again before it is served."""
        if self.in_process:  # it samples from the trainer's module: only the version to record
            self.engine.update_weights(iter(()), version)
            return
        if self.mirror is None:
            buckets = stream_hf_weights(self.model, self.cfg.model, self._bucket_bytes())
        else:
            buckets = self.mirror.stream()
        failure = None
        if dist.get_rank() == 0:
            try:
                self.engine.update_weights_from_buckets(buckets, version)
                if self.colocated:
                    self.engine.wake()  # the KV cache and CUDA graphs, after the weights are in
            except Exception as e:  # told to every rank below, so none waits out a process-group timeout
                failure = e
        else:
            for _ in buckets:
                pass
        failed = torch.tensor([float(failure is not None)], device=device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failure is not None:
            raise failure
        if failed.item():
            raise RuntimeError(f"rank 0 failed to push weight version {version} to the rollout engine (its log says why)")
        if dist.get_rank() != 0 and self.engine is not None:
            self.engine.weight_version = version  # what the servers serve: one started again is waited for

    def close(self) -> None:
        """Stop an engine this placement started (an SGLang server); one passed in stays the caller's."""
        if self.owned and self.engine is not None:
            self.engine.close()
