"""Which network interface reaches a peer: what GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME must name on a host whose
hostname does not resolve to an address the peer can reach (gloo then falls back to loopback, and the peer is told
its loopback address).

The kernel's own route decides: a UDP socket "connected" to the peer (no packet is sent) gets the source address
the route to it uses, and the interface holding that address is the one (SIOCGIFADDR on each interface).
`python -m rntp_megatron.runtime.netif HOST` prints it (slurm/train.sbatch sets it for the SGLang servers); the
trainer sets it for its own groups (`trainer_ifname_env`, runtime/distributed.py) when they span hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import shutil
import socket
import struct
import subprocess
import sys
from typing import Mapping, Optional

SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def route_source(host: str) -> str:
    """The local IPv4 address the route to `host` (a name or address) leaves from."""
    address = socket.gethostbyname(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))  # UDP: sets the route and source address, sends nothing
        return probe.getsockname()[0]


def interface_addresses() -> dict[str, str]:
    """{interface name: its IPv4 address} of the interfaces that have one."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                reply = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            found[name] = socket.inet_ntoa(reply[20:24])
    return found


def interface_toward(host: str) -> str:
    """The name of the interface whose address the route to `host` leaves from; OSError naming both otherwise."""
    try:
        source = route_source(host)
    except OSError as e:
        raise OSError(f"no route from this host ({socket.gethostname()}) to {host!r}: {e}") from None
    for name, address in interface_addresses().items():
        if address == source:
            return name
    raise OSError(f"the route to {host!r} leaves from {source}, which no interface of {socket.gethostname()} holds "
                  f"({interface_addresses()})")


def socket_ifname_env(peer: str, base: Mapping[str, str]) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME naming the interface toward `peer`, for a process that joins a group
    with it; names already set in `base` (the user's) win."""
    wanted = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
    if all(base.get(k) for k in wanted):
        return {k: base[k] for k in wanted}
    name = interface_toward(peer)
    return {k: base.get(k) or name for k in wanted}


def trainer_ifname_env(master_addr: str, env: Mapping[str, str]) -> dict[str, str]:
    """GLOO_/NCCL_SOCKET_IFNAME for the trainer's own process groups: gloo offers the other ranks the address this
    host's name resolves to, so where that is loopback (Debian's 127.0.1.1 line) and the job spans hosts, the
    interface of the route to another host of the job (MASTER_ADDR, or from the master another node of the Slurm
    step); {} where gloo's own choice is right or no other host is known (names the user set win)."""
    if env.get("GLOO_SOCKET_IFNAME") or not is_loopback(socket.gethostname()):
        return {}
    peer = master_addr if not is_this_host(master_addr) else other_slurm_host(env)
    return socket_ifname_env(peer, env) if peer is not None else {}


def other_slurm_host(env: Mapping[str, str]) -> Optional[str]:
    """A node of this Slurm step (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST, expanded by `scontrol show
    hostnames`) other than this one; None outside Slurm or on a one-node step."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    scontrol = shutil.which("scontrol")
    if not nodelist or scontrol is None:
        return None
    out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    this = env.get("SLURMD_NODENAME") or socket.gethostname()
    return next((h for h in out.stdout.split() if h != this), None)


def is_this_host(host: str) -> bool:
    """Whether `host` (a name or address) names an address of this machine: a socket binds to an address only where
    it is local."""
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


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address) is, or resolves here to, a loopback address: other hosts reach their own
    loopback there."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):  # a name this host cannot resolve is none of its own
        return False


if __name__ == "__main__":
    print(interface_toward(sys.argv[1]))
