"""BatchEngine.put's lock-free path: deleted lanes, racing producers, the overflow bounds, flush, and the lane table."""

from __future__ import annotations

import threading
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch import BatchedDispatcher, QueueFullError
from threaddispatch._engine import BatchEngine, Overflow
from threaddispatch._lanes import SHARD_MASK, SPLIT_AT, FifoLane, LaneTable
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

PRODUCERS = 4


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards batches
        self.batches: list[tuple[Hashable, list[Any]]] = []

    def __call__(self, key: Hashable, items: list[Any]) -> None:
        with self.lock:
            self.batches.append((key, list(items)))

    def items(self, key: Hashable = ...) -> list[Any]:
        with self.lock:
            return [item for k, items in self.batches if key is ... or k == key for item in items]


def _race(produce: Any) -> list[Any]:
    """Run ``produce(index)`` on PRODUCERS threads started together; their return values, by index."""
    start = threading.Barrier(PRODUCERS)
    results: list[Any] = [None] * PRODUCERS
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            start.wait(10)
            results[index] = produce(index)
        except BaseException as error:  # reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,), name=f"test-producer-{i}") for i in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_an_append_to_a_lane_deleted_under_it_moves_to_the_live_lane() -> None:
    """A producer that found a lane just before the worker emptied and deleted it appends there; its kick
    moves the entry to the key's live lane, and the live lane (made meanwhile) keeps its own entries."""
    rec = Recorder()
    engine: BatchEngine[str] = BatchEngine(rec, name="test-lock-free", window=60.0, max_batch_size=100)
    engine.put("first", "k")
    stale = engine._lanes.get("k")  # what a racing put looked up
    assert isinstance(stale, FifoLane)
    assert engine.flush(10)  # taken and deleted: the lane is empty
    assert engine._lanes.get("k") is None
    engine.put("second", "k")  # a new live lane for the key, its window open
    live = engine._lanes.get("k")
    assert isinstance(live, FifoLane) and live is not stale
    stale.lock_free_append("late")  # the racing put's append, then its trigger check
    assert len(stale) >= stale.trigger
    engine.kick(stale)
    assert engine._lanes.get("k") is live
    assert list(live) == ["second", "late"]
    assert engine.flush(10)
    assert rec.items("k") == ["first", "second", "late"]
    assert engine.pending() == 0
    assert engine.close(10)


def test_a_second_kick_of_a_deleted_lane_finds_it_empty() -> None:
    """Two producers appended to the deleted lane: the first kick moves both entries, the second does nothing."""
    rec = Recorder()
    engine: BatchEngine[str] = BatchEngine(rec, name="test-lock-free", window=60.0, max_batch_size=100)
    engine.put("first", "k")
    stale = engine._lanes.get("k")
    assert isinstance(stale, FifoLane)
    assert engine.flush(10)
    stale.lock_free_append("a")
    stale.lock_free_append("b")
    engine.kick(stale)
    engine.kick(stale)
    assert engine.lane_length("k") == 2
    assert engine.flush(10)
    assert rec.items("k") == ["first", "a", "b"]
    assert engine.close(10)


@pytest.mark.timeout(120)
def test_racing_producers_lose_nothing_while_lanes_come_and_go() -> None:
    """4 producers put into 3 keys while small windows and small batches delete and remake the lanes."""
    rec = Recorder()
    engine: BatchEngine[tuple[int, int]] = BatchEngine(rec, name="test-lock-free", window=0.0005, max_batch_size=7)
    per_producer = 5000

    def produce(index: int) -> None:
        for i in range(per_producer):
            engine.put((index, i), i % 3)

    _race(produce)
    assert engine.flush(30)
    items = rec.items()
    assert len(items) == PRODUCERS * per_producer
    assert set(items) == {(p, i) for p in range(PRODUCERS) for i in range(per_producer)}
    for key in range(3):  # each producer's entries of one key stay in its order
        sent = rec.items(key)
        for producer in range(PRODUCERS):
            mine = [i for p, i in sent if p == producer]
            assert mine == sorted(mine)
    assert engine.close(10)


@pytest.mark.timeout(120)
def test_flush_waits_for_entries_put_concurrently_with_it() -> None:
    """Every submit that returned before flush() was called is settled when flush returns True."""
    sent: list[int] = []
    sent_lock = threading.Lock()

    def send_batch(_target: str, messages: list[int]) -> list[None]:
        with sent_lock:
            sent.extend(messages)
        return [None] * len(messages)

    dispatcher: BatchedDispatcher[int] = BatchedDispatcher(send_batch, max_batch_size=20, flush_interval=0.002)
    futures: list[list[Future[Any]]] = [[] for _ in range(PRODUCERS)]
    stop = threading.Event()
    running = threading.Barrier(PRODUCERS + 1)
    per_producer = 20_000

    def produce(index: int) -> None:
        running.wait(10)
        for i in range(per_producer):
            if stop.is_set():
                return
            futures[index].append(dispatcher.submit(index * 1_000_000 + i, f"t{i % 3}"))

    threads = [threading.Thread(target=produce, args=(i,), name=f"test-producer-{i}") for i in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    try:
        running.wait(10)
        wait_for(lambda: all(futures), message="every producer submitted")
        while any(thread.is_alive() for thread in threads):
            returned = [len(mine) for mine in futures]  # list.append after submit returned
            assert dispatcher.flush(60)
            for mine, count in zip(futures, returned, strict=True):
                assert all(future.done() for future in mine[:count])
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert dispatcher.close(30)
    assert all(future.done() for mine in futures for future in mine)
    assert len(sent) == sum(map(len, futures))


def _bounded(overflow: Overflow, limit: int, release: threading.Event, rec: Recorder) -> BatchEngine[tuple[int, int]]:
    def deliver(key: Hashable, items: list[Any]) -> None:
        release.wait(30)  # the worker holds its first batch: the lane fills up to the bound
        rec(key, items)

    return BatchEngine(
        deliver, name="test-lock-free", window=0.001, max_batch_size=16, max_queue_size=limit, overflow=overflow
    )


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
@pytest.mark.timeout(120)
def test_the_drop_policies_hold_their_bound_with_racing_producers(overflow: Overflow) -> None:
    """4 producers put past a bound of 256 while nothing drains: the lane ends at most at the bound, and
    every entry is delivered or counted dropped."""
    rec, release = Recorder(), threading.Event()
    dropped: list[Any] = []
    limit, per_producer = 256, 2000
    engine = _bounded(overflow, limit, release, rec)
    engine._on_drop = dropped.extend

    def produce(index: int) -> None:
        for i in range(per_producer):
            engine.put((index, i), "k")

    try:
        engine.put((-1, 0), "k")
        wait_for(engine.in_flight, message="the worker holding a batch")
        _race(produce)
        assert engine.lane_length("k") <= limit
    finally:
        release.set()
    assert engine.flush(30)
    assert len(rec.items()) + len(dropped) == PRODUCERS * per_producer + 1
    assert engine.dropped == len(dropped)
    assert engine.close(10)


@pytest.mark.timeout(120)
def test_overflow_raise_holds_its_bound_with_racing_producers() -> None:
    """4 producers put until QueueFullError while nothing drains: the lane holds at most bound + 3 entries
    (see lossless_enqueue), and every accepted entry is delivered."""
    rec, release = Recorder(), threading.Event()
    limit = 256
    engine = _bounded("raise", limit, release, rec)

    def produce(index: int) -> int:
        accepted = 0
        while True:
            try:
                engine.put((index, accepted), "k")
            except QueueFullError:
                return accepted
            accepted += 1

    try:
        engine.put((-1, 0), "k")
        wait_for(engine.in_flight, message="the worker holding a batch")
        accepted = _race(produce)
        assert limit <= engine.lane_length("k") <= limit + PRODUCERS - 1
    finally:
        release.set()
    assert engine.flush(30)
    assert len(rec.items()) == sum(accepted) + 1
    assert engine.close(10)


@pytest.mark.timeout(120)
def test_overflow_block_holds_its_bound_with_racing_producers() -> None:
    """4 producers put more than fits while nothing drains: they wait at the bound (the lane holds at
    most bound + 3), then every entry goes once the worker drains."""
    rec, release = Recorder(), threading.Event()
    limit, per_producer = 256, 400
    engine = _bounded("block", limit, release, rec)
    outcome: list[Any] = []

    def produce(index: int) -> None:
        for i in range(per_producer):
            engine.put((index, i), "k", timeout=60)

    engine.put((-1, 0), "k")
    wait_for(engine.in_flight, message="the worker holding a batch")
    racing = threading.Thread(target=lambda: outcome.append(_race(produce)), name="test-race")
    racing.start()
    try:
        wait_for(lambda: engine._space_waiters == PRODUCERS, timeout=30, message="every producer waiting for room")
        assert limit <= engine.lane_length("k") <= limit + PRODUCERS - 1
    finally:
        release.set()
        racing.join(60)
    assert outcome, "the producers did not finish"
    assert engine.flush(30)
    items = rec.items()
    assert len(items) == PRODUCERS * per_producer + 1
    assert len(set(items)) == len(items)
    assert engine.close(10)


@pytest.mark.parametrize("spread", [False, True])
def test_the_lane_table_is_a_mapping_before_and_after_its_split(spread: bool) -> None:
    """get, set, delete, len, values and items agree, in one dict and spread over several."""
    table: LaneTable[str] = LaneTable()
    keys: list[Hashable] = [None, 0, 1, "a", ("t", 1), *range(100, 140)]
    if spread:
        keys += [f"key-{i}" for i in range(SPLIT_AT)]
    for key in keys:
        table[key] = f"lane-{key}"
    assert (table.one is None) is spread
    assert len(table) == len(keys)
    assert all(table.get(key) == f"lane-{key}" for key in keys)
    assert {key for key, _lane in table.items()} == set(keys)
    assert sorted(table.values()) == sorted(f"lane-{key}" for key in keys)
    if spread:
        assert len({hash(key) & SHARD_MASK for key in keys}) > 1
        assert all(table.dict_of(key) is table.shards[hash(key) & SHARD_MASK] for key in keys)
    del table["a"]
    assert table.get("a") is None
    assert len(table) == len(keys) - 1


@pytest.mark.timeout(120)
def test_lanes_put_across_the_split_of_the_lane_table_all_arrive() -> None:
    """4 producers put into more keys than SPLIT_AT while the table splits: every entry arrives once."""
    rec = Recorder()
    # Windows long enough for the lanes to pile up past SPLIT_AT; full batches of 3 go meanwhile.
    engine: BatchEngine[tuple[int, int]] = BatchEngine(rec, name="test-lock-free", window=0.5, max_batch_size=3)
    keys = SPLIT_AT + 500
    engine.put((-1, 0), "warm")  # the worker runs: lanes come and go while the table grows

    def produce(index: int) -> None:
        for i in range(keys):
            engine.put((index, i), (i * 7 + index) % keys)

    _race(produce)
    assert engine._lanes.one is None  # split while they put
    assert engine.flush(30)
    items = rec.items()
    assert len(items) == PRODUCERS * keys + 1
    assert len(set(items)) == len(items)
    assert engine.close(10)
