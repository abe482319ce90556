"""A send thread sends its target's next full batches itself (BatchEngine.take_now), in the same send slot."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from threaddispatch.batched import BatchedDispatcher
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


class Gated:
    """send_batch that records its batches; the first call waits for ``gate``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[list[Any]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, target: str, messages: list[Any]) -> list[Any]:
        self.entered.set()
        self.gate.wait(20)
        with self.lock:
            self.batches.append(list(messages))
        return [f"id-{m}" for m in messages]


def _counting_pool_submits(bd: BatchedDispatcher[Any]) -> list[int]:
    submits: list[int] = []
    pool = bd._state.pool
    original = pool.submit

    def submit(fn: Any, *args: Any) -> Any:
        submits.append(1)
        return original(fn, *args)

    pool.submit = submit  # type: ignore[method-assign]
    return submits


def test_full_batches_queued_behind_a_send_go_on_its_thread() -> None:
    send = Gated()
    bd: BatchedDispatcher[int] = BatchedDispatcher(send, max_batch_size=2, flush_interval=60, max_concurrent_sends=2)
    submits = _counting_pool_submits(bd)
    try:
        futures = [bd.submit(i, "t") for i in range(4)]  # two batches, both slots taken
        wait_for(lambda: bd.stats()["sending"] == 2, timeout=10)
        futures += [bd.submit(i, "t") for i in range(4, 40)]  # 18 full batches wait for a slot
        send.gate.set()
        assert [f.result(10) for f in futures] == [f"id-{i}" for i in range(40)]
        assert sorted(send.batches) == [[i, i + 1] for i in range(0, 40, 2)]
        assert bd.flush(10)
        stats = bd.stats()
        assert (stats["batches"], stats["calls"], stats["sent"], stats["sending"]) == (20, 20, 40, 0)
        # Most went on the threads already sending, not through a pool hand-off each.
        assert len(submits) < 10
    finally:
        send.gate.set()
        bd.close(10)


def test_one_send_slot_keeps_a_targets_batches_in_order() -> None:
    send = Gated()
    bd: BatchedDispatcher[int] = BatchedDispatcher(send, max_batch_size=2, flush_interval=60, max_concurrent_sends=1)
    try:
        futures = [bd.submit(i, "t") for i in range(2)]
        assert send.entered.wait(10)
        futures += [bd.submit(i, "t") for i in range(2, 8)]  # three full batches wait for the slot
        send.gate.set()
        assert [f.result(10) for f in futures] == [f"id-{i}" for i in range(8)]
        assert send.batches == [[0, 1], [2, 3], [4, 5], [6, 7]]
    finally:
        send.gate.set()
        bd.close(10)


def test_a_partial_batch_is_not_chained_it_waits_for_its_window() -> None:
    send = Gated()
    bd: BatchedDispatcher[int] = BatchedDispatcher(send, max_batch_size=2, flush_interval=60, max_concurrent_sends=2)
    try:
        first = [bd.submit(i, "t") for i in range(4)]  # two batches, both slots taken
        wait_for(lambda: bd.stats()["sending"] == 2, timeout=10)
        rest = [bd.submit(i, "t") for i in range(4, 7)]  # one full batch and one message
        send.gate.set()
        assert [f.result(10) for f in first + rest[:2]] == [f"id-{i}" for i in range(6)]
        wait_for(lambda: bd.stats()["sending"] == 0, timeout=10)
        assert bd.stats()["pending"] == 1 and not rest[2].done()
        assert bd.flush(10)
        assert rest[2].result(10) == "id-6"
    finally:
        send.gate.set()
        bd.close(10)


def test_close_drains_what_a_chaining_send_leaves() -> None:
    send = Gated()
    bd: BatchedDispatcher[int] = BatchedDispatcher(send, max_batch_size=3, flush_interval=60, max_concurrent_sends=2)
    futures = [bd.submit(i, f"t{i % 2}") for i in range(40)]
    send.gate.set()
    assert bd.close(10)
    assert sorted(str(f.result(0)) for f in futures) == sorted(f"id-{i}" for i in range(40))
    assert bd.stats()["calls"] == bd.stats()["batches"]
