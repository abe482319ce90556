"""BatchEngine.settle_and_take: a settling thread takes the next due batch itself, and a shut gate leaves windows alone.

Each test runs the worker's turns on the test thread (``engine._thread`` set to it), so what is
taken, refused and left open is decided by the calls the test makes, not by a thread's timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest

from threaddispatch import _engine as _engine_module
from threaddispatch._engine import BatchEngine
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


def _engine(window: float, *, max_batch_size: int = 2, max_unsettled: int = 1) -> tuple[BatchEngine[Any], list[Any]]:
    """A self-settling engine whose worker is the test thread; the drain at close settles as it delivers."""
    skips: list[Hashable] = []
    engine: BatchEngine[Any] = BatchEngine(
        lambda _key, _items, seq: engine.settle(seq),
        name="test-settle-take",
        window=window,
        max_batch_size=max_batch_size,
        max_unsettled=max_unsettled,
        on_skip=lambda key, _count: skips.append(key),
        self_settling=True,
    )
    with engine._lock:
        engine._thread = threading.current_thread()  # no worker thread: the test runs its turns
    return engine, skips


def _release(engine: BatchEngine[Any]) -> None:
    """Settle what the test took, give the engine its own worker back, and close it (everything delivered)."""
    with engine._lock:
        engine._thread = None
        taken = list(engine._unsettled)
    for seq in taken:
        engine.settle(seq)
    assert engine.close(5)
    assert engine.pending() == 0


def _deadline(engine: BatchEngine[Any], key: Hashable) -> float:
    """When the open window of ``key``'s lane closes."""
    lane = engine._lanes.get(key)
    assert lane is not None and lane.deadline is not None
    return lane.deadline


def _past(deadline: float, engine: BatchEngine[Any]) -> None:
    """Wait until the monotonic clock is past ``deadline`` and the engine's slack (a window has closed)."""
    wait_for(lambda: time.monotonic() > deadline + engine._slack, timeout=5, message="the window closed")


def test_a_settle_hands_the_freed_slot_to_the_held_lane_then_to_the_due_ones_in_order() -> None:
    engine, skips = _engine(window=60)
    for key in range(4):
        engine.put(key * 10, key)
        engine.put(key * 10 + 1, key)  # full: due at once
    with engine._lock:
        batches, skipped = engine._take_due(time.monotonic())
    assert [(key, items) for key, _seq, items in batches] == [(0, [0, 1])]
    assert skipped == [(1, 2)]  # the limit of one: lane 1 refused and held, the others wait untried
    seq = batches[0][1]
    got = []
    while (taken := engine.settle_and_take(seq)) is not None:
        got.append((taken[0], taken[2]))
        seq = taken[1]
        assert engine.in_flight() == 1  # one settled, one taken: never past the limit
    assert got == [(1, [10, 11]), (2, [20, 21]), (3, [30, 31])]
    assert engine.in_flight() == 0 and engine.settled_entries == 8 and engine.pending() == 0
    assert engine.skipped == 1 and not engine._gate_shut  # no refusal per batch; the last settle reopened it
    assert engine.settle_and_take(seq) is None  # settled already: nothing more
    _release(engine)
    assert skips == []  # on_skip is the worker's to call (the test took by hand)


def test_a_settle_closes_the_windows_a_shut_gate_left_open_and_takes_from_them() -> None:
    engine, _skips = _engine(window=0.05, max_batch_size=10)
    engine.put("a", 0)
    engine.put("b", 1)
    _past(max(_deadline(engine, 0), _deadline(engine, 1)), engine)
    with engine._lock:
        work = engine._next_work()
    assert work is not None
    batches, skipped = work
    assert [(key, items) for key, _seq, items in batches] == [(0, ["a"])] and skipped == [(1, 1)]
    engine.put("c", 2)  # its window opens behind the shut gate
    _past(_deadline(engine, 2), engine)
    first = engine.settle_and_take(batches[0][1])
    assert first is not None and first[::2] == (1, ["b"])  # the held lane first
    second = engine.settle_and_take(first[1])
    assert second is not None and second[::2] == (2, ["c"])  # its closed window, closed by this settle
    assert engine.settle_and_take(second[1]) is None
    _release(engine)


def test_while_the_gate_is_shut_windows_close_a_turn_at_a_time_with_the_held_lanes() -> None:
    """A shut gate cannot take the lanes whose windows close behind it: the worker leaves them in
    their windows, and closes a turn's worth (not all) when the held lane's window closes, so the
    lock every producer needs is held briefly, and the windows the held lane reopens stay bounded."""
    engine, _skips = _engine(window=0.05, max_batch_size=10)
    engine.put("a", 0)
    engine.put("b", 1)
    _past(max(_deadline(engine, 0), _deadline(engine, 1)), engine)
    with engine._lock:
        work = engine._next_work()  # takes lane 0, refuses lane 1: the gate shuts
    assert work is not None and work[1] == [(1, 1)]
    held_deadline = _deadline(engine, 1)
    behind = range(2, 2 + 2 * _engine_module._WINDOWS_PER_TURN)
    for key in behind:
        engine.put(key, key)
    with engine._lock:
        engine._close_held_windows(time.monotonic())  # the held lane's window is still open: nothing
        assert engine._gate_shut and len(engine._due) == 0
    _past(max(_deadline(engine, behind[-1]), held_deadline), engine)
    with engine._lock:
        work = engine._next_work()  # the held lane's window closed: refused again, a turn of windows closed
        assert work is not None and work[1] == [(1, 1)]
        due = [key for key in behind if engine._lanes.get(key).due]  # type: ignore[union-attr]
        assert 0 < len(due) <= _engine_module._WINDOWS_PER_TURN
        assert due == list(behind)[: len(due)]  # in the order their windows opened
    _release(engine)


def test_a_closing_engine_leaves_the_drain_to_the_worker() -> None:
    """settle_and_take settles but takes nothing once the engine closes (the drain bypasses the gate)."""
    engine, _skips = _engine(window=60)
    for key in range(3):
        engine.put(1, key)
        engine.put(2, key)
    with engine._lock:
        batches, _skipped = engine._take_due(time.monotonic())
        engine._thread = None
    engine.begin_close()  # starts the drain worker: it takes (and settles) the other lanes meanwhile
    assert engine.settle_and_take(batches[0][1]) is None
    with engine._lock:  # the settled batch left; the drain's own may be in flight (not in_flight() == 0)
        assert batches[0][1] not in engine._unsettled
    assert engine.close(5)
    assert engine.pending() == 0 and engine.settled_entries == 6


def test_a_producer_waiting_for_the_lock_makes_the_settling_loop_yield(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer blocked on the engine's lock is counted while it waits; a settle that takes a batch
    meanwhile then lets it in (yields the GIL) before its caller sends on, so add_job is not kept
    waiting for a switch interval per sending thread that loops."""
    from threaddispatch import _engine
    from threaddispatch._lanes import PriorityLane

    yields: list[float] = []
    monkeypatch.setattr(_engine, "_yield_gil", yields.append)
    engine: BatchEngine[Any] = BatchEngine(
        lambda _key, _items, seq: engine.settle(seq),
        name="test-settle-take",
        window=60,
        max_batch_size=1,
        max_unsettled=1,
        lane_factory=lambda key: PriorityLane(key, priority_of=lambda _item: 0),  # every put takes the lock
        self_settling=True,
    )
    with engine._lock:
        engine._thread = threading.current_thread()
    engine.put("a", 0)
    engine.put("b", 1)
    with engine._lock:
        batches, _skipped = engine._take_due(time.monotonic())
    first = engine.settle_and_take(batches[0][1])
    assert first is not None and yields == []  # nobody waited: no yield
    done = threading.Event()

    def produce() -> None:
        engine.put("c", 2)
        done.set()

    with engine._lock:
        producer = threading.Thread(target=produce)
        producer.start()
        wait_for(lambda: engine._producers_waiting, timeout=5, message="the producer waiting for the lock")
    assert done.wait(5)
    producer.join(5)
    assert engine._producers_waiting == []  # counted only while it waited
    with engine._lock:
        engine._producers_waiting.append(None)  # as if another producer waited now
    second = engine.settle_and_take(first[1])
    assert second is not None and second[::2] == (2, ["c"]) and yields == [0]
    with engine._lock:
        engine._producers_waiting.clear()
    _release(engine)
