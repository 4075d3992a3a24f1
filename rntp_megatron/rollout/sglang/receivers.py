"""The servers one weight push goes to (the leading engine and its peers), called at once: each call in a thread of
its own, and the /begin_weight_update ... /end_weight_update session around a push."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from rntp_megatron.rollout.sglang.client import HTTPClient, check_reply


class Receiver(Protocol):
    """What a weight channel needs of a server it pushes to (SGLangEngine is one)."""

    client: HTTPClient
    delta_base: Optional[object]  # delta_sync: the token of the last push this server got whole

    def server_ranks(self) -> dict[str, int]:
        """The server's tp, pp and dp sizes."""


@contextlib.contextmanager
def in_threads(calls: Sequence[Callable[[], Any]]) -> Iterator[list[Any]]:
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


@contextlib.contextmanager
def all_calling(receivers: Sequence[Receiver], path: str, *payloads: dict[str, Any]) -> Iterator[None]:
    """POST path to every receiver at once, each in a thread (payloads[i] to receiver i, or the one payload to
    all), while the block runs (e.g. the broadcast they receive); after it, SGLangServerError if one failed."""
    payloads = payloads if len(payloads) == len(receivers) else payloads * len(receivers)
    with in_threads([functools.partial(r.client.call, path, p) for r, p in zip(receivers, payloads)]) as replies:
        yield
    for reply in replies:
        check_reply({"success": False, "message": repr(reply)} if isinstance(reply, Exception) else reply, path)


@contextlib.contextmanager
def updating(receivers: Sequence[Receiver]) -> Iterator[None]:
    """/begin_weight_update on every receiver at once ... /end_weight_update on every one opened, at once; each
    session opened is closed, also when another receiver or the block fails (a dead one is the caller's to
    drop). The first failure is raised, unless the block's own exception is on its way."""
    with in_threads([functools.partial(r.client.call, "/begin_weight_update", {}) for r in receivers]) as begun:
        pass
    opened = [r for r, reply in zip(receivers, begun) if not isinstance(reply, Exception)]
    failure = next((reply for reply in begun if isinstance(reply, Exception)), None)
    try:
        if failure is None:
            yield
    finally:
        with in_threads([functools.partial(r.client.call, "/end_weight_update", {}) for r in opened]) as ended:
            pass
        failure = failure or next((reply for reply in ended if isinstance(reply, Exception)), None)
    if failure is not None:
        raise failure
