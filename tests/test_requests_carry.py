"""RequestDispatcher: an attempt that ends while the core's lock is held is carried out by the holder.

A worker that finds the lock held leaves its ended attempt in ``core.finished`` and goes
back to work instead of queueing on the lock; the release of the lock (the end of a
``with`` block, or a Condition's wait) carries it out on the releasing thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch._request_types import Mode
from threaddispatch.requests import CancellationToken, RequestDispatcher, RequestEvent
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class _Gated:
    """A send that blocks until ``go`` is set; records the thread each Future is settled on."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.settled_on: list[str] = []

    def __call__(self, request: str, token: CancellationToken) -> str:
        self.started.set()
        assert self.go.wait(10)
        return request.upper()

    def watch(self, future: Future[str]) -> None:
        future.add_done_callback(lambda _f: self.settled_on.append(threading.current_thread().name))


def _gated(name: str) -> tuple[RequestDispatcher[str, str], _Gated]:
    gated = _Gated()
    rd: RequestDispatcher[str, str] = RequestDispatcher(gated, name=name)
    return rd, gated


def test_a_worker_finding_the_lock_held_leaves_its_attempt_and_the_release_carries_it_out() -> None:
    rd, gated = _gated("carry-with")
    responses: list[RequestEvent] = []
    rd.on("response", responses.append)
    core = rd._core
    try:
        handle = rd.add("a", queue_key="k")
        gated.watch(handle.future)
        assert gated.started.wait(10)
        with core.lock:
            gated.go.set()
            # The worker does not queue on the lock: it leaves the ended attempt and returns.
            wait_for(lambda: len(core.finished) == 1, timeout=10, message="the worker to leave its attempt")
            assert not handle.future.done() and responses == []
        # The release carried it out, on this thread, before the with block's end returned.
        assert handle.future.done() and handle.future.result(0) == "A"
        assert gated.settled_on == [threading.current_thread().name]
        assert [(event.event, event.response) for event in responses] == [("response", "A")]
        assert len(core.finished) == 0 and rd.stats()["delivered"] == 1
    finally:
        gated.go.set()
        assert rd.close(10) is True


def test_a_condition_wait_on_the_lock_carries_out_the_attempts_left_before_it() -> None:
    """A wait releases the lock through the same release: nothing left in ``finished`` waits out the wait."""
    rd, gated = _gated("carry-wait")
    core = rd._core
    try:
        handle = rd.add("b", queue_key="k")
        assert gated.started.wait(10)
        with core.lock:
            gated.go.set()
            wait_for(lambda: len(core.finished) == 1, timeout=10, message="the worker to leave its attempt")
            core.done_changed.wait(0.001)
            assert handle.future.done() and handle.future.result(0) == "B"
            assert len(core.finished) == 0
    finally:
        gated.go.set()
        assert rd.close(10) is True


def test_close_waiting_for_an_attempt_left_in_finished_ends_without_its_timeout() -> None:
    """The attempt a worker left while a caller held the lock is carried out by that caller's release,
    so a close waiting for it returns as soon as it has, not at its deadline."""
    rd, gated = _gated("carry-close")
    core = rd._core
    handle = rd.add("c", queue_key="k")
    assert gated.started.wait(10)
    closed = threading.Event()
    with core.lock:
        gated.go.set()
        wait_for(lambda: len(core.finished) == 1, timeout=10, message="the worker to leave its attempt")

        def close() -> None:
            rd.close(600)
            closed.set()

        closer = threading.Thread(target=close, name="closer")
        closer.start()
    assert closed.wait(30), "close waited for an attempt nobody carried out"
    closer.join(10)
    assert handle.future.result(0) == "C" and core.done


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["concurrent", "queued"])
def test_many_producers_and_workers_settle_every_request_once(mode: Mode) -> None:
    """4 producers, 8 workers, a send that fails every seventh request's first attempt (retried):
    every Future gets its own response, one response event each, nothing is left in ``finished``."""
    lock = threading.Lock()
    attempts: dict[str, int] = {}

    def send(request: str, token: CancellationToken) -> str:
        with lock:
            attempts[request] = attempts.get(request, 0) + 1
            first = attempts[request] == 1
        if first and int(request.rsplit("-", 1)[1]) % 7 == 0:
            raise ConnectionError(request)
        return request.upper()

    rd: RequestDispatcher[str, str] = RequestDispatcher(send, max_workers=8, name="carry-stress")
    responses: list[str] = []
    rd.on("response", lambda event: responses.append(str(event.request_id)))
    per = 1_500
    handles: list[list[tuple[str, Future[str]]]] = [[] for _ in range(4)]

    def produce(index: int) -> None:
        key = "k" if mode == "queued" else f"k{index}"
        for n in range(per):
            request = f"p{index}-{n}"
            handle = rd.add(request, queue_key=key, retry=1, retry_time=0.0, mode=mode)
            handles[index].append((request, handle.future))

    producers = [threading.Thread(target=produce, args=(i,), name=f"producer-{i}") for i in range(4)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(60)
        assert not thread.is_alive()
    for batch in handles:
        for request, future in batch:
            assert future.result(60) == request.upper()
    assert rd.close(60) is True
    assert len(rd._core.finished) == 0
    assert len(responses) == len(set(responses)) == 4 * per
    stats = rd.stats()
    assert stats["delivered"] == 4 * per and stats["retried"] == 4 * len(range(0, per, 7))


def test_attempts_carried_out_together_each_keep_their_response_in_the_cache() -> None:
    """Two attempts left while the lock is held are applied in one pass: both responses are cached."""
    started = threading.Semaphore(0)
    go = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        started.release()
        assert go.wait(10)
        return request.upper()

    rd: RequestDispatcher[str, str] = RequestDispatcher(send, max_workers=2, name="carry-cache")
    core = rd._core
    try:
        first = rd.add("x", queue_key="k", cache_key="x", cache_time=60)
        second = rd.add("y", queue_key="k", cache_key="y", cache_time=60)
        assert started.acquire(timeout=10) and started.acquire(timeout=10)
        with core.lock:
            go.set()
            wait_for(lambda: len(core.finished) == 2, timeout=10, message="both workers to leave their attempts")
        assert first.future.result(0) == "X" and second.future.result(0) == "Y"
        cached_x, cached_y = rd.get_cached("x"), rd.get_cached("y")
        assert cached_x is not None and cached_x.response == "X"
        assert cached_y is not None and cached_y.response == "Y"
    finally:
        go.set()
        assert rd.close(10) is True


def test_a_worker_whose_attempt_ended_runs_the_next_one_itself() -> None:
    """The attempt an ended one makes startable goes to that attempt's worker (``WorkerPool.run_next``):
    it runs there next, with no other thread woken or started for it (a ``queued`` chain of 30)."""
    threads: list[str] = []

    def send(request: int, token: CancellationToken) -> int:
        threads.append(threading.current_thread().name)
        return request

    rd: RequestDispatcher[int, int] = RequestDispatcher(send, max_workers=4, name="test-hand-on")
    pool = rd._core.pool
    handed_on: list[str] = []
    real_run_next = pool.run_next

    def run_next(fn: Any, /, *args: Any) -> None:
        handed_on.append(threading.current_thread().name)
        real_run_next(fn, *args)

    pool.run_next = run_next  # type: ignore[method-assign]
    try:
        rd.pause("k")
        handles = [rd.add(n, queue_key="k", mode="queued") for n in range(30)]
        rd.start("k")
        assert [handle.future.result(10) for handle in handles] == list(range(30))
        assert len(threads) == 30 and len(set(threads)) == 1, set(threads)
        assert handed_on == threads[:29]  # attempts 2..30, each handed on by the worker of the one before
    finally:
        assert rd.close(10)
