"""The engine keeps a serial lock held while an abandoned handler still runs, and lets go of it in time.

A handler past its timeout, cancelled while it runs, or handed back at stop goes on running
on its thread; the engine stores a lock hold before it ends that claim, heartbeats it, and
releases it when the handler returns, waking its fetcher for the lock's next job. A hold of a
worker whose heartbeat stopped is reaped with its stale jobs. Cron ``overlap="skip"`` and
``"queue"`` see an abandoned run as running. Each handler here waits on an Event, bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from test_stores import job

from threaddispatch import JobEngine
from threaddispatch.jobs import JobContext
from threaddispatch.stores import JobState, MemoryStore, Store
from threaddispatch.testing import wait_for

BOUND = 30.0  # how long a blocked handler waits for its release: a bound, never reached in a passing run


class _Runs:
    """The handlers of the lock running now; every start that found another one running; a release per name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards inside, overlaps and done
        self.inside: list[str] = []
        self.overlaps: list[tuple[str, list[str]]] = []
        self.done: list[str] = []
        self.started: dict[str, threading.Event] = {}
        self.release: dict[str, threading.Event] = {}

    def events(self, name: str) -> tuple[threading.Event, threading.Event]:
        with self.lock:
            return self.started.setdefault(name, threading.Event()), self.release.setdefault(name, threading.Event())

    def run(self, name: str, *, block: bool) -> str:
        started, release = self.events(name)
        with self.lock:
            if self.inside:
                self.overlaps.append((name, list(self.inside)))
            self.inside.append(name)
        started.set()
        try:
            if block:
                release.wait(BOUND)  # ignores ctx.cancelled, as blocking code does
            return name
        finally:
            with self.lock:
                self.inside.remove(name)
                self.done.append(name)

    def release_all(self) -> None:
        with self.lock:
            events = list(self.release.values())
        for event in events:
            event.set()


def _engine(
    store: Store, runs: _Runs, *, timeout: float | None = 0.2, max_retries: int = 0, suffix: str = "", **options: Any
) -> JobEngine:
    """An engine running job "serial" (lock customer:42): payload ``{"name", "block"}``; ``suffix`` marks its runs."""
    settings: dict[str, Any] = {"concurrency": 4, "poll_interval": 0.02, "max_poll_interval": 0.05}
    settings.update(options)
    engine = JobEngine(store, **settings)

    def handler(ctx: JobContext, payload: Any) -> str:
        return runs.run(payload["name"] + suffix, block=payload.get("block", False) and not suffix)

    engine.register("serial", handler, lock="customer:42", max_retries=max_retries, timeout=timeout)
    return engine


def _held(store: Store, job_id: str) -> bool:
    return any(hold.job_id == job_id for hold in store.list_holds())


@pytest.mark.timeout(60)
def test_the_holds_release_when_the_handler_returns_wakes_the_next_job_at_once(store: Store) -> None:
    """The fetcher polls every 30 s here: the next job runs within the bound only because the release woke it."""
    runs = _Runs()
    engine = _engine(store, runs, poll_interval=30.0, max_poll_interval=30.0)
    engine.start()
    try:
        first = engine.enqueue("serial", {"name": "first", "block": True})
        second = engine.enqueue("serial", {"name": "second"})
        assert runs.events("first")[0].wait(10)
        wait_for(lambda: engine.get_job(first).state is JobState.FAILED, timeout=10, message="the timeout")
        assert _held(store, first)
        assert engine.get_job(second).state is JobState.PENDING  # the lock's next job waits for the handler
        runs.events("first")[1].set()
        assert engine.result(second, timeout=10) == "second"
        assert runs.overlaps == [] and runs.done == ["first", "second"]
        assert store.list_holds() == []
    finally:
        runs.release_all()
        assert engine.stop(10)


@pytest.mark.timeout(60)
def test_a_dead_workers_hold_is_reaped_with_its_stale_jobs_and_the_lock_goes_on(store: Store) -> None:
    """A worker's handler timed out, then its process died: its hold's heartbeat stops, the reaper deletes it."""
    first, second = job(queue="default", lock="customer:42"), job(queue="default", lock="customer:42")
    store.enqueue([first, second])
    now = time.time()
    (claimed,) = store.claim(["default"], 10, worker_id="dead-worker", now=now)
    assert store.hold_locks([(first.id, claimed.attempts)], worker_id="dead-worker", now=now) == {first.id}
    assert store.fail(first.id, worker_id="dead-worker", attempts=1, error="timed out", now=now)
    # Nothing heartbeats the dead worker's hold from here on.
    engine = JobEngine(store, poll_interval=0.02, max_poll_interval=0.05, heartbeat_interval=0.05,
                       stale_job_threshold=0.3)  # fmt: skip
    engine.register("task", lambda ctx, payload: "ran")
    engine.start()
    try:
        assert engine.result(second.id, timeout=30) == "ran"
        assert store.list_holds() == []
    finally:
        assert engine.stop(10)


@pytest.mark.timeout(60)
def test_a_hold_of_a_live_handler_is_heartbeaten_past_the_stale_threshold(store: Store) -> None:
    """Cancelled by an operator through the store (as another process's admin API does): the worker learns it
    at its heartbeat, keeps the store's hold alive while the handler runs, then releases it."""
    runs = _Runs()
    engine = _engine(store, runs, timeout=None, heartbeat_interval=0.05, stale_job_threshold=0.3)
    engine.start()
    try:
        first = engine.enqueue("serial", {"name": "first", "block": True})
        second = engine.enqueue("serial", {"name": "second"})
        assert runs.events("first")[0].wait(10)
        assert store.cancel(first, now=time.time(), error="cancelled elsewhere")
        (hold,) = store.list_holds()
        # Beaten again and again past the stale threshold (0.3 s): the reaper, each heartbeat, leaves it.
        wait_for(lambda: any(h.heartbeat_at >= hold.heartbeat_at + 1.0 for h in store.list_holds()), timeout=20,
                 message="the hold's heartbeat")  # fmt: skip
        assert engine.get_job(second).state is JobState.PENDING
        runs.events("first")[1].set()
        assert engine.result(second, timeout=10) == "second"
        assert runs.overlaps == []
        assert store.list_holds() == []
        assert engine.get_job(first).state is JobState.CANCELLED
    finally:
        runs.release_all()
        assert engine.stop(10)


@pytest.mark.timeout(60)
def test_a_job_handed_back_at_stop_keeps_its_lock_while_its_handler_runs(make_store: Any) -> None:
    """stop() past its deadline hands a running job back (pending); another engine takes it only once the handler
    that still runs in the stopped engine has returned, not beside it."""
    store = make_store()
    runs = _Runs()
    stopped = _engine(store, runs, timeout=None, max_retries=3)
    stopped.start()
    first = stopped.enqueue("serial", {"name": "first", "block": True})
    assert runs.events("first")[0].wait(10)
    assert not stopped.stop(0.1)  # handed back
    assert stopped.store.get(first).state is JobState.PENDING  # type: ignore[union-attr]
    assert _held(store, first)
    other_store = store if type(store).__name__ == "MemoryStore" else make_store()
    taker = _engine(other_store, runs, timeout=None, max_retries=3, suffix="-again")
    taker.start()
    try:
        assert taker.get_job(first).state is JobState.PENDING
        runs.events("first")[1].set()
        assert taker.result(first, timeout=20) == "first-again"
        assert runs.overlaps == [] and runs.done == ["first", "first-again"]
        assert store.list_holds() == []
    finally:
        runs.release_all()
        assert taker.stop(10)
        stopped.stop(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlap", ["skip", "queue"])
def test_cron_overlap_counts_a_timed_out_run_whose_handler_still_runs(store: Store, overlap: str) -> None:
    """A tick's job timed out (failed) but its handler runs on: later ticks start nothing beside it."""
    runs = _Runs()
    engine = JobEngine(store, poll_interval=0.01, max_poll_interval=0.05, concurrency=4)
    count = iter(range(1_000_000))

    def slow(ctx: JobContext, payload: object) -> str:
        return runs.run(f"run-{next(count)}", block=True)

    engine.register("slow", slow, timeout=0.1, max_retries=0)
    engine.cron("@every 0.2s", "slow", name="slow", overlap=overlap)
    engine.start()
    try:
        assert runs.events("run-0")[0].wait(30)
        wait_for(lambda: engine.counts()[JobState.FAILED] == 1, timeout=30, message="the first run's timeout")
        assert store.list_holds()
        first_tick: float = engine.get_cron("slow").last_tick or 0.0
        wait_for(lambda: (engine.get_cron("slow").last_tick or 0) >= first_tick + 0.6, timeout=30)  # 3 more ticks
        assert runs.done == [] and list(runs.started) == ["run-0"]  # nothing started beside the abandoned run
        if overlap == "skip":
            assert sum(engine.counts().values()) == 1  # the ticks stored nothing
        else:
            assert engine.counts()[JobState.PENDING] >= 3  # stored, waiting for the lock
        runs.events("run-0")[1].set()
        assert runs.events("run-1")[0].wait(30)  # the next run starts once the abandoned handler returned
        assert runs.overlaps == []
    finally:
        runs.release_all()
        engine.stop(10)


class _SlowHolds(MemoryStore):
    """A MemoryStore whose hold_locks waits (bounded) for the test's go: the handler returns meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.go = threading.Event()

    def hold_locks(self, claims: Sequence[tuple[str, int]], *, worker_id: str, now: float) -> set[str]:
        self.entered.set()
        self.go.wait(BOUND)
        return super().hold_locks(claims, worker_id=worker_id, now=now)


@pytest.mark.timeout(60)
def test_a_handler_returning_while_its_hold_is_written_still_releases_it() -> None:
    """The timeout's hold is being stored when the handler returns: its writer releases it once stored."""
    store = _SlowHolds()
    engine = JobEngine(store, concurrency=4, poll_interval=0.02, max_poll_interval=0.05)
    names: list[str] = []

    def handler(ctx: JobContext, payload: str) -> str:
        if payload == "first":
            store.entered.wait(BOUND)  # returns while the timeout's hold_locks is under way
        names.append(payload)
        return payload

    engine.register("serial", handler, lock="customer:42", max_retries=0, timeout=0.2)
    engine.start()
    try:
        first = engine.enqueue("serial", "first")
        second = engine.enqueue("serial", "second")
        runtime = engine._runtime
        assert runtime is not None
        wait_for(lambda: "returned" in runtime._holds.values(), timeout=20, message="the handler's return")
        store.go.set()
        assert engine.result(second, timeout=20) == "second"
        assert engine.get_job(first).state is JobState.FAILED
        assert names == ["first", "second"] and store.list_holds() == [] and runtime._holds == {}
    finally:
        store.go.set()
        store.entered.set()
        assert engine.stop(10)
