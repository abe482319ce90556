"""RequestDispatcher: a plain ``add`` never waits for the core's lock.

A request whose queueing decides nothing its caller sees (no dedupe, no storage, not
cancelable, no ``queue_change`` listener) is appended to ``core.intake``; whoever takes
the lock next queues it first (``CarryingLock.acquire``), and the release carries out
what that decided. These tests hold the lock themselves to make every interleaving
happen on purpose.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

import pytest

from threaddispatch._request_core import _CARRY_ROUNDS
from threaddispatch._request_records import PendingRequest
from threaddispatch.errors import DispatcherClosedError
from threaddispatch.requests import CancellationToken, RequestDispatcher, RequestEvent
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def _echo(request: str, token: CancellationToken) -> str:
    return request.upper()


def test_an_add_while_the_lock_is_held_returns_and_the_release_queues_and_starts_it() -> None:
    rd: RequestDispatcher[str, str] = RequestDispatcher(_echo, name="intake-held")
    core = rd._core
    try:
        with core.lock:  # this thread holds it: an add that waited for it would never return
            handle = rd.add("a", queue_key="k")
            assert list(core.intake) != [] and not handle.future.done()
            assert core.pending == 0  # not queued yet: the holder queues it as it takes or leaves the lock
        assert handle.future.result(10) == "A"
        assert len(core.intake) == 0 and core.lock.outbox is None
        assert rd.stats()["delivered"] == 1
    finally:
        assert rd.close(10) is True


def test_a_request_in_intake_is_visible_to_every_call_that_takes_the_lock() -> None:
    """Whoever takes the lock queues what waits first: another thread's get_request, stats and
    cancel find a request whose add returned while the lock was held."""
    gate = threading.Event()

    def send(request: str, token: CancellationToken) -> str:
        assert gate.wait(10)
        return request

    rd: RequestDispatcher[str, str] = RequestDispatcher(send, name="intake-visible")
    core = rd._core
    try:
        with core.lock:
            queued = rd.add("q", queue_key="k", mode="queued")
            behind = rd.add("r", queue_key="k", mode="queued")
        seen = rd.get_request("k", behind.request_id)
        assert seen is not None and seen.request == "r"
        assert rd.stats()["pending"] == 2
        assert behind.cancel() is True
        assert behind.future.cancelled()
        gate.set()
        assert queued.future.result(10) == "q"
    finally:
        gate.set()
        assert rd.close(10) is True


def test_one_producers_requests_keep_their_order_through_intake_and_the_lock() -> None:
    """Queued mode runs one request at a time in add order: the ones added while the lock was held
    (through intake) and the dedupe ones added after them (through the lock) keep that order."""
    order: list[str] = []

    def send(request: str, token: CancellationToken) -> str:
        order.append(request)
        return request

    rd: RequestDispatcher[str, str] = RequestDispatcher(send, name="intake-order")
    core = rd._core
    try:
        with core.lock:
            first = [rd.add(f"i{n}", queue_key="k", mode="queued") for n in range(20)]
        # Deduplicated adds take the lock: it queues what intake holds before them.
        with core.lock:
            more = [rd.add(f"j{n}", queue_key="k", mode="queued") for n in range(5)]
        after = [rd.add(f"d{n}", queue_key="k", mode="queued", deduplicate=True) for n in range(5)]
        for handle in [*first, *more, *after]:
            handle.future.result(10)
        assert order == [f"i{n}" for n in range(20)] + [f"j{n}" for n in range(5)] + [f"d{n}" for n in range(5)]
    finally:
        assert rd.close(10) is True


def test_a_condition_wait_on_the_lock_takes_in_what_was_added_meanwhile() -> None:
    """A wait re-acquires through ``CarryingLock.acquire``: the holder sees requests added during it."""
    rd: RequestDispatcher[str, str] = RequestDispatcher(_echo, name="intake-wait")
    core = rd._core
    added: list[Future[str]] = []
    try:
        with core.lock:
            adder = threading.Thread(target=lambda: added.append(rd.add("w", queue_key="k").future), name="adder")
            adder.start()
            adder.join(10)  # the add returned without the lock (this thread holds it)
            assert not adder.is_alive() and len(added) == 1
            # The wait releases (the adder's request is queued and started by that release) and
            # re-acquires; either way it is queued when the wait returns.
            core.done_changed.wait(0.001)
            assert len(core.intake) == 0 and core.added == 1
        assert added[0].result(10) == "W"
    finally:
        assert rd.close(10) is True


def test_a_request_in_intake_when_close_begins_is_drained_and_an_add_after_it_raises() -> None:
    rd: RequestDispatcher[str, str] = RequestDispatcher(_echo, name="intake-close")
    core = rd._core
    with core.lock:
        handle = rd.add("before", queue_key="k")  # in intake when the close asks for the lock
        closer = threading.Thread(target=rd.close, args=(10,), name="closer")
        closer.start()
    closer.join(10)
    assert not closer.is_alive() and core.done
    # The close's first acquisition (or this thread's release) queued it before intake stopped: drained.
    assert handle.future.result(0) == "BEFORE"
    with pytest.raises(DispatcherClosedError):
        rd.add("late", queue_key="k")


def test_a_request_left_in_intake_after_the_close_ended_is_refused_and_its_add_raises() -> None:
    """The one silent case to rule out: an add that saw the dispatcher open, and appended its request
    after the close had ended. Nobody will queue it: its Future is cancelled and its add raises."""
    rd: RequestDispatcher[str, str] = RequestDispatcher(_echo, name="intake-refused")
    core = rd._core

    class CloseFirst(deque[PendingRequest]):
        """An intake whose first append runs the whole close first (the add checked before it)."""

        def append(self, req: PendingRequest) -> None:
            if not core.closing:
                assert rd.close(10) is True and core.done
            super().append(req)
            refused.append(req)

    refused: list[PendingRequest] = []
    core.intake = core.lock.intake = CloseFirst()
    with pytest.raises(DispatcherClosedError):
        rd.add("late", queue_key="k")
    assert len(refused) == 1 and refused[0].future.cancelled()
    assert len(core.intake) == 0 and core.added == 0 and not core.lock.pending()


@pytest.mark.timeout(120)
def test_a_producer_hands_what_keeps_coming_to_a_pool_thread_after_a_few_rounds() -> None:
    """The producer that finds the lock free carries at most ``_CARRY_ROUNDS`` rounds: while other
    producers keep adding, what is left goes to a pool task and its add returns."""
    rd: RequestDispatcher[str, str] = RequestDispatcher(_echo, max_workers=2, name="intake-hand")
    core = rd._core
    carried: list[str] = []
    real_carry_task = core._carry_task

    def carry_task() -> None:
        carried.append(threading.current_thread().name)
        real_carry_task()

    core._carry_task = carry_task  # type: ignore[method-assign]
    real_absorb = core._absorb
    rounds = 0

    def absorb() -> None:
        # Each time the producer under test takes the lock, another request arrives meanwhile.
        nonlocal rounds
        real_absorb()
        if threading.current_thread().name == "producer" and rounds < 50:
            rounds += 1
            core.intake.append(_plain(rd, f"extra{rounds}"))

    core.lock.absorb = core._absorb = absorb  # type: ignore[method-assign]
    handles: list[Future[str]] = []
    try:
        producer = threading.Thread(target=lambda: handles.append(rd.add("p", queue_key="k").future), name="producer")
        producer.start()
        producer.join(30)
        assert not producer.is_alive() and rounds == _CARRY_ROUNDS
        assert handles[0].result(10) == "P"
        wait_for(lambda: core.added == 1 + rounds and not core.lock.pending(), timeout=10, message="the rest carried")
        assert carried and all(name.startswith("threaddispatch-intake-hand") for name in carried)
    finally:
        core.lock.absorb = core._absorb = real_absorb  # type: ignore[method-assign]
        assert rd.close(10) is True


def _plain(rd: RequestDispatcher[str, str], request: str) -> PendingRequest:
    core = rd._core
    req = PendingRequest(f"{core.id_prefix}-{next(core.ids)}", "k", request, "concurrent", None, None, 0, 0.0, True)
    future = req.future
    future._queue_key, future._request_id, future._owner = req.queue_key, req.request_id, core
    return req


@pytest.mark.timeout(120)
def test_producers_racing_each_other_and_close_lose_nothing_silently() -> None:
    """4 producers add without pause while close runs: every add either raised DispatcherClosedError
    or returned a handle whose Future settles (a response, or cancelled by the close); none hangs."""
    events: list[RequestEvent] = []
    rd: RequestDispatcher[str, str] = RequestDispatcher(_echo, max_workers=4, name="intake-race")
    rd.on("response", events.append)
    futures: list[list[Future[str]]] = [[] for _ in range(4)]
    refused = [0] * 4
    go = threading.Barrier(5)

    def produce(index: int) -> None:
        go.wait(10)
        for n in range(100_000):
            try:
                futures[index].append(rd.add(f"p{index}-{n}", queue_key=f"k{index % 2}").future)
            except DispatcherClosedError:
                refused[index] += 1
                return

    producers = [threading.Thread(target=produce, args=(i,), name=f"producer-{i}") for i in range(4)]
    for thread in producers:
        thread.start()
    go.wait(10)
    wait_for(lambda: sum(map(len, futures)) >= 2_000, timeout=30, message="producers to add")
    rd.close(60)
    for thread in producers:
        thread.join(30)
        assert not thread.is_alive()
    assert refused == [1, 1, 1, 1] or sum(map(len, futures)) == 400_000
    delivered = 0
    for batch in futures:
        for future in batch:
            assert future.done()
            if not future.cancelled():
                assert future.result(0).startswith("P")
                delivered += 1
    assert delivered == len(events) == rd.stats()["delivered"]
    assert len(rd._core.intake) == 0
