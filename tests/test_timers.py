"""The shared delay queue: ordering, cancel by handle, an injected clock, waiting under the owner's lock."""

from __future__ import annotations

import math
import threading

import pytest

from threaddispatch._timers import DelayQueue, TimerHandle
from threaddispatch.errors import ConfigurationError

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock | None = None) -> tuple[DelayQueue[str], FakeClock]:
    clock = clock or FakeClock()
    return DelayQueue(clock=clock), clock


def test_items_come_due_in_time_order() -> None:
    """pop_due returns what is due by now, earliest first; later entries stay."""
    q, clock = make()
    with q.condition:
        q.push("c", 3.0)
        q.push("a", 1.0)
        q.push("b", 2.0)
        assert q.pop_due() == []
        assert q.next_due() == 101.0
        clock.now = 102.0
        assert q.pop_due() == ["a", "b"]
        assert len(q) == 1
        assert q.next_due() == 103.0
        assert q.pop_due(now=1000.0) == ["c"]
        assert q.next_due() is None
        assert not q


def test_equal_due_times_keep_push_order() -> None:
    """Entries due at the same time come out in the order they were pushed (FIFO)."""
    q, clock = make()
    with q.condition:
        for name in "abcdefgh":
            q.push(name, 1.0)
        clock.now += 1.0
        assert q.pop_due() == list("abcdefgh")


def test_an_entry_in_the_past_is_due_at_once() -> None:
    """push_at with a time already past is due now; delay 0 is due now too."""
    q, clock = make()
    with q.condition:
        q.push_at("past", clock.now - 5)
        q.push("now", 0)
        assert q.timeout() == 0.0
        assert q.pop_due() == ["past", "now"]


def test_cancel_by_handle() -> None:
    """A cancelled entry never comes due; cancelling twice, or after the pop, returns False."""
    q, clock = make()
    with q.condition:
        first = q.push("first", 1.0)
        second = q.push("second", 2.0)
        assert isinstance(first, TimerHandle) and first.active
        assert q.cancel(first) is True
        assert q.cancel(first) is False
        assert not first.active
        assert len(q) == 1
        assert q.next_due() == 102.0  # the cancelled head is skipped
        clock.now = 200.0
        assert q.pop_due() == ["second"]
        assert q.cancel(second) is False


def test_cancel_refuses_a_handle_of_another_queue() -> None:
    """A handle belongs to the queue that made it: another queue refuses it, naming it."""
    q, _ = make()
    other, _ = make()
    with q.condition, other.condition:
        handle = other.push("x", 1.0)
        with pytest.raises(ConfigurationError, match="TimerHandle of this queue"):
            q.cancel(handle)
        with pytest.raises(ConfigurationError, match="'nope'"):
            q.cancel("nope")  # type: ignore[arg-type]
        assert len(other) == 1


def test_many_cancellations_compact_the_heap() -> None:
    """Cancelled entries do not pile up: past half cancelled, the heap is rebuilt without them."""
    clock = FakeClock()
    q: DelayQueue[int] = DelayQueue(clock=clock)
    with q.condition:
        handles = [q.push(i, 10.0 + i) for i in range(1000)]
        for handle in handles[1:]:
            q.cancel(handle)
        assert len(q) == 1
        assert len(q._heap) < 100
        clock.now += 10_000
        assert q.pop_due() == [0]


def test_pop_next_takes_one_due_entry_per_turn() -> None:
    """pop_next returns the earliest due handle (None items included) or None; now=inf drains regardless."""
    q: DelayQueue[str | None]
    clock = FakeClock()
    q = DelayQueue(clock=clock)
    with q.condition:
        assert q.pop_next() is None
        skipped = q.push("skipped", 0.5)
        q.push(None, 1.0)
        q.push("later", 9.0)
        q.cancel(skipped)
        assert q.pop_next() is None  # nothing due yet
        clock.now += 1.0
        first = q.pop_next()
        assert first is not None and first.item is None and not first.active
        assert q.pop_next() is None
        last = q.pop_next(now=math.inf)
        assert last is not None and last.item == "later"
        assert not q and q.pop_next(now=math.inf) is None


def test_pop_all_returns_everything_in_due_order() -> None:
    """pop_all (close and drain) takes due and not-due entries alike, earliest first, cancelled ones excluded."""
    q, _ = make()
    with q.condition:
        q.push("late", 50.0)
        gone = q.push("gone", 1.0)
        q.push("soon", 2.0)
        q.cancel(gone)
        assert q.pop_all() == ["soon", "late"]
        assert len(q) == 0 and q.next_due() is None
        q.push("again", 1.0)
        q.clear()
        assert not q


def test_timeout_is_measured_from_now() -> None:
    """timeout() is the seconds until the earliest entry, never negative; None when empty."""
    q, clock = make()
    with q.condition:
        assert q.timeout() is None
        q.push("x", 5.0)
        assert q.timeout() == 5.0
        assert q.timeout(now=clock.now + 2) == 3.0
        clock.now += 10
        assert q.timeout() == 0.0


def test_bad_values_are_refused_naming_them() -> None:
    """A negative, infinite or non-numeric delay or due time raises ConfigurationError with the value."""
    q, _ = make()
    with q.condition:
        for bad in (-1, math.inf, math.nan, "1", True):
            with pytest.raises(ConfigurationError, match="delay"):
                q.push("x", bad)  # type: ignore[arg-type]
        for bad_due in (math.inf, math.nan, None, False):
            with pytest.raises(ConfigurationError, match="due"):
                q.push_at("x", bad_due)  # type: ignore[arg-type]
        assert not q
    with pytest.raises(ConfigurationError, match="condition"):
        DelayQueue(condition=threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="clock"):
        DelayQueue(clock=3.0)  # type: ignore[arg-type]


def test_shares_the_owners_condition_and_notifies_on_a_new_head() -> None:
    """Built on the owner's Condition, a push that becomes the earliest entry wakes the owner's waiting loop."""
    lock = threading.Lock()
    owner_wakeup = threading.Condition(lock)
    q: DelayQueue[str] = DelayQueue(owner_wakeup)
    assert q.condition is owner_wakeup
    woken = threading.Event()
    waiting = threading.Event()

    def owner_loop() -> None:
        with lock:
            q.push("far", 3600.0)
            waiting.set()
            # Waits "until next_due()": an hour, unless a nearer entry notifies.
            timeout = q.timeout()
            assert timeout is not None
            owner_wakeup.wait(timeout)
            woken.set()

    thread = threading.Thread(target=owner_loop, name="test-owner")
    thread.start()
    assert waiting.wait(5)
    with lock:  # the owner is inside wait() once it released the lock
        q.push("near", 0.0)
    assert woken.wait(10)
    thread.join(10)
    with lock:
        assert q.pop_due() == ["near"]


def test_wait_due_returns_what_another_thread_made_due() -> None:
    """wait_due on one thread wakes for an entry pushed, due now, from another thread."""
    q: DelayQueue[str] = DelayQueue()
    got: list[list[str]] = []
    entered = threading.Event()

    def consumer() -> None:
        with q.condition:
            entered.set()
            while True:
                items = q.wait_due(30)
                if items:
                    got.append(items)
                    return

    thread = threading.Thread(target=consumer, name="test-consumer")
    thread.start()
    assert entered.wait(5)
    with q.condition:
        q.push("hello", 0)
    thread.join(30)
    assert got == [["hello"]]


def test_wait_due_returns_at_its_timeout_with_nothing_due() -> None:
    """With only a far entry, wait_due(0) does not block and returns []."""
    q: DelayQueue[str] = DelayQueue()
    with q.condition:
        q.push("far", 3600.0)
        assert q.wait_due(0) == []
        assert len(q) == 1
        with pytest.raises(ConfigurationError, match="timeout"):
            q.wait_due(-1)
