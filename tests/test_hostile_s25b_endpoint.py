"""Hostile: EndpointBatchDispatcher's concurrent paths lose, duplicate or strand no job.

Attacks this session's changes: a sending thread taking its next batch itself
(``settle_and_take``), delivered jobs leaving the held count with no lock (the ``finished``
list), the producers-waiting counter, and the gate-shut window handling, with many
endpoints, in-flight limits 1..3, failing/partially failing sends, retries, priorities and
every overflow policy, racing producers, ``process_all_batches`` and ``shutdown``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Hashable
from typing import Any

import pytest

from threaddispatch import Constant, RetryPolicy
from threaddispatch.endpoint import DispatchJob, EndpointBatchDispatcher
from threaddispatch.errors import DispatcherClosedError, QueueFullError
from threaddispatch.testing import live_dispatch_threads, wait_for

pytestmark = pytest.mark.timeout(120)

ENDPOINTS = 37
PRODUCERS = 4


class Recorder:
    """send_batch: fails jobs by their payload, records each delivery (by job id) and each call's size."""

    def __init__(self, fail_times: int = 1, always_fail_mod: int = 0, raise_mod: int = 0) -> None:
        self.lock = threading.Lock()
        self.delivered: Counter[str] = Counter()
        self.tries: Counter[str] = Counter()
        self.fail_times = fail_times  # jobs with payload % 5 == 0 fail their first this-many tries
        self.always_fail_mod = always_fail_mod  # payload % this == 1: fails every try
        self.raise_mod = raise_mod  # a call whose first payload % this == 2 raises (the whole batch fails)
        self.calls = 0
        self.max_batch = 0

    def __call__(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> list[object] | None:
        with self.lock:
            self.calls += 1
            self.max_batch = max(self.max_batch, len(jobs))
            for job in jobs:
                assert job.endpoint_id == endpoint_id, (job, endpoint_id)
                self.tries[job.id] += 1
            first = jobs[0]
            if self.raise_mod and first.payload % self.raise_mod == 2 and self.tries[first.id] == 1:
                raise ConnectionError(f"batch of {first.id} down")
            outcomes: list[object] = []
            for job in jobs:
                p = job.payload
                if self.always_fail_mod and p % self.always_fail_mod == 1:
                    outcomes.append(False)
                elif p % 5 == 0 and self.tries[job.id] <= self.fail_times:
                    outcomes.append(ConnectionError(f"job {p} refused"))
                else:
                    outcomes.append(True)
                    self.delivered[job.id] += 1
            # All delivered: None, the path where the jobs leave the held count with no lock.
            return None if all(o is True for o in outcomes) else outcomes


def produce(d: EndpointBatchDispatcher, jobs: list[DispatchJob], errors: list[BaseException], **kw: Any) -> None:
    try:
        for job in jobs:
            d.add_job(job, **kw)
    except BaseException as exc:
        errors.append(exc)


def make_jobs(count: int, start: int = 0) -> list[DispatchJob]:
    return [DispatchJob(f"ep-{i % ENDPOINTS}", i, priority=i % 3) for i in range(start, start + count)]


def run_producers(d: EndpointBatchDispatcher, chunks: list[list[DispatchJob]], **kw: Any) -> list[BaseException]:
    errors: list[BaseException] = []
    threads = [threading.Thread(target=produce, args=(d, chunk, errors), kwargs=kw) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a producer is stuck"
    return errors


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_block_bound_with_retries_every_job_once(in_flight: int) -> None:
    """overflow='block' at a small bound while batches settle (lock-free 'finished' path and the
    retry path): every job is delivered exactly once or exhausted, held ends at 0, counters exact."""
    send = Recorder(fail_times=1, always_fail_mod=11, raise_mod=13)
    exhausted: list[str] = []
    lock = threading.Lock()

    def on_exhausted(info: dict[str, Any]) -> None:
        with lock:
            exhausted.append(info["job"].id if "job" in info else info["job_id"])

    d = EndpointBatchDispatcher(
        send,
        max_batch_size=3,
        batch_timeout=0.002,
        max_concurrent_batches=in_flight,
        retry=RetryPolicy(max_attempts=3, backoff=Constant(0.0)),
        max_pending_jobs=7,
        overflow="block",
        name=f"hostile-block-{in_flight}",
    )
    d.on("job_exhausted", on_exhausted)
    jobs = make_jobs(PRODUCERS * 250)
    chunks = [jobs[i::PRODUCERS] for i in range(PRODUCERS)]
    try:
        errors = run_producers(d, chunks, timeout=60)
        assert errors == []
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
    finally:
        assert d.shutdown(timeout=30)
    by_id = {j.id: j for j in jobs}
    statuses = Counter(j.status for j in jobs)
    # A job is delivered at most once, and exactly when its status says so.
    assert max(send.delivered.values()) == 1
    assert {i for i in send.delivered} == {j.id for j in jobs if j.status == "delivered"}
    assert set(statuses) <= {"delivered", "exhausted"}, statuses
    assert sorted(exhausted) == sorted(j.id for j in jobs if j.status == "exhausted")
    # An always-failing job is exhausted after exactly 3 tries; the others are delivered.
    for job_id, job in by_id.items():
        if job.payload % 11 == 1:
            assert job.status == "exhausted" and send.tries[job_id] == 3, job
        else:
            assert job.status == "delivered", job
    s = d.stats()
    assert s["held"] == 0 and s["pending"] == 0 and s["retrying"] == 0 and s["active_batches"] == 0, s
    assert s["exhausted"] == statuses["exhausted"] and s["dropped"] == 0 and s["cancelled"] == 0, s
    assert send.max_batch <= 3


@pytest.mark.parametrize("overflow", ["drop_oldest", "drop_newest", "raise"])
def test_lossy_policies_account_for_every_job(overflow: str) -> None:
    """Each job ends delivered (once), dropped (counted, evented) or refused (still 'new'); nothing held."""
    send = Recorder(fail_times=1)
    dropped_events: list[str] = []
    lock = threading.Lock()

    def on_dropped(info: dict[str, Any]) -> None:
        with lock:
            dropped_events.append(info["job"].id)

    d = EndpointBatchDispatcher(
        send,
        max_batch_size=4,
        batch_timeout=0.002,
        max_concurrent_batches=2,
        retry=RetryPolicy(max_attempts=5, backoff=Constant(0.0)),
        max_pending_jobs=5,
        overflow=overflow,  # type: ignore[arg-type]
        name=f"hostile-{overflow}",
    )
    d.on("job_dropped", on_dropped)
    jobs = make_jobs(PRODUCERS * 300)
    refused: list[DispatchJob] = []

    def produce_keep(chunk: list[DispatchJob]) -> None:
        for job in chunk:
            try:
                d.add_job(job)
            except QueueFullError:
                with lock:
                    refused.append(job)

    threads = [threading.Thread(target=produce_keep, args=(jobs[i::PRODUCERS],)) for i in range(PRODUCERS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
    finally:
        assert d.shutdown(timeout=30)
    statuses = Counter(j.status for j in jobs)
    assert set(statuses) <= {"delivered", "dropped", "new"}, statuses
    assert statuses["new"] == len(refused)
    assert all(j.status == "new" for j in refused)
    assert max(send.delivered.values()) == 1
    assert set(send.delivered) == {j.id for j in jobs if j.status == "delivered"}
    dropped = {j.id for j in jobs if j.status == "dropped"}
    assert sorted(dropped_events) == sorted(dropped)
    assert d.total_dropped == len(dropped) == d.stats()["dropped"]
    if overflow == "raise":
        assert not dropped
    else:
        assert not refused
    # A dropped job was never delivered.
    assert not dropped & set(send.delivered)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_process_all_batches_races_the_sending_threads(in_flight: int) -> None:
    """process_all_batches on two caller threads beside the worker and the sending threads:
    no job is sent twice, none is lost; shutdown settles every one."""
    send = Recorder(fail_times=0)
    d = EndpointBatchDispatcher(
        send,
        max_batch_size=2,
        batch_timeout=0.001,
        max_concurrent_batches=in_flight,
        retry=RetryPolicy(max_attempts=2, backoff=Constant(0.0)),
        name=f"hostile-process-{in_flight}",
    )
    jobs = make_jobs(1200)
    stop = threading.Event()
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            while not stop.is_set():
                d.process_all_batches()
        except BaseException as exc:
            errors.append(exc)

    drainers = [threading.Thread(target=drain) for _ in range(2)]
    for t in drainers:
        t.start()
    try:
        errors += run_producers(d, [jobs[i::PRODUCERS] for i in range(PRODUCERS)])
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
    finally:
        stop.set()
        for t in drainers:
            t.join(30)
        assert d.shutdown(timeout=30)
    assert errors == []
    assert all(j.status == "delivered" for j in jobs), Counter(j.status for j in jobs)
    assert len(send.delivered) == len(jobs) and max(send.delivered.values()) == 1


def test_shutdown_racing_producers_and_settling_sends() -> None:
    """shutdown while producers add and sending threads settle and take their next batch: every
    accepted job is delivered exactly once, every refused one keeps 'new', held ends at 0."""
    send = Recorder(fail_times=1)
    d = EndpointBatchDispatcher(
        send,
        max_batch_size=3,
        batch_timeout=0.001,
        max_concurrent_batches=2,
        retry=RetryPolicy(max_attempts=4, backoff=Constant(0.0)),
        name="hostile-shutdown-race",
    )
    jobs = make_jobs(PRODUCERS * 400)
    accepted = threading.Semaphore(0)
    refused: list[DispatchJob] = []
    lock = threading.Lock()

    def produce_until_closed(chunk: list[DispatchJob]) -> None:
        for n, job in enumerate(chunk):
            try:
                d.add_job(job)
            except DispatcherClosedError:
                with lock:
                    refused.extend(chunk[n:])
                return
            accepted.release()

    threads = [threading.Thread(target=produce_until_closed, args=(jobs[i::PRODUCERS],)) for i in range(PRODUCERS)]
    for t in threads:
        t.start()
    for _ in range(300):  # shut down mid-stream, once some jobs are in
        assert accepted.acquire(timeout=30)
    # Retries with delay 0 may still be in the schedule at shutdown: those are cancelled.
    d.shutdown(timeout=30)
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    statuses = Counter(j.status for j in jobs)
    assert set(statuses) <= {"delivered", "new", "cancelled"}, statuses
    assert statuses["new"] == len(refused)
    assert set(send.delivered) == {j.id for j in jobs if j.status == "delivered"}
    assert max(send.delivered.values()) == 1
    s = d.stats()
    assert s["held"] == 0 and s["cancelled"] == statuses["cancelled"], (s, statuses)


def test_hanging_sends_past_send_timeout_are_retried_once_each() -> None:
    """Sends that hang past send_timeout (abandoned) are retried on fresh threads; a late
    result of an abandoned call delivers nothing twice; no job is held at the end."""
    release = threading.Event()
    lock = threading.Lock()
    tries: Counter[str] = Counter()
    delivered: Counter[str] = Counter()
    hung = threading.Semaphore(0)

    def send(_endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        with lock:
            first_try = all(tries[j.id] == 0 for j in jobs)
            for j in jobs:
                tries[j.id] += 1
        if first_try and jobs[0].payload in (0, 13, 26):  # 3 hang: under the 4 abandoned calls allowed
            hung.release()
            release.wait(60)  # abandoned; its result (None) must be ignored
            return
        with lock:
            for j in jobs:
                delivered[j.id] += 1

    d = EndpointBatchDispatcher(
        send,
        max_batch_size=1,
        batch_timeout=0.001,
        max_concurrent_batches=3,
        send_timeout=0.05,
        retry=RetryPolicy(max_attempts=3, backoff=Constant(0.0)),
        name="hostile-hang",
    )
    jobs = make_jobs(40)
    try:
        for job in jobs:
            d.add_job(job)
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
        s = d.stats()
        assert s["call_timeouts"] >= 1
    finally:
        release.set()
        assert d.shutdown(timeout=30)
        wait_for(lambda: d.stats()["abandoned_calls"] == 0, timeout=30, message="abandoned calls ended")
    assert all(j.status == "delivered" for j in jobs), Counter(j.status for j in jobs)
    assert set(delivered) == {j.id for j in jobs} and max(delivered.values()) == 1
    wait_for(
        lambda: not [t for t in live_dispatch_threads() if "hostile-hang" in t.name],
        timeout=30,
        message="the dispatcher's threads left",
    )


@pytest.mark.parametrize("in_flight", [1, 2])
def test_block_waiters_woken_by_lock_free_delivery(in_flight: int) -> None:
    """Adds blocked at the bound are woken when a batch that returns None (the no-lock
    'finished' path) is delivered: each waiter gets in, none waits for its timeout."""
    release = threading.Event()
    inside = threading.Semaphore(0)
    delivered: list[int] = []
    lock = threading.Lock()

    def send(_endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        inside.release()
        assert release.wait(30)
        with lock:
            delivered.extend(j.payload for j in jobs)

    bound = 2 * in_flight
    d = EndpointBatchDispatcher(
        send,
        max_batch_size=2,
        batch_timeout=0.001,
        max_concurrent_batches=in_flight,
        max_pending_jobs=bound,
        overflow="block",
        name=f"hostile-wake-{in_flight}",
    )
    first = [DispatchJob(f"ep-{i}", i) for i in range(bound)]
    waiting = [DispatchJob(f"ep-{i}", 100 + i) for i in range(6)]
    errors: list[BaseException] = []
    try:
        for job in first:
            d.add_job(job)
        for _ in range(in_flight):
            assert inside.acquire(timeout=30)  # every batch held in send_batch: the bound is full
        assert d.stats()["held"] == bound
        with pytest.raises(QueueFullError):
            d.add_job(DispatchJob("ep-x", -1), timeout=0.0)
        adders = [threading.Thread(target=produce, args=(d, [job], errors), kwargs={"timeout": 60}) for job in waiting]
        for t in adders:
            t.start()
        wait_for(lambda: d._core.room_waiters == len(waiting), timeout=30, message="every add waits for room")
        release.set()
        for t in adders:
            t.join(60)
            assert not t.is_alive(), "an add_job stayed blocked after room appeared"
        assert errors == []
        wait_for(lambda: d.stats()["held"] == 0, timeout=30, message="every job settled")
    finally:
        release.set()
        assert d.shutdown(timeout=30)
    assert sorted(delivered) == sorted(j.payload for j in first + waiting)


def test_events_of_each_batch_come_in_order_on_its_thread() -> None:
    """Per batch: batch_started, batch_executed, (batch_execution_error), batch_completed or
    batch_failed, then job_exhausted per exhausted job, all on one thread; each job's job_added
    comes before its first batch_started; each try of a job is in exactly one batch_started."""
    send = Recorder(fail_times=1, always_fail_mod=11, raise_mod=13)
    lock = threading.Lock()
    log: list[tuple[str, str, str]] = []  # (event, batch or job id, thread name)
    added_at: dict[str, int] = {}
    started_jobs: Counter[str] = Counter()
    violations: list[str] = []  # jobs in a batch_started before their job_added

    def listener(event: str) -> Any:
        def record(info: dict[str, Any]) -> None:
            with lock:
                if event == "job_added":
                    added_at[info["job_id"]] = len(log)
                    log.append((event, info["job_id"], threading.current_thread().name))
                    return
                if event == "job_exhausted":
                    log.append((event, info["job_id"], threading.current_thread().name))
                    return
                if event == "batch_started":
                    started_jobs.update(info["job_ids"])
                    # (a listener's exception is only logged: violations are collected instead)
                    violations.extend(j for j in info["job_ids"] if j not in added_at)
                log.append((event, info["batch_id"], threading.current_thread().name))

        return record

    d = EndpointBatchDispatcher(
        send,
        max_batch_size=3,
        batch_timeout=0.002,
        max_concurrent_batches=2,
        retry=RetryPolicy(max_attempts=3, backoff=Constant(0.0)),
        name="hostile-events",
    )
    for event in ("job_added", "batch_started", "batch_executed", "batch_execution_error", "batch_completed",
                  "batch_failed", "job_exhausted"):  # fmt: skip
        d.on(event, listener(event))
    jobs = make_jobs(PRODUCERS * 150)
    try:
        assert run_producers(d, [jobs[i::PRODUCERS] for i in range(PRODUCERS)]) == []
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
    finally:
        assert d.shutdown(timeout=30)
    by_batch: dict[str, list[tuple[str, str]]] = {}
    exhausted_after: dict[str, str] = {}
    last_batch_on: dict[str, str] = {}
    with lock:
        for event, ident, thread in log:
            if event == "job_added":
                continue
            if event == "job_exhausted":
                exhausted_after[ident] = last_batch_on[thread]
                continue
            by_batch.setdefault(ident, []).append((event, thread))
            last_batch_on[thread] = ident
    for batch_id, events in by_batch.items():
        names = [e for e, _ in events]
        assert len({t for _, t in events}) == 1, (batch_id, events)
        assert names in (
            ["batch_started", "batch_executed", "batch_completed"],
            ["batch_started", "batch_executed", "batch_failed"],
            ["batch_started", "batch_executed", "batch_execution_error", "batch_failed"],
        ), (batch_id, names)
    assert sorted(exhausted_after) == sorted(j.id for j in jobs if j.status == "exhausted")
    assert all(by_batch[b][-1][0] == "batch_failed" for b in exhausted_after.values())
    assert violations == []
    assert started_jobs == send.tries  # every try announced once, no batch_started without its send


@pytest.mark.parametrize("in_flight", [1, 2])
def test_gate_shut_while_hundreds_of_windows_close_starves_no_endpoint(in_flight: int) -> None:
    """With every send slot held, 300 endpoints' windows close behind the shut gate (skipped batches
    queue up, cf9a564); once released, each endpoint's jobs are delivered exactly once."""
    release = threading.Event()
    inside = threading.Semaphore(0)
    lock = threading.Lock()
    delivered: Counter[str] = Counter()

    def send(_endpoint_id: Hashable, batch: list[DispatchJob]) -> None:
        inside.release()
        assert release.wait(30)
        with lock:
            delivered.update(job.id for job in batch)

    skipped = threading.Semaphore(0)
    d = EndpointBatchDispatcher(
        send,
        max_batch_size=1000,
        batch_timeout=0.001,
        max_concurrent_batches=in_flight,
        name=f"hostile-gate-{in_flight}",
    )
    d.on("batch_skipped", lambda _info: skipped.release())
    blockers = [DispatchJob(f"blocker-{i}", i) for i in range(in_flight)]
    jobs = [DispatchJob(f"ep-{i % 300}", i) for i in range(1500)]
    try:
        for job in blockers:
            d.add_job(job)
        for _ in blockers:
            assert inside.acquire(timeout=30)  # every slot held: the gate is shut
        for job in jobs:
            d.add_job(job)
        assert skipped.acquire(timeout=30)  # a window closed on the shut gate
        assert d.stats()["held"] == len(jobs) + in_flight
        release.set()
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
    finally:
        release.set()
        assert d.shutdown(timeout=30)
    assert all(j.status == "delivered" for j in jobs + blockers)
    assert set(delivered) == {j.id for j in jobs + blockers} and max(delivered.values()) == 1


@pytest.mark.parametrize("in_flight", [1, 3])
def test_batches_taken_by_sending_threads_keep_priority_then_fifo(in_flight: int) -> None:
    """Jobs queued while every slot is held go, once released, in batches taken by the sending threads
    (settle_and_take): each batch highest priority first, first in first out within a priority, and
    across one endpoint's batches (in_flight 1) the same order overall."""
    release = threading.Event()
    inside = threading.Semaphore(0)
    lock = threading.Lock()
    batches: list[list[tuple[int, int]]] = []

    def send(endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        inside.release()
        assert release.wait(30)
        if endpoint_id == "ep":
            with lock:
                batches.append([(job.priority, job.payload) for job in jobs])

    d = EndpointBatchDispatcher(
        send, max_batch_size=7, batch_timeout=0.001, max_concurrent_batches=in_flight, name=f"hostile-prio-{in_flight}"
    )
    try:
        for i in range(in_flight):
            d.add_job(DispatchJob(f"blocker-{i}", i))
        for _ in range(in_flight):
            assert inside.acquire(timeout=30)
        jobs = [DispatchJob("ep", n, priority=(n * 7) % 5) for n in range(100)]
        for job in jobs:
            d.add_job(job)
        release.set()
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
    finally:
        release.set()
        assert d.shutdown(timeout=30)
    for batch in batches:
        assert batch == sorted(batch, key=lambda pair: (-pair[0], pair[1])), batch
    flat = [pair for batch in batches for pair in batch]
    assert sorted(p for _, p in flat) == list(range(100))
    if in_flight == 1:
        assert flat == sorted(flat, key=lambda pair: (-pair[0], pair[1]))


def test_spooled_block_bound_with_retries_leaves_only_the_exhausted(tmp_path: Any) -> None:
    """With a spool, overflow='block', partial failures and retries from 4 producers: once all settle,
    the spool holds nothing pending, and its dead letters are exactly the exhausted jobs; a new owner
    replays nothing."""
    send = Recorder(fail_times=1, always_fail_mod=11)
    path = tmp_path / "endpoint.spool"
    d = EndpointBatchDispatcher(
        send,
        max_batch_size=4,
        batch_timeout=0.002,
        max_concurrent_batches=2,
        retry=RetryPolicy(max_attempts=2, backoff=Constant(0.0)),
        max_pending_jobs=9,
        overflow="block",
        spool=path,
        name="hostile-spool",
    )
    jobs = [DispatchJob(f"ep-{i % 7}", i) for i in range(PRODUCERS * 60)]
    try:
        assert run_producers(d, [jobs[i::PRODUCERS] for i in range(PRODUCERS)], timeout=60) == []
        wait_for(lambda: d.stats()["held"] == 0, timeout=60, message="every job settled")
        exhausted = sorted(j.id for j in jobs if j.status == "exhausted")
        assert exhausted == sorted(j.id for j in jobs if j.payload % 11 == 1)
        letters = d.spool_dead_letters(limit=10_000)
        assert sorted(letter.entry["i"] for letter in letters) == exhausted  # "i": the job id (spool_entry)
    finally:
        assert d.shutdown(timeout=30)
    assert max(send.delivered.values()) == 1
    assert set(send.delivered) == {j.id for j in jobs if j.status == "delivered"}
    replayed: list[Any] = []
    again = EndpointBatchDispatcher(lambda _e, js: replayed.extend(js), batch_timeout=0.001, spool=path)
    try:
        assert again.stats()["held"] == 0
    finally:
        assert again.shutdown(timeout=30)
    assert replayed == []


def test_shutdown_refuses_adds_blocked_at_the_bound_and_counts_none() -> None:
    """Adds blocked at a full bound while shutdown() waits for held sends: each is refused with
    DispatcherClosedError (its job stays 'new', not held), the held batches are delivered, held ends 0."""
    release = threading.Event()
    inside = threading.Semaphore(0)

    def send(_endpoint_id: Hashable, _jobs: list[DispatchJob]) -> None:
        inside.release()
        assert release.wait(30)

    d = EndpointBatchDispatcher(
        send, max_batch_size=2, batch_timeout=0.001, max_concurrent_batches=2, max_pending_jobs=4, overflow="block"
    )
    first = [DispatchJob(f"ep-{i % 2}", i) for i in range(4)]
    blocked = [DispatchJob("ep-x", 100 + i) for i in range(4)]
    outcomes: list[BaseException | None] = []
    lock = threading.Lock()

    def add(job: DispatchJob) -> None:
        try:
            d.add_job(job, timeout=60)
        except BaseException as exc:
            with lock:
                outcomes.append(exc)
            return
        with lock:
            outcomes.append(None)

    for job in first:
        d.add_job(job)
    for _ in range(2):
        assert inside.acquire(timeout=30)
    adders = [threading.Thread(target=add, args=(job,)) for job in blocked]
    for t in adders:
        t.start()
    wait_for(lambda: d._core.room_waiters == len(blocked), timeout=30, message="every add waits for room")
    result: list[bool] = []
    closer = threading.Thread(target=lambda: result.append(d.shutdown(timeout=30)))
    closer.start()
    try:
        for t in adders:
            t.join(30)
            assert not t.is_alive(), "an add stayed blocked through shutdown"
        assert len(outcomes) == len(blocked) and all(isinstance(o, DispatcherClosedError) for o in outcomes), outcomes
        assert all(job.status == "new" for job in blocked)
    finally:
        release.set()
        closer.join(30)
    assert result == [True]
    assert all(job.status == "delivered" for job in first)
    assert d.stats()["held"] == 0
