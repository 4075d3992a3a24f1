"""The weight-update group of the "distributed" channel: a gloo (CPU) or NCCL (GPU) process group outside
torch.distributed's default world, of this process (rank 0) and every receiving server's ranks in turn, formed at
the trainer's routable address over the interface of the route toward the servers."""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from datetime import timedelta
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from rntp_megatron.rollout.sglang.client import SGLangServerError
from rntp_megatron.rollout.sglang.receivers import Receiver, all_calling
from rntp_megatron.runtime.distributed import rank_info
from rntp_megatron.runtime.netif import socket_ifname_env
from rntp_megatron.runtime.spawn import free_port


def weight_group_backend() -> str:
    """The weight-update group's backend: NCCL between GPUs, gloo on a machine without one."""
    return "nccl" if torch.cuda.is_available() else "gloo"


class WeightGroup:
    """This process's side of the weight-update group (rank 0), while formed; `name` is what the servers know it by."""

    def __init__(self, group_host: Optional[str] = None) -> None:
        self.group_host = group_host  # rollout.sglang.group_host: the trainer's address the servers reach
        self.process_group: Optional[Any] = None
        self.name = ""

    @property
    def formed(self) -> bool:
        """Whether this side of the group exists (form() succeeded and nothing left it since)."""
        return self.process_group is not None

    def form(self, receivers: Sequence[Receiver]) -> None:
        """Form the group: this process is rank 0, each receiver's ranks follow in turn (gloo on CPU), at the
        trainer's routable address (rollout.sglang.group_host, else MASTER_ADDR / the first Slurm node)."""
        port = free_port()
        self.name = f"rntp-weights-{secrets.token_hex(4)}"
        backend = weight_group_backend()
        host = self.group_host or rank_info().master_addr
        # this side's interface: the one the route to the (first) server leaves from, unless the user named one
        peer = urllib.parse.urlsplit(receivers[0].client.url).hostname or host
        ifname = socket_ifname_env(peer, os.environ)
        offsets, world = [], 1
        for r in receivers:
            sizes = r.server_ranks()
            offsets.append(world)
            world += sizes["tp"] * sizes["pp"] * sizes["dp"]
        payload = {"master_address": host, "master_port": port, "world_size": world, "group_name": self.name,
                   "backend": backend}
        try:
            with all_calling(receivers, "/init_weights_update_group",
                             *({**payload, "rank_offset": o} for o in offsets)):
                self.process_group = _process_group(backend, host, port, world, self.name, ifname)
        except Exception as e:  # gloo/NCCL name an address at most: say which ends and interfaces met
            self.leave()
            raise SGLangServerError(
                f"the weight-update group at {host}:{port} (rollout.sglang.group_host, else MASTER_ADDR) did not form "
                f"between this trainer (interface {ifname['GLOO_SOCKET_IFNAME']}, the route to {peer}) and the servers "
                f"{[r.client.url for r in receivers]} (whose GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME must name "
                f"their interface toward {host}; slurm/train.sbatch and owned servers set it): {e}") from e

    def dissolve(self, receivers: Sequence[Receiver]) -> None:
        """Dissolve the group on this side and on every receiver (a fleet re-forms it when its members change)."""
        if not self.formed:
            return
        self.leave()
        for r in receivers:
            with contextlib.suppress(SGLangServerError, OSError):
                r.client.call("/destroy_weights_update_group", {"group_name": self.name}, timeout=30)

    def leave(self) -> None:
        """Destroy this process's side of the group (local; no collective)."""
        with contextlib.suppress(Exception):
            dist.destroy_process_group(self.process_group)
        self.process_group = None


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
