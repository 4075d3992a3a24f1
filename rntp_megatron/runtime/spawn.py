"""Run a function on N gloo ranks (spawned processes) and collect what each rank returns.

    results = run_ranks(my_fn, world_size=4, args=(x,))   # my_fn(rank, world_size, *args) -> picklable

The function must live at module level (spawn pickles it by name). Each rank gets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT and OMP_NUM_THREADS=1; a failing rank's traceback is re-raised here.
As under torchrun, this process hosts the ranks' TCPStore (TORCHELASTIC_USE_AGENT_STORE): its port is bound
before any rank starts and stays bound until they end, so no other process can take it in between.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from rntp_megatron.config import LOOPBACK


def free_port() -> int:
    """A port free now (for servers that must be told theirs; another process may take it before they bind)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR=LOOPBACK,
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensor data; torch's queue pickler would pass shared-memory handles that
        # die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_ranks(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 600) -> list[Any]:
    """fn(rank, world_size, *args) on each of world_size spawned ranks; the list of their return values."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    store = dist.TCPStore(LOOPBACK, 0, None, is_master=True, wait_for_workers=False)
    procs = [ctx.Process(target=_entry, args=(r, world_size, store.port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout_s
    while len(results) + len(errors) < world_size:
        if not queue.empty():
            rank, status, value = queue.get()
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
        elif time.monotonic() > deadline or all(not p.is_alive() for p in procs) and queue.empty():
            break
        else:
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=5 if not errors else 0.5)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"ranks {missing} returned nothing (exit codes {codes}, timeout {timeout_s}s)")
    return [results[r] for r in range(world_size)]
