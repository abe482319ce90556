"""Hostile tests of BatchEngine.put's lock-free path: many producers, thousands of keys made and
emptied again, tiny windows and batches, flush, close and drop policies racing the puts.

The GIL switch interval is shortened (``fast_switches``) so that producers, the worker and the
flusher interleave inside the few bytecodes between a lookup, an append and a trigger check.
Every accepted entry must be delivered exactly once (or, under a drop policy, dropped and
reported through ``on_drop``), and flush() must return only after every entry put before it.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from threaddispatch import BatchedDispatcher, DispatcherClosedError, DispatchJob, EndpointBatchDispatcher
from threaddispatch._engine import BatchEngine, Overflow
from threaddispatch._lanes import SPLIT_AT
from threaddispatch.testing import wait_for

PRODUCERS = 8


@pytest.fixture(autouse=True)
def fast_switches() -> Iterator[None]:
    """Switch threads every 10 us (default 5 ms): races between two bytecodes become common."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class Delivered:
    """Counts every entry delivered (a Counter, to see duplicates)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards counts
        self.counts: Counter[Any] = Counter()

    def __call__(self, _key: Hashable, items: list[Any]) -> None:
        with self.lock:
            self.counts.update(items)

    def snapshot(self) -> Counter[Any]:
        with self.lock:
            return Counter(self.counts)


def _run_producers(produce: Callable[[int], None], count: int = PRODUCERS) -> list[threading.Thread]:
    """Start ``produce(index)`` on ``count`` threads released together; errors end up in the returned threads."""
    start = threading.Barrier(count)

    def body(index: int) -> None:
        start.wait(10)
        produce(index)

    threads = [threading.Thread(target=body, args=(i,), name=f"test-producer-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.timeout(120)
def test_thousands_of_keys_made_and_emptied_by_racing_producers_are_each_delivered_once(batch: int) -> None:
    """8 producers put into 12k keys (the lane table splits midway), each key a few times over
    rounds, with a 1 ms window and batches of 1-3: lanes are deleted and remade under the puts."""
    delivered = Delivered()
    engine: BatchEngine[tuple[int, int]] = BatchEngine(delivered, name="hostile", window=0.001, max_batch_size=batch)
    keys, rounds = 12_000, 3
    errors: list[BaseException] = []

    def produce(index: int) -> None:
        try:
            for r in range(rounds):
                for k in range(index, keys, PRODUCERS):
                    # Two producers share each key (k and k ^ 1 land on neighbours), so appends race.
                    key = k // 2
                    assert engine.put((index, r * keys + k), key)
        except BaseException as error:
            errors.append(error)

    _join(_run_producers(produce))
    assert not errors, errors
    assert engine.flush(60)
    counts = delivered.snapshot()
    expected = {(i, r * keys + k) for i in range(PRODUCERS) for r in range(rounds) for k in range(i, keys, PRODUCERS)}
    assert set(counts) == expected, f"lost {len(expected - set(counts))}"
    assert max(counts.values()) == 1, [item for item, n in counts.items() if n > 1][:5]
    assert engine.pending() == 0 and engine.in_flight() == 0
    assert len(engine._lanes) <= 1  # every keyed lane emptied was deleted
    assert keys // 2 > SPLIT_AT  # the table did split during the race
    assert engine.close(10)


@pytest.mark.timeout(120)
def test_flush_racing_producers_on_thousands_of_keys_waits_for_every_put_before_it() -> None:
    """A flusher calls flush() over and over while 6 producers put into 8k short-lived keys: each
    True flush found every entry whose put returned before the flush delivered."""
    delivered = Delivered()
    engine: BatchEngine[tuple[int, int]] = BatchEngine(delivered, name="hostile", window=0.001, max_batch_size=2)
    producers, per_producer, keys = 6, 6000, 8000
    returned: list[list[tuple[int, int]]] = [[] for _ in range(producers)]
    errors: list[BaseException] = []

    def produce(index: int) -> None:
        try:
            mine = returned[index]
            for i in range(per_producer):
                item = (index, i)
                engine.put(item, (index * per_producer + i) % keys)
                mine.append(item)  # after put returned
        except BaseException as error:
            errors.append(error)

    threads = _run_producers(produce, producers)
    flushes = 0
    try:
        while any(thread.is_alive() for thread in threads) or not flushes:
            before = [list(mine) for mine in returned]
            assert engine.flush(60)
            flushes += 1
            counts = delivered.snapshot()
            missing = [item for mine in before for item in mine if item not in counts]
            assert not missing, f"flush {flushes} returned without {len(missing)} entries put before it: {missing[:5]}"
    finally:
        _join(threads)
    assert not errors, errors
    assert engine.flush(60)
    counts = delivered.snapshot()
    assert sum(counts.values()) == producers * per_producer and max(counts.values()) == 1
    assert engine.close(10)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.timeout(120)
def test_close_racing_producers_delivers_every_accepted_entry_exactly_once(batch: int) -> None:
    """close(timeout) while 8 producers put into 2k keys: every put that returned True is delivered
    once (a put racing the close may be accepted; the drain or a late kick delivers it), every put
    that raised DispatcherClosedError is not, and the worker ends."""
    delivered = Delivered()
    engine: BatchEngine[tuple[int, int]] = BatchEngine(delivered, name="hostile", window=0.001, max_batch_size=batch)
    accepted: list[list[tuple[int, int]]] = [[] for _ in range(PRODUCERS)]
    refused: list[list[tuple[int, int]]] = [[] for _ in range(PRODUCERS)]
    started = threading.Barrier(PRODUCERS + 1)

    def produce(index: int) -> None:
        started.wait(10)
        for i in range(1_000_000):
            item = (index, i)
            try:
                engine.put(item, i % 2000)
            except DispatcherClosedError:
                refused[index].append(item)
                return
            accepted[index].append(item)

    threads = [threading.Thread(target=produce, args=(i,), name=f"test-producer-{i}") for i in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    started.wait(10)
    wait_for(lambda: sum(map(len, accepted)) >= 20_000, 30, message="producers well under way")
    engine.close(30)
    _join(threads)
    every = [item for mine in accepted for item in mine]
    # A put that appended just before the close ended is delivered by a worker its kick starts.
    wait_for(lambda: sum(delivered.snapshot().values()) >= len(every), 30, message="every accepted entry delivered")
    assert engine.close(10)
    counts = delivered.snapshot()
    assert set(counts) == set(every), f"lost {len(set(every) - set(counts))}"
    assert max(counts.values()) == 1
    assert not any(item in counts for mine in refused for item in mine)


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
@pytest.mark.timeout(120)
def test_drop_policies_with_racing_producers_on_many_keys_deliver_or_report_every_entry(overflow: Overflow) -> None:
    """Bound 128 (lock-free below 112), 8 producers, 64 keys, a slow deliver: every entry is either
    delivered or handed to on_drop, never both, never twice; a put that returned False was dropped."""
    delivered = Delivered()
    gate = threading.Semaphore(0)

    def deliver(key: Hashable, items: list[Any]) -> None:
        gate.acquire(timeout=30)  # each batch waits for a permit: the lanes fill up to their bound
        delivered(key, items)

    dropped: list[Any] = []
    dropped_lock = threading.Lock()

    def on_drop(items: list[Any]) -> None:
        with dropped_lock:
            dropped.extend(items)

    engine: BatchEngine[tuple[int, int]] = BatchEngine(
        deliver,
        name="hostile",
        window=0.001,
        max_batch_size=3,
        max_queue_size=128,
        overflow=overflow,
        on_drop=on_drop,
    )
    per_producer = 4000
    refused: list[tuple[int, int]] = []
    refused_lock = threading.Lock()
    releaser_stop = threading.Event()

    def release() -> None:
        while not releaser_stop.is_set():
            gate.release()
            releaser_stop.wait(0.0005)

    releaser = threading.Thread(target=release, name="test-releaser")
    releaser.start()

    def produce(index: int) -> None:
        for i in range(per_producer):
            if not engine.put((index, i), i % 64):
                with refused_lock:
                    refused.append((index, i))

    try:
        _join(_run_producers(produce))
        for _ in range(100_000):
            gate.release()  # let the rest through
        assert engine.flush(60)
    finally:
        releaser_stop.set()
        releaser.join(10)
        for _ in range(100_000):
            gate.release()
    assert engine.close(30)
    counts = delivered.snapshot()
    drops = Counter(dropped)
    assert max(counts.values()) == 1 and (not drops or max(drops.values()) == 1)
    assert not set(counts) & set(drops)
    assert set(counts) | set(drops) == {(p, i) for p in range(PRODUCERS) for i in range(per_producer)}
    assert set(refused) <= set(drops)
    assert engine.dropped == len(dropped)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.timeout(120)
def test_batched_submit_futures_of_racing_producers_on_many_targets_all_settle(batch: int) -> None:
    """BatchedDispatcher with 8 producers over 3k targets, 1 ms windows: every Future submit returned
    gets its own message's id, and send_batch saw each message once; close racing the submits
    settles the rest (sent, or failed with DispatcherClosedError)."""
    sent: Counter[int] = Counter()
    sent_lock = threading.Lock()

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        with sent_lock:
            sent.update(messages)
        return [f"id-{m}" for m in messages]

    dispatcher: BatchedDispatcher[int] = BatchedDispatcher(
        send_batch, max_batch_size=batch, flush_interval=0.001, max_concurrent_sends=3
    )
    futures: list[list[tuple[int, Future[str | None]]]] = [[] for _ in range(PRODUCERS)]
    per_producer = 3000
    closing = threading.Event()

    def produce(index: int) -> None:
        for i in range(per_producer):
            message = index * per_producer + i
            if i == per_producer // 2 and index == 0:
                closing.set()
            try:
                futures[index].append((message, dispatcher.submit(message, f"t{message % 3000}")))
            except DispatcherClosedError:
                return

    threads = _run_producers(produce)
    closing.wait(30)
    closed = dispatcher.close(30)
    _join(threads)
    every = [pair for mine in futures for pair in mine]
    wait_for(lambda: all(future.done() for _m, future in every), 30, message="every Future settled")
    assert dispatcher.close(10) or not closed
    for message, future in every:
        error = future.exception(0)
        if error is None:
            assert future.result(0) == f"id-{message}"
        else:
            assert isinstance(error, DispatcherClosedError), error
    with sent_lock:
        assert not sent or max(sent.values()) == 1
        sent_ok = {m for m, f in every if f.exception(0) is None}
        assert sent_ok <= set(sent)


@pytest.mark.parametrize("prioritized", [False, True])
@pytest.mark.timeout(120)
def test_endpoint_jobs_of_racing_producers_over_many_endpoints_with_one_batch_in_flight_all_deliver(
    prioritized: bool,
) -> None:
    """EndpointBatchDispatcher, 8 producers over 2k endpoints, batches of 2, 1 ms windows and at most
    one batch in flight (the gate shut most of the time, lanes held and deleted): every job is sent
    once and ends delivered; shutdown then finds nothing left."""
    sent: Counter[int] = Counter()
    sent_lock = threading.Lock()

    def send_batch(_endpoint: Hashable, jobs: list[DispatchJob]) -> None:
        with sent_lock:
            sent.update(job.payload for job in jobs)

    dispatcher = EndpointBatchDispatcher(
        send_batch,
        max_batch_size=2,
        batch_timeout=0.001,
        max_concurrent_batches=1,
        enable_prioritization=prioritized,
        overflow="block",
    )
    per_producer = 1500
    jobs: list[list[DispatchJob]] = [[] for _ in range(PRODUCERS)]

    def produce(index: int) -> None:
        for i in range(per_producer):
            job = DispatchJob(f"ep{(index * per_producer + i) % 2000}", index * per_producer + i)
            dispatcher.add_job(job)
            jobs[index].append(job)

    try:
        _join(_run_producers(produce))
        every = [job for mine in jobs for job in mine]
        assert len(every) == PRODUCERS * per_producer

        def all_sent() -> bool:
            with sent_lock:
                return sum(sent.values()) >= len(every)

        wait_for(all_sent, 60, message="every job sent")
        wait_for(lambda: all(job.status == "delivered" for job in every), 30, message="every job delivered")
    finally:
        assert dispatcher.shutdown(30)
    with sent_lock:
        assert set(sent) == {job.payload for job in every} and max(sent.values()) == 1


@pytest.mark.timeout(120)
def test_batched_flush_racing_chained_sends_on_many_targets_settles_every_future_submitted_before_it() -> None:
    """BatchedDispatcher, batches of 2 over 500 targets, 2 send slots (a send chains the full batches
    it finds: take_now), 6 producers: each True flush found every Future submitted before it done."""

    def send_batch(_target: str, messages: list[int]) -> list[str]:
        return [f"id-{m}" for m in messages]

    dispatcher: BatchedDispatcher[int] = BatchedDispatcher(
        send_batch, max_batch_size=2, flush_interval=0.001, max_concurrent_sends=2
    )
    producers, per_producer = 6, 2500
    returned: list[list[tuple[int, Future[str | None]]]] = [[] for _ in range(producers)]

    def produce(index: int) -> None:
        mine = returned[index]
        for i in range(per_producer):
            message = index * per_producer + i
            mine.append((message, dispatcher.submit(message, f"t{message % 500}")))

    threads = _run_producers(produce, producers)
    flushes = 0
    try:
        while any(thread.is_alive() for thread in threads) or not flushes:
            before = [list(mine) for mine in returned]
            assert dispatcher.flush(60)
            flushes += 1
            late = [m for mine in before for m, future in mine if not future.done()]
            assert not late, f"flush {flushes} returned with {len(late)} Futures unsettled: {late[:5]}"
    finally:
        _join(threads)
    assert dispatcher.close(30)
    for message, future in (pair for mine in returned for pair in mine):
        assert future.result(0) == f"id-{message}"
