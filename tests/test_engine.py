"""The shared BatchEngine, through its internal API: keys, gates, scheduled entries, async settling."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any, cast

import pytest

from threaddispatch import ConfigurationError, DispatcherClosedError, QueueFullError
from threaddispatch._engine import BatchEngine, Overflow, lossless_margin
from threaddispatch._lanes import ClosedFifoLane, FifoLane, PriorityLane
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[Hashable, list[Any]]] = []

    def __call__(self, key: Hashable, items: list[Any]) -> None:
        with self.lock:
            self.batches.append((key, list(items)))


def test_batches_never_mix_keys_and_respect_the_size() -> None:
    """Entries put under different keys go in separate batches of at most max_batch_size."""
    rec = Recorder()
    engine: BatchEngine[int] = BatchEngine(rec, name="test-engine", window=0.01, max_batch_size=3)
    for i in range(10):
        engine.put(i, key=i % 2)
    assert engine.close(5)
    assert all(len(items) <= 3 for _k, items in rec.batches)
    for key in (0, 1):
        sent = [x for k, items in rec.batches if k == key for x in items]
        assert sent == [i for i in range(10) if i % 2 == key]
        assert all(x % 2 == key for k, items in rec.batches if k == key for x in items)


def test_a_closed_gate_skips_and_keeps_the_entries() -> None:
    """While the gate says no, the lane is skipped (on_skip) and its entries stay; they go once it opens."""
    rec = Recorder()
    open_gate = threading.Event()
    skips: list[tuple[Hashable, int]] = []
    engine: BatchEngine[str] = BatchEngine(
        rec,
        name="test-engine",
        window=0.01,
        max_batch_size=10,
        gate=lambda key: open_gate.is_set(),
        on_skip=lambda key, count: skips.append((key, count)),
    )
    engine.put("a", key="k")
    wait_for(lambda: skips, message="a skip")
    assert skips[0] == ("k", 1)
    assert rec.batches == []
    assert engine.lane_length("k") == 1
    open_gate.set()
    wait_for(lambda: rec.batches, message="delivery after the gate opened")
    assert rec.batches == [("k", ["a"])]
    assert engine.close(5)


def test_put_later_enters_the_lane_after_its_delay() -> None:
    """A scheduled entry is not sent before its delay has passed."""
    rec = Recorder()
    times: list[float] = []

    def deliver(key: Hashable, items: list[Any]) -> None:
        times.append(time.monotonic())
        rec(key, items)

    engine: BatchEngine[str] = BatchEngine(deliver, name="test-engine", window=0.001, max_batch_size=10)
    t0 = time.monotonic()
    engine.put_later("later", "k", 0.1)
    wait_for(lambda: rec.batches, message="the scheduled entry")
    assert times[0] - t0 >= 0.095
    assert engine.close(5)


@pytest.mark.timeout(30)
def test_a_far_future_put_later_does_not_kill_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry scheduled past what a thread wait accepts (1e10 s) neither crashes the worker nor blocks the next."""
    crashes: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args.exc_value))
    rec = Recorder()
    engine: BatchEngine[str] = BatchEngine(rec, name="test-engine", window=0.001, max_batch_size=10)
    engine.put_later("someday", "k", 1e10)
    engine.put("now", "k")
    wait_for(lambda: rec.batches, message="the entry put after a far-future one")
    assert rec.batches == [("k", ["now"])]
    engine.close(5)
    assert crashes == []


def test_close_hands_scheduled_entries_to_on_abandon() -> None:
    """Entries still scheduled at close are given to on_abandon instead of being sent."""
    rec = Recorder()
    abandoned: list[tuple[Hashable, list[Any]]] = []
    engine: BatchEngine[str] = BatchEngine(
        rec,
        name="test-engine",
        window=0.001,
        max_batch_size=10,
        on_abandon=lambda key, items: abandoned.append((key, items)),
    )
    engine.put_later("retry-me", "k", 60)
    assert engine.close(5)
    assert abandoned == [("k", ["retry-me"])]
    assert rec.batches == []
    with pytest.raises(DispatcherClosedError):
        engine.put("x")
    with pytest.raises(DispatcherClosedError):
        engine.put_later("x", "k", 1)


def test_async_delivery_settles_when_the_future_completes() -> None:
    """A deliver returning a Future keeps flush() waiting until that Future is done."""
    pending: list[Future[None]] = []

    def deliver(key: Hashable, items: list[Any]) -> Future[None]:
        future: Future[None] = Future()
        pending.append(future)
        return future

    engine: BatchEngine[int] = BatchEngine(deliver, name="test-engine", window=60, max_batch_size=10)
    engine.put(1)
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(engine.flush(10)))
    flusher.start()
    wait_for(lambda: pending, message="the batch handed over")
    assert engine.in_flight() == 1
    flusher.join(0.05)
    assert flusher.is_alive()  # still waiting for the send to finish
    pending[0].set_result(None)
    flusher.join(5)
    assert flushed == [True]
    assert engine.close(5)


def test_take_now_sends_synchronously_and_settles() -> None:
    """take_now hands the caller a batch (in priority order with a PriorityLane) to settle itself."""
    rec = Recorder()
    engine: BatchEngine[tuple[int, str]] = BatchEngine(
        rec,
        name="test-engine",
        window=60,
        max_batch_size=10,
        lane_factory=lambda key: PriorityLane(key, lambda item: item[0]),
    )
    for item in [(0, "low"), (5, "high"), (0, "low2"), (5, "high2")]:
        engine.put(item, key="ep")
    seq, items = engine.take_now("ep", 3)
    assert items == [(5, "high"), (5, "high2"), (0, "low")]
    assert engine.in_flight() == 1
    engine.settle(seq)
    assert engine.in_flight() == 0
    assert engine.lane_length("ep") == 1
    assert engine.take_now("missing", 3) == (0, [])
    assert engine.close(5)
    assert rec.batches == [("ep", [(0, "low2")])]


def test_per_lane_limit_with_drop_oldest_in_the_locked_path() -> None:
    """The locked put applies the overflow policy per lane and reports dropped items."""
    dropped: list[Any] = []
    gate = threading.Event()
    engine: BatchEngine[int] = BatchEngine(
        lambda k, items: None,
        name="test-engine",
        window=60,
        max_batch_size=100,
        max_queue_size=3,
        overflow="drop_oldest",
        on_drop=dropped.extend,
        gate=lambda key: gate.is_set(),
    )
    for i in range(5):
        engine.put(i, key="a")
    assert dropped == [0, 1]
    assert engine.lane_length("a") == 3
    gate.set()
    assert engine.close(5)


class SteppedDeliver:
    """A deliver that blocks in every call until the test allows one more to return."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.allowed = threading.Semaphore(0)
        self.batches: list[list[Any]] = []

    def __call__(self, key: Hashable, items: list[Any]) -> None:
        self.batches.append(list(items))
        self.entered.release()
        assert self.allowed.acquire(timeout=20), "the test never let deliver return"

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=10), "deliver was not called"

    def allow(self, calls: int = 1) -> None:
        for _ in range(calls):
            self.allowed.release()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_entries_dropped_after_a_flush_counted_them_leave_no_stale_quota(overflow: str) -> None:
    """The lock-free path overshoots max_queue_size until its kick trims; a flush that counted the
    overshoot must not wait for the dropped entries: it returns, and a later flush returns too."""
    deliver = SteppedDeliver()
    engine: BatchEngine[int] = BatchEngine(
        deliver,
        name="test-engine",
        window=60,
        max_batch_size=5,
        max_queue_size=10,
        overflow=overflow,  # type: ignore[arg-type]
    )
    lane = engine.default_lane
    for i in range(5):
        lane.append(i)  # the lock-free enqueue: append, then kick at the trigger
    engine.kick(lane)
    deliver.wait_entered()  # the first batch is in deliver
    for i in range(5, 25):
        lane.append(i)  # producers appended past the limit; their kicks have not run yet
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(engine.flush(20)), daemon=True)
    flusher.start()
    wait_for(lambda: engine._flush_requested == 1, message="the flush request")
    deliver.allow()  # the worker starts the flush with all 20 entries counted, and takes 5
    deliver.wait_entered()
    engine.kick(lane)  # the late kick drops what is over the limit
    assert engine.dropped == 5
    deliver.allow(3)  # the 10 kept entries go in two batches
    flusher.join(10)
    assert flushed == [True]
    assert engine.pending() == 0
    assert engine.flush(5) is True
    assert sum(len(b) for b in deliver.batches) == 20
    deliver.allow(10)
    assert engine.close(5)


@pytest.mark.timeout(30)
def test_a_blocked_put_lands_in_the_live_lane_of_its_key() -> None:
    """A keyed put that waited for room while the worker emptied (and so deleted) its lane goes into
    the key's live lane: pending() counts it and the limit still holds for the next put."""
    deliver = SteppedDeliver()
    engine: BatchEngine[int] = BatchEngine(
        deliver, name="test-engine", window=60, max_batch_size=1, max_queue_size=1, overflow="block"
    )
    engine.put(1, key="k")
    deliver.wait_entered()  # [1] is in deliver; the emptied lane of "k" was deleted
    engine.put(2, key="k")  # a new lane for "k", now full
    producer = threading.Thread(target=engine.put, args=(3, "k"), daemon=True)
    producer.start()
    wait_for(lambda: engine._space_waiters == 1, message="the producer waiting for room")
    deliver.allow()  # the worker takes [2], emptying that lane too, and waits in deliver again
    deliver.wait_entered()
    producer.join(10)
    assert not producer.is_alive()
    assert engine.pending() == 1
    assert engine.lane_length("k") == 1
    with pytest.raises(QueueFullError):
        engine.put(4, key="k", timeout=0)
    deliver.allow(10)
    assert engine.close(5)
    assert deliver.batches == [[1], [2], [3]]


def test_a_queue_smaller_than_the_batch_size_makes_it_the_batch_size() -> None:
    """max_queue_size below max_batch_size is meaningful: the smaller one is the batch size in effect,
    so a full lane goes at once and the lock-free path never overshoots the limit by a whole batch."""
    engine: BatchEngine[int] = BatchEngine(
        Recorder(), name="test-engine", window=60, max_batch_size=1000, max_queue_size=3
    )
    assert engine.max_batch_size == 3
    unbounded: BatchEngine[int] = BatchEngine(Recorder(), name="test-engine", window=60, max_batch_size=1000)
    assert unbounded.max_batch_size == 1000
    assert engine.close(5) and unbounded.close(5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest", "block", "raise"])
def test_drop_first_drops_the_entry_a_lane_would_send_first(overflow: Overflow) -> None:
    """drop_first takes the oldest entry of a key's lane whatever the overflow policy, counts it as
    dropped, leaves on_drop to the caller, and returns None for an empty or unknown lane."""
    on_drop: list[list[int]] = []
    engine: BatchEngine[int] = BatchEngine(
        Recorder(),
        name="test-engine",
        window=60,
        max_batch_size=10,
        overflow=overflow,
        on_drop=on_drop.append,
    )
    for i in range(3):
        engine.put(i, key="k")
    assert engine.drop_first("k") == 0
    assert engine.drop_first("k") == 1
    assert engine.lane_length("k") == 1
    assert engine.drop_first("missing") is None
    assert engine.drop_first("k") == 2
    assert engine.drop_first("k") is None
    assert engine.dropped == 3
    assert on_drop == []
    assert engine.flush(5) is True
    assert engine.close(5)


@pytest.mark.timeout(30)
def test_drop_first_keeps_a_running_flush_quota_right() -> None:
    """A flush counted five entries and the worker took two; dropping the other three with drop_first
    must release the flush (no quota left waiting for entries that are gone)."""
    deliver = SteppedDeliver()
    engine: BatchEngine[int] = BatchEngine(deliver, name="test-engine", window=60, max_batch_size=2)
    engine.put(0)
    engine.put(1)
    deliver.wait_entered()  # [0, 1] is in deliver
    for i in range(2, 7):
        engine.put(i)
    flushed: list[bool] = []
    flusher = threading.Thread(target=lambda: flushed.append(engine.flush(20)), daemon=True)
    flusher.start()
    wait_for(lambda: engine._flush_requested == 1, message="the flush request")
    deliver.allow()  # the worker starts the flush (five counted), takes [2, 3], and blocks in deliver
    deliver.wait_entered()
    assert [engine.drop_first(None) for _ in range(4)] == [4, 5, 6, None]
    deliver.allow(10)
    flusher.join(20)
    assert flushed == [True]
    assert deliver.batches == [[0, 1], [2, 3]]
    assert engine.close(5)


@pytest.mark.timeout(30)
def test_drop_first_makes_room_for_a_blocked_put() -> None:
    """Under overflow="block" the room drop_first makes wakes a producer waiting for it."""
    deliver = SteppedDeliver()
    engine: BatchEngine[int] = BatchEngine(
        deliver, name="test-engine", window=60, max_batch_size=1, max_queue_size=1, overflow="block"
    )
    engine.put(1)
    deliver.wait_entered()  # [1] is in deliver
    engine.put(2)  # the lane is full
    producer = threading.Thread(target=engine.put, args=(3,), kwargs={"timeout": 20}, daemon=True)
    producer.start()
    wait_for(lambda: engine._space_waiters == 1, message="the producer waiting for room")
    assert engine.drop_first(None) == 2
    producer.join(20)
    assert not producer.is_alive()
    assert engine.lane_length(None) == 1
    deliver.allow(10)
    assert engine.close(5)
    assert deliver.batches == [[1], [3]]


@pytest.mark.parametrize("cls", [BatchEngine, FifoLane, ClosedFifoLane, PriorityLane])
def test_repr_never_raises_for_a_half_made_instance(cls: type[Any]) -> None:
    """Engine and lanes: an instance whose __init__ failed (or never ran) still has a repr."""
    obj = cast(Any, cls).__new__(cls)  # mypy reads type[Any].__new__ as type.__new__; a deque lane has its own
    with pytest.raises((ConfigurationError, TypeError)):
        if cls is BatchEngine:
            obj.__init__(Recorder(), name="half", window=1, max_batch_size=1, overflow="spill")
        else:
            obj.__init__(1, 2, 3, 4)
    assert cls.__name__ in repr(obj)


class Gated:
    """A deliver that holds every batch until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.entries = 0

    def __call__(self, key: Hashable, items: list[Any]) -> None:
        assert self.release.wait(20), "the test never released deliver"
        with self.lock:
            self.entries += len(items)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overflow", ["block", "raise"])
@pytest.mark.parametrize(("limit", "producers"), [(50, 4), (256, 8)])
def test_lossless_enqueue_keeps_the_documented_bound(overflow: str, limit: int, producers: int) -> None:
    """Producers racing on the lossless path: a buffer too small for a lock-free path (50) never
    holds more than max_queue_size; one with a margin (256: lock-free below 256 - 32) never more
    than max_queue_size + producers - 1. Every entry is delivered or refused with QueueFullError."""
    bound = limit if lossless_margin(limit) == limit else limit + producers - 1
    deliver = Gated()
    engine: BatchEngine[int] = BatchEngine(
        deliver,
        name="test-lossless",
        window=60,
        max_batch_size=1000,
        max_queue_size=limit,
        overflow=overflow,  # type: ignore[arg-type]
    )
    lane = engine.default_lane
    assert isinstance(lane, FifoLane)
    enqueue = engine.lossless_enqueue(lane, lambda: TypeError("positional timeout"))
    refused = [0] * producers
    longest = [0]
    start = threading.Barrier(producers)

    def produce(index: int) -> None:
        start.wait()
        for i in range(3000):
            try:
                enqueue(i, timeout=0)
            except QueueFullError:
                refused[index] += 1
            longest[0] = max(longest[0], len(lane))

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert limit <= longest[0] <= bound
    assert sum(refused)  # the bound was reached
    deliver.release.set()
    assert engine.close(10)
    assert deliver.entries + sum(refused) == producers * 3000


def test_lossless_margin_leaves_small_buffers_always_locked() -> None:
    """Under 128 entries the margin is the whole buffer (always locked: an exact bound); above,
    an eighth of it, at most 1024."""
    assert [lossless_margin(n) for n in (1, 50, 127)] == [1, 50, 127]
    assert [lossless_margin(n) for n in (128, 8000, 10**6)] == [16, 1000, 1024]


@pytest.mark.timeout(30)
def test_lossless_enqueue_blocks_at_the_bound_until_a_take_and_refuses_misuse() -> None:
    """At the bound a "block" enqueue waits for room (up to its timeout); a stray positional
    argument is the face's misuse error; a closed lane refuses and gives its slot back."""
    deliver = Gated()
    engine: BatchEngine[int] = BatchEngine(
        deliver, name="test-lossless-block", window=60, max_batch_size=2, max_queue_size=2, overflow="block"
    )
    lane = engine.default_lane
    assert isinstance(lane, FifoLane)
    enqueue = engine.lossless_enqueue(lane, lambda: TypeError("positional timeout"))
    with pytest.raises(TypeError, match="positional timeout"):
        enqueue(1, 5.0)
    assert len(lane) == 0
    enqueue(1)
    enqueue(2)  # full: the batch is taken and held in deliver
    wait_for(lambda: len(lane) == 0, message="the first batch taken")
    enqueue(3)
    enqueue(4)  # the lane is full again (its batch waits for the one in deliver)
    with pytest.raises(QueueFullError, match="stayed full"):
        enqueue(5, timeout=0.01)
    assert len(lane) == 2
    done = threading.Event()

    def blocked() -> None:
        enqueue(6, timeout=20)
        done.set()

    threading.Thread(target=blocked, daemon=True).start()
    deliver.release.set()  # the held batch settles, the next is taken: room
    assert done.wait(20)
    assert engine.close(10)
    assert deliver.entries == 5
    lane.__class__ = ClosedFifoLane
    with pytest.raises(DispatcherClosedError):
        enqueue(7)
    assert len(lane) == 0


def test_a_shut_gate_is_asked_once_not_once_per_due_lane() -> None:
    """With many lanes due and the gate refusing, one take asks the gate once and leaves the
    other lanes due, in order, untried (the cost of a take does not grow with the lanes)."""
    calls = [0]

    def gate(_key: Hashable) -> bool:
        calls[0] += 1
        return False

    engine: BatchEngine[int] = BatchEngine(
        lambda key, items: None, name="test-gate", window=60, max_batch_size=2, gate=gate
    )
    with engine._lock:
        engine._thread = threading.current_thread()  # no worker: the test takes
    for key in range(1000):
        engine.put(1, key)
        engine.put(2, key)  # full: due
    with engine._lock:
        batches, skipped = engine._take_due(time.monotonic())
        assert next(iter(engine._due)).key == 1
        assert len(engine._due) == 999
    assert (batches, skipped, calls[0]) == ([], [(0, 2)], 1)
    with engine._lock:
        engine._thread = None
    assert engine.close(5)  # closing bypasses the gate: everything goes
    assert engine.pending() == 0


def test_while_the_gate_is_shut_only_the_held_lane_is_retried() -> None:
    """Window after window with the gate shut, the one held lane is asked again, not a new lane each
    time: the lanes due behind it wait untried, so the refusals do not grow with the lanes."""
    engine: BatchEngine[int] = BatchEngine(
        lambda key, items: None, name="test-held", window=0.01, max_batch_size=2, gate=lambda key: False
    )
    with engine._lock:
        engine._thread = threading.current_thread()  # no worker: the test runs its turns
    for key in range(100):
        engine.put(1, key)
        engine.put(2, key)
    refused: list[Hashable] = []
    with engine._lock:
        for _turn in range(5):
            work = engine._next_work()  # returns at the held lane's next window, refused again
            assert work is not None
            refused += [key for key, _count in work[1]]
        assert len(engine._held) == 1
        engine._thread = None
    assert refused == [0] * 5
    assert engine.close(5)
