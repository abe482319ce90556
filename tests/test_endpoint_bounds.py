"""EndpointBatchDispatcher: max_pending_jobs and its overflow policies (block, raise, drop_newest, drop_oldest)."""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable
from typing import Any

import pytest

from threaddispatch import ConfigurationError, Constant, DispatcherClosedError, RetryPolicy
from threaddispatch.endpoint import EVENTS, DispatchJob, EndpointBatchDispatcher
from threaddispatch.errors import QueueFullError
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


class Held:
    """A send_batch that holds every call until released; records what it delivered, in order."""

    def __init__(self, fail_first: int = 0) -> None:
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.inside = 0
        self.fail_first = fail_first  # the first this-many calls fail (after the release)
        self.calls = 0
        self.delivered: list[Any] = []

    def __call__(self, _endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        with self.lock:
            self.inside += 1
        try:
            assert self.release.wait(30), "the test never released send_batch"
            with self.lock:
                self.calls += 1
                if self.calls <= self.fail_first:
                    raise ConnectionError("endpoint down")
                self.delivered.extend(job.payload for job in jobs)
        finally:
            with self.lock:
                self.inside -= 1

    def count_inside(self) -> int:
        with self.lock:
            return self.inside

    def payloads(self) -> list[Any]:
        with self.lock:
            return list(self.delivered)


def make(send: Any, **kwargs: Any) -> EndpointBatchDispatcher:
    kwargs.setdefault("batch_timeout", 60.0)
    kwargs.setdefault("max_batch_size", 2)
    kwargs.setdefault("max_concurrent_batches", 1)
    return EndpointBatchDispatcher(send, **kwargs)


def fill(d: EndpointBatchDispatcher, held: Held, count: int, endpoint: str = "ep") -> list[DispatchJob]:
    """Add ``count`` jobs; the first batch (2 jobs) is then held in send_batch, the rest queued."""
    jobs = [DispatchJob(endpoint, i) for i in range(count)]
    for job in jobs:
        d.add_job(job)
    wait_for(lambda: held.count_inside() == 1, timeout=10, message="the first batch held in send_batch")
    return jobs


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_pending_jobs": 0}, "max_pending_jobs.*0"),
        ({"max_pending_jobs": 2.5}, r"max_pending_jobs.*2\.5"),
        ({"max_pending_jobs": True}, "max_pending_jobs.*True"),
        ({"max_pending_jobs": None}, "max_pending_jobs.*None"),
        ({"overflow": "wait"}, "overflow.*'wait'"),
        ({"overflow": None}, "overflow.*None"),
    ],
)
def test_bad_bounds_are_refused_naming_the_value(kwargs: dict[str, Any], needle: str) -> None:
    """A bad max_pending_jobs or overflow raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match=needle):
        EndpointBatchDispatcher(Held(), **kwargs)


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, "1", True])
def test_a_bad_add_job_timeout_is_refused_and_the_job_stays_new(bad: Any) -> None:
    """add_job(timeout=bad) raises ConfigurationError naming it, whatever the policy; the job is not taken."""
    d = make(Held(), overflow="block")
    job = DispatchJob("ep", 1)
    with pytest.raises(ConfigurationError, match="timeout"):
        d.add_job(job, timeout=bad)
    assert job.status == "new"
    assert d.shutdown(5)


def test_the_default_bound_is_100_000_jobs_and_raises() -> None:
    """By default at most 100_000 jobs are held, and overflow raises."""
    d = EndpointBatchDispatcher(Held(), batch_timeout=60.0)
    assert (d.max_pending_jobs, d.overflow) == (100_000, "raise")
    assert "job_dropped" in EVENTS
    assert d.shutdown(5)


@pytest.mark.timeout(30)
def test_raise_refuses_a_job_past_the_bound_and_counts_in_flight_and_retrying_jobs() -> None:
    """overflow="raise": past max_pending_jobs (queued + in flight + waiting for a retry) add_job raises
    QueueFullError naming the job and the bound; the job stays "new"; room reappears as jobs finish."""
    held = Held(fail_first=1)
    d = make(held, max_pending_jobs=6, overflow="raise", retry=RetryPolicy(max_attempts=5, backoff=Constant(60.0)))
    fill(d, held, 6)  # 0, 1 in flight; 2-5 queued (two full batches)
    extra = DispatchJob("ep", "extra")
    with pytest.raises(QueueFullError, match=r"max_pending_jobs \(6\)") as info:
        d.add_job(extra)
    assert repr(extra) in str(info.value)
    assert extra.status == "new"
    stats = d.stats()
    assert (stats["held"], stats["pending"], stats["active_batches"]) == (6, 4, 1)
    held.release.set()
    # The first batch fails and waits a minute for its retry: those 2 jobs still count.
    wait_for(lambda: held.payloads() == [2, 3, 4, 5], timeout=10, message="the queued jobs delivered")
    wait_for(lambda: d.stats()["held"] == 2, timeout=10, message="the delivered jobs released")
    assert d.stats()["retrying"] == 2
    for i in range(6, 10):
        d.add_job(DispatchJob("ep", i))
    with pytest.raises(QueueFullError):
        d.add_job(DispatchJob("ep", 10))
    assert d.stats()["dropped"] == 0
    assert d.shutdown(10) is False  # the retries, a minute away, are cancelled
    assert held.payloads() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert d.stats()["held"] == 0


@pytest.mark.timeout(30)
def test_block_waits_for_room_then_times_out_and_wakes_when_a_job_finishes() -> None:
    """overflow="block": add_job waits for room up to timeout, then raises QueueFullError; a waiting
    add_job returns once a batch finishes, and every job is delivered."""
    held = Held()
    d = make(held, max_pending_jobs=4, overflow="block")
    fill(d, held, 4)
    with pytest.raises(QueueFullError, match="stayed full"):
        d.add_job(DispatchJob("ep", "late"), timeout=0.05)
    done = threading.Event()
    waiting = DispatchJob("ep", 4)

    def blocked_producer() -> None:
        d.add_job(waiting, timeout=20)
        done.set()

    producer = threading.Thread(target=blocked_producer)
    producer.start()
    wait_for(lambda: d._core.room_waiters == 1, timeout=10, message="the producer waiting for room")
    assert not done.is_set() and waiting.status == "new"  # room comes only when the held batch finishes
    held.release.set()
    assert done.wait(10)
    producer.join(10)
    assert d.shutdown(10)
    assert sorted(held.payloads()) == [0, 1, 2, 3, 4]


@pytest.mark.timeout(30)
def test_a_blocked_add_job_raises_when_shutdown_begins() -> None:
    """An add_job waiting for room raises DispatcherClosedError when shutdown starts; its job is not taken."""
    held = Held()
    d = make(held, max_pending_jobs=2, overflow="block")
    fill(d, held, 2)
    outcome: list[BaseException] = []
    job = DispatchJob("ep", "waiting")

    def blocked_producer() -> None:
        try:
            d.add_job(job, timeout=20)
        except BaseException as error:
            outcome.append(error)

    producer = threading.Thread(target=blocked_producer)
    producer.start()
    wait_for(lambda: d._core.room_waiters == 1, timeout=10, message="the producer waiting for room")
    closer = threading.Thread(target=d.shutdown, args=(10,))
    closer.start()
    producer.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], DispatcherClosedError)
    assert job.status == "new"
    held.release.set()
    closer.join(10)
    assert held.payloads() == [0, 1]


@pytest.mark.timeout(30)
def test_block_inside_send_batch_raises_at_once_instead_of_deadlocking() -> None:
    """add_job from inside send_batch with the bound reached cannot wait (its own batch holds the room):
    it raises QueueFullError at once."""
    outcomes: list[str] = []
    box: list[EndpointBatchDispatcher] = []

    def send(_ep: Hashable, jobs: list[DispatchJob]) -> None:
        if jobs[0].payload == 0:
            try:
                box[0].add_job(DispatchJob("ep", "from inside"), timeout=20)
            except QueueFullError:
                outcomes.append("full")

    d = make(send, max_pending_jobs=2, overflow="block")
    box.append(d)
    d.add_job(DispatchJob("ep", 0))
    d.add_job(DispatchJob("ep", 1))
    wait_for(lambda: outcomes == ["full"], timeout=10, message="the add from inside send_batch refused")
    assert d.shutdown(10)


@pytest.mark.timeout(30)
def test_drop_newest_drops_the_new_job_counts_it_and_emits_job_dropped() -> None:
    """overflow="drop_newest": the job past the bound is not queued; it is marked dropped, counted,
    and announced with job_dropped; the others are delivered."""
    held = Held()
    d = make(held, max_pending_jobs=4, overflow="drop_newest")
    dropped: list[dict[str, Any]] = []
    d.on("job_dropped", dropped.append)
    fill(d, held, 4)
    late = DispatchJob("ep", "late")
    assert d.add_job(late) == late.id
    assert late.status == "dropped" and late.finished_at is not None
    assert [(e["job"], e["reason"], e["max_pending_jobs"]) for e in dropped] == [(late, "max_pending_jobs", 4)]
    stats = d.stats()
    assert (stats["dropped"], stats["held"], d.total_dropped) == (1, 4, 1)
    held.release.set()
    assert d.shutdown(10)
    assert held.payloads() == [0, 1, 2, 3]


@pytest.mark.timeout(30)
def test_drop_oldest_drops_the_job_its_endpoint_would_send_first() -> None:
    """overflow="drop_oldest": the queued job at the head of the new job's endpoint queue makes room; an
    endpoint with nothing queued drops from the longest queue; with nothing queued at all the new one goes."""
    held = Held()
    d = make(held, max_pending_jobs=5, overflow="drop_oldest", enable_prioritization=False)
    dropped: list[DispatchJob] = []
    d.on("job_dropped", lambda event: dropped.append(event["job"]))
    jobs = fill(d, held, 5)  # 0, 1 in flight; 2, 3, 4 queued
    d.add_job(DispatchJob("ep", 5))
    assert dropped == [jobs[2]] and jobs[2].status == "dropped"
    other = DispatchJob("other", "o")
    d.add_job(other)  # "other" has nothing queued: the longest queue ("ep") gives its head
    assert dropped == [jobs[2], jobs[3]]
    assert d.get_pending_job_count("ep") == 2 and d.get_pending_job_count("other") == 1
    stats = d.stats()
    assert (stats["dropped"], stats["held"]) == (2, 5)
    held.release.set()
    assert d.shutdown(10)
    assert sorted(held.payloads(), key=str) == sorted([0, 1, 4, 5, "o"], key=str)


@pytest.mark.timeout(30)
def test_drop_oldest_with_nothing_queued_drops_the_new_job() -> None:
    """When every held job is in flight, drop_oldest has no queued job to drop: the new job is dropped."""
    held = Held()
    d = make(held, max_pending_jobs=2, overflow="drop_oldest")
    fill(d, held, 2)
    late = DispatchJob("ep", "late")
    d.add_job(late)
    assert late.status == "dropped" and d.total_dropped == 1
    held.release.set()
    assert d.shutdown(10)
    assert held.payloads() == [0, 1]


@pytest.mark.timeout(60)
def test_the_bound_holds_under_many_producers_and_nothing_accepted_is_lost() -> None:
    """Many producers against a slow endpoint with overflow="block": the held count never passes the
    bound, and every accepted job is delivered exactly once."""
    delivered: list[Any] = []
    lock = threading.Lock()
    most = 0

    def send(_ep: Hashable, jobs: list[DispatchJob]) -> None:
        with lock:
            delivered.extend(job.payload for job in jobs)

    d = EndpointBatchDispatcher(
        send, max_batch_size=10, batch_timeout=0.01, max_concurrent_batches=2, max_pending_jobs=50, overflow="block"
    )

    def producer(seed: int) -> None:
        for i in range(300):
            d.add_job(DispatchJob(f"ep{i % 7}", (seed, i)), timeout=30)

    def watch(stop: threading.Event) -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, d.stats()["held"])

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    producers = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(60)
    assert d.shutdown(30)
    stop.set()
    watcher.join(10)
    assert most <= 50
    assert sorted(delivered) == sorted((seed, i) for seed in range(4) for i in range(300))
    assert d.stats()["held"] == 0


def test_room_the_sending_threads_made_is_seen_at_the_bound_without_a_stats_read() -> None:
    """A sending thread leaves a delivered batch's count for add_job to take off ``held``, which it does
    only at the bound: so a bound full of delivered jobs admits again, with no stats() call between."""
    d = EndpointBatchDispatcher(
        lambda _endpoint_id, _jobs: None,
        max_batch_size=1,
        batch_timeout=0.01,
        max_concurrent_batches=1,
        max_pending_jobs=4,
        overflow="raise",
    )
    core, engine = d._core, d._core.engine
    for i in range(4):
        d.add_job(DispatchJob(f"ep{i}", i))
    # Settled after its count was left in core.finished: every job is delivered and counted there.
    wait_for(lambda: engine.settled_entries == 4, timeout=10, message="the four jobs delivered")
    assert core.held == 4 and sum(core.finished) == 4  # still counted: nothing took them off yet
    for i in range(4, 8):
        d.add_job(DispatchJob(f"ep{i}", i))  # at the bound: the delivered counts are taken off first
    assert core.finished == []
    assert d.shutdown(10)
    assert d.stats()["held"] == 0


def test_the_delivered_counts_left_for_add_job_stay_few_below_the_bound() -> None:
    """Below the bound add_job takes the delivered counts off only once they pile up: the list stays short."""
    d = EndpointBatchDispatcher(lambda _endpoint_id, _jobs: None, max_batch_size=1, batch_timeout=0.01)
    core, engine = d._core, d._core.engine
    for i in range(200):
        d.add_job(DispatchJob(f"ep{i}", i))
    wait_for(lambda: engine.settled_entries == 200, timeout=10, message="the jobs delivered")
    assert len(core.finished) == 200  # one count per batch of one, none taken off yet
    d.add_job(DispatchJob("ep", "one more"))
    assert core.finished == [] and core.held <= 1
    assert d.shutdown(10)
    assert d.stats()["held"] == 0
