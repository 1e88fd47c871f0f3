"""Work in threads beside the caller: `prefetched` runs a CPU-bound function (image decoding, resizing) a few
items ahead of the consumer; `in_background` runs one call in a thread of its own.

Pillow and numpy release the GIL while they decode and resample, so a few threads keep a GPU
(VAE, tagger) fed instead of waiting on one CPU core. Results come back in order; `ahead` bounds
how many are held in memory at once.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(fn: Callable[[T], R], items: Sequence[T], *, ahead: int, workers: int = 4,
               name: str = "prefetch") -> Iterator[Future[R]]:
    """Futures of `fn(item)` for `items`, in order; `.result()` returns the value or raises what
    `fn` raised. At most `ahead` calls run or wait ahead of the consumer."""
    workers = max(1, min(workers, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        pending: deque[Future[R]] = deque(pool.submit(fn, item) for item in items[:max(1, ahead)])
        queued = len(pending)
        while pending:
            future = pending.popleft()
            if queued < len(items):
                pending.append(pool.submit(fn, items[queued]))
                queued += 1
            yield future


def in_background(fn: Callable[..., R], *args: Any, name: str) -> Future[R]:
    """`fn(*args)` started now in a thread named `name`; the future's `.result()` waits for it (or raises what it
    raised). The thread ends with the call: nothing to shut down."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)
