"""The engine behaviour EndpointBatchDispatcher relies on: held lanes, a gated take_now, snapshots, PriorityLane."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch._engine import BatchEngine
from threaddispatch._lanes import PriorityLane
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(30)


class AsyncSends:
    """A deliver that returns a Future per batch, completed by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[Hashable, list[Any], Future[None]]] = []
        self.auto = False  # complete every later batch at once

    def __call__(self, key: Hashable, items: list[Any]) -> Future[None]:
        future: Future[None] = Future()
        with self.lock:
            self.batches.append((key, list(items), future))
            if self.auto:
                future.set_result(None)
        return future

    def count(self) -> int:
        with self.lock:
            return len(self.batches)

    def finish(self, index: int) -> None:
        with self.lock:
            future = self.batches[index][2]
        future.set_result(None)

    def finish_all(self) -> None:
        with self.lock:
            self.auto = True
            futures = [future for _key, _items, future in self.batches if not future.done()]
        for future in futures:
            future.set_result(None)


def limited_engine(sends: AsyncSends, skips: list[tuple[Hashable, int]], limit: int, **kwargs: Any) -> BatchEngine[Any]:
    engine: BatchEngine[Any]
    engine = BatchEngine(
        sends,
        name="test-held",
        gate=lambda key: engine.unsettled < limit,
        on_skip=lambda key, count: skips.append((key, count)),
        **kwargs,
    )
    return engine


def test_a_held_lane_goes_when_a_batch_settles_not_a_window_later() -> None:
    """A lane the gate held back is retried as soon as a batch settles, long before its next window;
    lanes due behind it keep their order (they wait untried once the gate has refused)."""
    sends = AsyncSends()
    skips: list[tuple[Hashable, int]] = []
    engine = limited_engine(sends, skips, 1, window=60, max_batch_size=2)
    for key in ("a", "b", "c"):
        engine.put(1, key)
        engine.put(2, key)  # full: due at once
    wait_for(lambda: sends.count() == 1 and skips, message="one batch sent, a lane held")
    assert skips[0] == ("b", 2)
    # Each wait is far shorter than the 60 s window: a lane sent within it went because a batch settled.
    sends.finish(0)
    wait_for(lambda: sends.count() == 2, timeout=10, message="the oldest held lane sent after the settle")
    sends.finish(1)
    wait_for(lambda: sends.count() == 3, timeout=10, message="the next held lane sent after the settle")
    assert [key for key, _items, _f in sends.batches] == ["a", "b", "c"]
    sends.finish(2)
    assert engine.close(5)


def test_a_held_lane_is_not_skipped_again_on_every_put() -> None:
    """Entries added to a held lane do not make it due again (one skip, not one per put); a lane
    that becomes due while the gate is shut waits untried: one skip per settle, not per lane."""
    sends = AsyncSends()
    skips: list[tuple[Hashable, int]] = []
    engine = limited_engine(sends, skips, 1, window=60, max_batch_size=2)
    engine.put(1, "busy")
    engine.put(2, "busy")
    wait_for(lambda: sends.count() == 1, message="the first batch")
    engine.put(1, "held")
    engine.put(2, "held")
    wait_for(lambda: skips, message="the held lane skipped")
    for i in range(3, 20):
        engine.put(i, "held")
    engine.put(1, "other")
    engine.put(2, "other")  # due behind the held lane: waits, untried
    assert engine.lane_length("held") == 19
    sends.finish(0)
    wait_for(lambda: sends.count() >= 2, message="the held lane after the settle")
    assert sends.batches[1][:2] == ("held", [1, 2])
    wait_for(lambda: ("other", 2) in skips, message="the waiting lane tried once the held one went")
    assert skips == [("held", 2), ("other", 2)]
    sends.finish_all()
    assert engine.close(5)


def test_take_now_asks_the_gate_and_reports_the_skip_on_the_caller() -> None:
    """take_now refuses a batch the gate holds back: on_skip runs on the calling thread, entries stay."""
    skip_threads: list[str] = []
    engine: BatchEngine[int] = BatchEngine(
        lambda key, items: None,
        name="test-take-gate",
        window=60,
        max_batch_size=10,
        gate=lambda key: False,
        on_skip=lambda key, count: skip_threads.append(threading.current_thread().name),
    )
    engine.put(1, "k")
    assert engine.take_now("k", 10) == (0, [])
    assert skip_threads == [threading.current_thread().name]
    assert engine.lane_length("k") == 1
    assert engine.close(5)  # closing bypasses the gate: the entry is delivered


def test_take_now_counts_towards_a_flush_in_progress() -> None:
    """Entries a flush waits for but take_now took are settled by take_now's batch: flush returns True."""
    engine: BatchEngine[int]
    skipped = threading.Event()
    engine = BatchEngine(
        lambda key, items: None,
        name="test-take-flush",
        window=60,
        max_batch_size=10,
        gate=lambda key: not engine.on_worker_thread(),  # the worker is always held back
        on_skip=lambda key, count: skipped.set(),
    )
    for i in range(3):
        engine.put(i, "k")
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(engine.flush(5)))
    flusher.start()
    assert skipped.wait(5)
    seq, items = engine.take_now("k", 10)
    assert items == [0, 1, 2]
    engine.settle(seq)
    flusher.join(10)
    assert result == [True]
    assert engine.close(5)


def test_snapshot_is_one_consistent_view() -> None:
    """snapshot() gives lane lengths, batches in flight and scheduled entries together."""
    sends = AsyncSends()
    engine: BatchEngine[int] = BatchEngine(sends, name="test-snapshot", window=60, max_batch_size=2)
    engine.put(1, "a")
    engine.put(2, "b")
    engine.put(3, "b")
    engine.put_later(4, "c", 60)
    wait_for(lambda: sends.count() == 1, message="b's full batch")
    assert engine.snapshot() == ({"a": 1}, 1, 1)
    sends.finish(0)
    assert engine.snapshot() == ({"a": 1}, 0, 1)
    engine.close(0)
    wait_for(lambda: sends.count() == 3, message="the drain")
    sends.finish(1)
    sends.finish(2)
    assert engine.close(5)


def test_priority_lane_matches_a_sorted_reference() -> None:
    """PriorityLane gives highest priority first, FIFO within one, under any mix of appends, takes and drops."""
    rng = random.Random(7)
    lane: PriorityLane[tuple[int, int]] = PriorityLane("k", lambda item: item[0])
    model: list[tuple[int, int]] = []  # (priority, serial), kept in send order
    serial = 0

    def send_order() -> list[tuple[int, int]]:
        return sorted(model, key=lambda item: (-item[0], item[1]))

    for _ in range(3000):
        action = rng.random()
        if action < 0.6:
            serial += 1
            item = (rng.randint(-2, 3), serial)
            lane.append(item)
            model.append(item)
        elif action < 0.8:
            count = rng.randint(1, 7)
            expected = send_order()[:count]
            assert lane.take(count) == expected
            for item in expected:
                model.remove(item)
        elif model and action < 0.9:
            expected_first = send_order()[0]
            assert lane.drop_oldest() == expected_first
            model.remove(expected_first)
        elif model:
            expected_last = send_order()[-1]
            assert lane.drop_newest() == expected_last
            model.remove(expected_last)
        assert len(lane) == len(model)
        assert bool(lane) == bool(model)
    assert lane.items() == send_order()
    assert lane.take(10_000) == send_order()
    assert len(lane) == 0 and lane.take(3) == []


def count_wakeups(engine: BatchEngine[Any]) -> list[int]:
    """From now on, every notify of the engine's worker is appended to the returned list."""
    wakeups: list[int] = []
    notify = engine._wakeup.notify

    def counting_notify(n: int = 1) -> None:
        wakeups.append(n)
        notify(n)

    engine._wakeup.notify = counting_notify  # type: ignore[method-assign]
    return wakeups


def test_opening_more_windows_does_not_wake_the_sleeping_worker() -> None:
    """Windows are equally long: a lane opening one after another is open cannot close earlier, so no wake-up."""
    engine: BatchEngine[int] = BatchEngine(lambda key, items: None, name="test-wakeups", window=60, max_batch_size=10)
    engine.put(0, "first")
    wait_for(lambda: engine._worker_waiting, message="the worker asleep until the first window closes")
    wakeups = count_wakeups(engine)
    for i in range(100):
        engine.put(i, f"lane-{i}")
    assert wakeups == []
    for i in range(10):
        engine.put(i, "full")  # a full lane still wakes it at once
    assert len(wakeups) == 1
    assert engine.close(5)


# -- cost flat in the number of endpoints (issue 14) -------------------------------------------


def test_an_endpoint_costs_the_collector_one_object() -> None:
    """Per endpoint with jobs of one priority the dispatcher keeps one tracked object (its lane):
    a full collection then costs little more with 100k endpoints than the jobs themselves."""
    import gc

    from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher

    dispatcher = EndpointBatchDispatcher(lambda _e, _j: None, max_batch_size=10, batch_timeout=3600.0)
    jobs = [DispatchJob(f"endpoint-{index}", index, priority=3) for index in range(1000)]
    try:
        gc.collect()
        before = len(gc.get_objects())
        for job in jobs:
            dispatcher.add_job(job)
        gc.collect()
        assert len(gc.get_objects()) - before <= 1000 + 50  # the lanes, and a few objects of the machinery
        dispatcher.add_job(DispatchJob("endpoint-0", "urgent", priority=9))
        assert [job.payload for job in dispatcher.process_batch_for_endpoint("endpoint-0").jobs] == ["urgent", 0]  # type: ignore[union-attr]
    finally:
        dispatcher.shutdown(10)


def test_with_the_gate_shut_the_worker_waits_for_a_settle_not_for_each_window() -> None:
    """The shut gate takes nothing, so the windows of the other lanes do not wake the worker: it
    sleeps until a settle or the held lane's window, however many lanes open windows meanwhile."""
    sends = AsyncSends()
    engine: BatchEngine[int] = BatchEngine(
        sends, name="test-shut-wait", window=60.0, max_batch_size=1, gate=lambda _key: engine.unsettled < 1
    )
    engine.put(0, "first")  # a full lane: taken, and unsettled
    wait_for(lambda: sends.count() == 1)
    engine.put(1, "second")  # due, refused: held, the gate shut
    wait_for(lambda: engine._gate_shut and engine._worker_waiting, message="the worker asleep, the gate shut")
    engine.window = 0.001  # the next windows close at once: still no reason to wake the worker
    wakeups = count_wakeups(engine)
    for index in range(100):
        engine.put(index, f"lane-{index}")
    assert wakeups == []
    with engine._lock:
        wait = engine._window_wait(time.monotonic())
    assert wait is not None and wait > 1.0  # the held lane's 60 s window, not the 1 ms ones
    sends.auto = True
    sends.finish(0)
    assert engine.flush(10)
    assert engine.close(5)
