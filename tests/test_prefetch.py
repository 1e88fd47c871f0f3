"""prefetched: order, the bound on work ahead, errors, and an early stop."""

from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest

from lora_trainer.prefetch import prefetched


def test_results_in_order_with_bounded_work_ahead():
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # finish out of order
        return i * i

    seen = []
    for n, future in enumerate(prefetched(work, list(range(20)), ahead=3, workers=4)):
        seen.append(future.result())
        with lock:
            assert len(started) <= n + 1 + 3  # never more than `ahead` beyond what was consumed
    assert seen == [i * i for i in range(20)]


def test_an_error_comes_back_with_its_item_and_the_rest_go_on():
    def work(i: int) -> int:
        if i == 2:
            raise ValueError("bad image 2")
        return i

    results = []
    for future in prefetched(work, [0, 1, 2, 3], ahead=2):
        try:
            results.append(future.result())
        except ValueError as e:
            results.append(str(e))
    assert results == [0, 1, "bad image 2", 3]


def test_closing_early_stops_submitting():
    calls: list[int] = []
    with closing(prefetched(calls.append, list(range(100)), ahead=2, workers=1)) as futures:
        next(futures).result()
    assert len(calls) <= 4
    assert list(prefetched(calls.append, [], ahead=2)) == []


def test_no_items_or_zero_ahead():
    assert [f.result() for f in prefetched(lambda i: i + 1, [5, 6], ahead=0)] == [6, 7]


@pytest.mark.parametrize("workers", [1, 64])
def test_any_worker_count(workers):
    assert [f.result() for f in prefetched(str, [1, 2, 3], ahead=2, workers=workers)] == ["1", "2", "3"]
