"""RequestDispatcher's per-queue order (the deque scheduling walks): kept through cancel/stop/start/delete/dedup."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from threaddispatch.requests import CancellationToken, RequestDispatcher
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Log:
    """A send that records the requests it got, in order; ``gate`` holds every send until set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: list[Any] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, request: Any, token: CancellationToken) -> Any:
        self.entered.set()
        self.gate.wait(10)
        with self.lock:
            self.sent.append(request)
        return request

    def got(self) -> list[Any]:
        with self.lock:
            return list(self.sent)


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def rd(log: Log) -> Iterator[RequestDispatcher[Any, Any]]:
    dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(log, max_workers=4)
    yield dispatcher
    log.gate.set()
    dispatcher.close(10)


def test_deep_queued_queue_sends_in_order(rd: RequestDispatcher[Any, Any], log: Log) -> None:
    """20,000 queued requests on one key are sent one at a time, in the order they were added."""
    rd.pause("k")
    handles = [rd.add(i, queue_key="k", mode="queued") for i in range(20_000)]
    rd.start("k")
    assert handles[-1].future.result(30) == 19_999
    assert log.got() == list(range(20_000))
    assert rd.get_queue_keys() == []


def test_deleted_and_stopped_waiting_requests_keep_the_rest_in_order(rd: RequestDispatcher[Any, Any], log: Log) -> None:
    """Deleting, cancelling and stopping waiting queued requests skips them; the others keep their order."""
    rd.pause("k")
    handles = [rd.add(i, queue_key="k", mode="queued") for i in range(100)]
    for i in range(0, 100, 3):
        assert rd.delete("k", handles[i].request_id)
    for i in range(1, 100, 10):
        handles[i].future.cancel()
    stopped = [i for i in range(2, 100, 7) if i % 3 and (i - 1) % 10]
    for i in stopped:
        assert rd.stop_request("k", handles[i].request_id)
    rd.start("k")
    kept = [i for i in range(100) if i % 3 and (i - 1) % 10 and i not in stopped]
    assert handles[kept[-1]].future.result(10) == kept[-1]
    assert log.got() == kept
    assert all(handles[i].future.cancelled() for i in range(0, 100, 3))
    for i in stopped:
        assert rd.start_request("k", handles[i].request_id)
    assert handles[stopped[-1]].future.result(10) == stopped[-1]
    assert log.got() == kept + stopped  # restarted: sent in their original relative order


def test_restarted_request_runs_in_its_original_place(rd: RequestDispatcher[Any, Any], log: Log) -> None:
    """A stopped queued request started again before its turn runs in its original place, not at the end."""
    rd.pause("k")
    handles = [rd.add(i, queue_key="k", mode="queued") for i in range(5)]
    rd.stop_request("k", handles[1].request_id)
    rd.start_request("k", handles[1].request_id)
    rd.start("k")
    assert handles[4].future.result(10) == 4
    assert log.got() == [0, 1, 2, 3, 4]


def test_stop_and_start_of_a_deep_queue_resumes_where_it_was(rd: RequestDispatcher[Any, Any], log: Log) -> None:
    """Stopping a queue mid-drain cancels the running attempt; start resends it, then the rest, in order."""
    log.gate.clear()
    handles = [rd.add(i, queue_key="k", mode="queued") for i in range(500)]
    assert log.entered.wait(10)
    rd.stop("k")
    assert rd.running_requests("k") == [] and handles[0].future.running() is False
    log.gate.set()
    wait_for(lambda: log.got() == [0], timeout=10)  # the cancelled attempt returned; nothing else ran
    rd.start("k")
    assert handles[-1].future.result(30) == 499
    assert log.got() == [0, *range(500)]  # the stopped request is sent again, first


def test_deduplicated_callers_join_a_waiting_queued_request(rd: RequestDispatcher[Any, Any], log: Log) -> None:
    """Joining a waiting queued request adds nothing to the queue; it is sent once, in its place."""
    rd.pause("k")
    first = [rd.add(f"r{i}", queue_key="k", mode="queued", deduplicate=True) for i in range(50)]
    again = [rd.add(f"r{i}", queue_key="k", mode="queued", deduplicate=True) for i in range(50)]
    assert all(h.deduplicated and h.future is f.future for h, f in zip(again, first))
    assert len(rd.get_queue("k").requests) == 50
    rd.start("k")
    assert again[-1].future.result(10) == "r49"
    assert log.got() == [f"r{i}" for i in range(50)]


def test_cleared_queue_takes_new_requests_in_order(rd: RequestDispatcher[Any, Any], log: Log) -> None:
    """After clear_queue, new requests on the same key run in their own order (no stale entries in the way)."""
    rd.pause("k")
    for i in range(1000):
        rd.add(i, queue_key="k", mode="queued")
    assert rd.clear_queue("k") == 1000
    handles = [rd.add(f"n{i}", queue_key="k", mode="queued") for i in range(10)]
    rd.start("k")
    assert handles[-1].future.result(10) == "n9"
    assert log.got() == [f"n{i}" for i in range(10)]


def test_concurrent_requests_behind_a_queued_one_wait_for_it(rd: RequestDispatcher[Any, Any], log: Log) -> None:
    """Mixed modes: concurrent requests queued behind a queued one start after it, in order; those ahead at once."""
    log.gate.clear()
    ahead = rd.add("ahead", queue_key="k")
    barrier = rd.add("barrier", queue_key="k", mode="queued")
    behind = [rd.add(f"behind{i}", queue_key="k") for i in range(3)]
    wait_for(lambda: len(rd.running_requests("k")) == 1, timeout=10)
    assert [r.request for r in rd.running_requests("k")] == ["ahead"]
    log.gate.set()
    assert ahead.future.result(10) == "ahead" and barrier.future.result(10) == "barrier"
    assert [h.future.result(10) for h in behind] == ["behind0", "behind1", "behind2"]
    assert log.got()[:2] == ["ahead", "barrier"]


def test_many_completions_behind_a_long_running_request_leave_no_backlog(
    rd: RequestDispatcher[Any, Any], log: Log
) -> None:
    """While the oldest request of a queue runs, thousands of others complete; the queue forgets them all."""
    hold = threading.Event()

    def send(request: Any, token: CancellationToken) -> Any:
        if request == "slow":
            hold.wait(20)
        return request

    dispatcher: RequestDispatcher[Any, Any] = RequestDispatcher(send, max_workers=2)
    try:
        slow = dispatcher.add("slow", queue_key="k")
        for i in range(5000):
            dispatcher.add(i, queue_key="k").future.result(10)
        assert [r.request for r in dispatcher.get_queue("k").requests] == ["slow"]
        order = dispatcher._core.queues["k"].order
        assert len(order) < 100  # compacted as it went
        hold.set()
        assert slow.future.result(10) == "slow"
    finally:
        hold.set()
        dispatcher.close(10)
