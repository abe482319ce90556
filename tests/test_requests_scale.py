"""RequestDispatcher at depth: a start (or any scheduling pass) hands the pool a bounded window, not the whole queue.

Before, ``start()`` on a paused queue of N concurrent requests marked all N running and
handed all N to the worker pool on the caller's thread, under and after the lock
(35 s at 1M). Now at most a window of attempts is in flight at once (a few per
worker); ended attempts make room, refilled half a window at a time, and the queues
the full window held back share the room in the order they were refused, so one deep
queue cannot starve another.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_requests_order import Log

from threaddispatch._request_core import _WINDOW_PER_WORKER
from threaddispatch.requests import CancellationToken, RequestDispatcher
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

WORKERS = 2
WINDOW = _WINDOW_PER_WORKER * WORKERS


class Gate(Log):
    """The order tests' send, closed until ``gate`` is set, that also records the order sends began in."""

    def __init__(self) -> None:
        super().__init__()
        self.gate.clear()
        self.started: list[Any] = []

    def __call__(self, request: Any, token: CancellationToken) -> Any:
        with self.lock:
            self.started.append(request)
        return super().__call__(request, token)


@pytest.fixture
def send() -> Gate:
    return Gate()


@pytest.fixture
def rd(send: Gate) -> Iterator[RequestDispatcher[Any, Any]]:
    dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=WORKERS)
    yield dispatcher
    send.gate.set()
    dispatcher.close(20)


def _states(rd: RequestDispatcher[Any, Any], key: str) -> list[str]:
    return [r.state for r in rd.get_queue(key).requests]


def test_start_of_a_deep_paused_queue_launches_only_the_window(rd: RequestDispatcher[Any, Any], send: Gate) -> None:
    rd.pause("k")
    handles = [rd.add(i, queue_key="k") for i in range(200)]
    rd.start("k")
    assert _states(rd, "k") == ["running"] * WINDOW + ["waiting"] * (200 - WINDOW)
    assert len(rd.running_requests("k")) == WINDOW
    send.gate.set()
    assert [handle.future.result(20) for handle in handles] == list(range(200))
    assert sorted(send.got()) == list(range(200))


def test_adds_past_the_window_wait_and_start_in_order(rd: RequestDispatcher[Any, Any], send: Gate) -> None:
    handles = [rd.add(i, queue_key="k") for i in range(50)]
    assert _states(rd, "k") == ["running"] * WINDOW + ["waiting"] * (50 - WINDOW)
    send.gate.set()
    assert [handle.future.result(20) for handle in handles] == list(range(50))
    # At most a window in flight: request i is launched only once i - WINDOW earlier ones ended, so at
    # least that many sends began before its own. (How close to i it lands beyond that is the OS
    # scheduler's: a worker preempted on its way into send lets the other run ahead.)
    assert sorted(send.started) == list(range(50))
    assert all(send.started.index(i) >= i - WINDOW for i in range(50))


def test_a_queue_held_back_by_the_window_is_not_starved_by_a_deep_one(
    rd: RequestDispatcher[Any, Any], send: Gate
) -> None:
    deep = [rd.add(("deep", i), queue_key="deep") for i in range(100)]
    other = rd.add(("other", 0), queue_key="other")
    assert _states(rd, "other") == ["waiting"]
    send.gate.set()
    assert other.future.result(20) == ("other", 0)
    # "other" was refused once the window was full: it shares the first refill with the deep queue
    # (refused first), not a slot after the deep queue's 100 requests.
    assert send.started.index(("other", 0)) < WINDOW + WINDOW // 2 + WORKERS
    assert [handle.future.result(20) for handle in deep] == [("deep", i) for i in range(100)]


def test_queued_mode_behind_a_full_window_still_runs_one_at_a_time(rd: RequestDispatcher[Any, Any], send: Gate) -> None:
    busy = [rd.add(("busy", i), queue_key="busy") for i in range(10)]
    queued = [rd.add(("q", i), queue_key="q", mode="queued") for i in range(5)]
    assert _states(rd, "q") == ["waiting"] * 5
    send.gate.set()
    assert [h.future.result(20) for h in queued] == [("q", i) for i in range(5)]
    assert [h.future.result(20) for h in busy] == [("busy", i) for i in range(10)]
    got = [item for item in send.got() if item[0] == "q"]
    assert got == [("q", i) for i in range(5)]


def test_stop_and_delete_inside_the_window_free_its_slots(rd: RequestDispatcher[Any, Any], send: Gate) -> None:
    handles = [rd.add(i, queue_key="k") for i in range(20)]
    for handle in handles[WINDOW : 2 * WINDOW]:
        assert handle.cancel()
    waiting = handles[2 * WINDOW :]
    send.gate.set()
    assert [h.future.result(20) for h in waiting] == list(range(2 * WINDOW, 20))
    wait_for(lambda: rd.get_queue_keys() == [], timeout=20)
    assert all(h.future.cancelled() for h in handles[WINDOW : 2 * WINDOW])


def test_stats_running_never_exceeds_the_window_while_draining(send: Gate) -> None:
    seen: list[int] = []
    dispatcher: RequestDispatcher[Any, Any]

    def watch(request: Any, token: CancellationToken) -> Any:
        seen.append(len(dispatcher.running_requests()))
        return send(request, token)

    dispatcher = RequestDispatcher(watch, max_workers=WORKERS)
    try:
        dispatcher.pause("k")
        handles = [dispatcher.add(i, queue_key="k") for i in range(100)]
        dispatcher.start("k")
        send.gate.set()
        assert [h.future.result(20) for h in handles] == list(range(100))
    finally:
        send.gate.set()
        dispatcher.close(20)
    assert seen and max(seen) <= WINDOW
