"""Items of an iterator made ahead on a background thread, at most `depth` of them waiting.

The thread is the only one that advances the iterator, so what it makes is exactly what the calling thread
would have made, in the same order; an exception it meets is raised to the consumer when the consumer reaches
it. File reads, tokenizers and numpy release the GIL, so a step's wall time becomes about max(data, train).
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Ahead(Generic[T]):
    """`next(ahead)` is `next(items)`, made by a daemon thread up to `depth` items early."""

    def __init__(self, items: Iterator[T], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(max(depth, 1))
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(items,), name="rntp-data-ahead", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                self._queue.put((item, None))  # blocks while the queue is full (no polling: idle costs nothing)
                if self._stop.is_set():
                    return
            self._queue.put((None, StopIteration()))
        except BaseException as e:  # handed to the consumer, raised where it would have been raised
            self._queue.put((None, e))

    def __next__(self) -> T:
        if self._error is not None:
            raise self._error
        item, error = self._queue.get()
        if error is not None:
            self._error = error
            raise error
        return item

    def close(self) -> None:
        """Stop the thread (what it made ahead is dropped): it ends at its next put, which draining frees."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
