"""Crons never overlap: ``engine.cron(..., overlap="skip" | "queue" | "allow")``, stored with the entry.

A tick fires while the entry's previous job is unfinished: ``skip`` (default) stores nothing,
``queue`` stores a job that waits for the previous one (they share a serial lock), ``allow``
stores one that may run alongside.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import Store
from threaddispatch.stores.base import CronEntry, JobRecord
from threaddispatch.testing import wait_for

LATER = 4e9  # "now" for claims: after every tick fired here


def _engine(store: Store, **options: Any) -> JobEngine:
    engine = JobEngine(store, **options)
    engine.register("work", lambda ctx, payload: payload)
    return engine


def _fire(engine: JobEngine, entry: CronEntry, n: float) -> JobRecord:
    """Fire ``entry``'s tick ``n`` seconds after its declaration, as the cron runner does; the job it built."""
    assert entry.last_tick is not None
    tick = entry.last_tick + n
    job = engine._cron_job(entry, engine.definitions()["work"], tick, tick)
    assert engine.store.fire_cron(entry.name, tick=tick, job=job)
    return job


def test_skip_stores_no_job_while_the_previous_is_unfinished(store: Store) -> None:
    engine = _engine(store)
    entry = engine.cron("@every 1s", "work", 1, name="every")
    assert entry.overlap == "skip" and entry.to_dict()["overlap"] == "skip"
    first = _fire(engine, entry, 10.0)
    assert store.get(first.id) is not None
    second = _fire(engine, entry, 11.0)
    assert store.get(second.id) is None  # the tick passed: nothing stored
    assert store.list_crons()[0].last_tick == (entry.last_tick or 0) + 11.0
    assert [job.id for job in store.claim(["default"], 10, worker_id="w", now=LATER)] == [first.id]
    assert store.get(_fire(engine, entry, 12.0).id) is None  # still running: skipped again
    assert store.complete(first.id, worker_id="w", attempts=1, result="1", now=LATER)
    third = _fire(engine, entry, 13.0)
    assert store.get(third.id) is not None


def test_queue_runs_each_ticks_job_after_the_previous(store: Store) -> None:
    engine = _engine(store)
    entry = engine.cron("@every 1s", "work", 1, name="every", overlap="queue")
    first, second = _fire(engine, entry, 10.0), _fire(engine, entry, 11.0)
    assert store.get(first.id) is not None and store.get(second.id) is not None
    assert first.lock == second.lock == "cron:every"
    assert [job.id for job in store.claim(["default"], 10, worker_id="w", now=LATER)] == [first.id]
    assert store.claim(["default"], 10, worker_id="w", now=LATER) == []  # waits for the first
    assert store.complete(first.id, worker_id="w", attempts=1, result="1", now=LATER)
    assert [job.id for job in store.claim(["default"], 10, worker_id="w", now=LATER)] == [second.id]


def test_allow_runs_them_alongside(store: Store) -> None:
    engine = _engine(store)
    entry = engine.cron("@every 1s", "work", 1, name="every", overlap="allow")
    first, second = _fire(engine, entry, 10.0), _fire(engine, entry, 11.0)
    claimed = store.claim(["default"], 10, worker_id="w", now=LATER)
    assert {job.id for job in claimed} == {first.id, second.id}
    assert first.lock is None


def test_overlap_is_stored_and_checked(store: Store) -> None:
    """Re-declaring changes the stored overlap; a bad one is refused naming it, storing nothing."""
    engine = _engine(store)
    engine.cron("@every 1s", "work", name="every", overlap="allow")
    assert engine.get_cron("every").overlap == "allow"
    engine.cron("@every 1s", "work", name="every", overlap="queue")
    assert engine.get_cron("every").overlap == "queue"
    engine.disable_cron("every")
    engine.enable_cron("every")
    assert engine.get_cron("every").overlap == "queue"
    with pytest.raises(ConfigurationError, match="'sometimes'"):
        engine.cron("@every 1s", "work", name="other", overlap="sometimes")
    assert [entry.name for entry in engine.crons()] == ["every"]


@pytest.mark.timeout(60)
def test_a_running_cron_job_is_not_started_again(store: Store) -> None:
    """A started engine: while the first tick's job runs, later ticks pass and start nothing."""
    engine = JobEngine(store, poll_interval=0.01, max_poll_interval=0.05, concurrency=4)
    started = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    def slow(ctx: JobContext, payload: object) -> None:
        runs.append(ctx.id)
        started.set()
        release.wait(30)

    engine.register("slow", slow)
    entry = engine.cron("@every 0.2s", "slow", name="slow")
    engine.start()
    try:
        assert started.wait(30)
        first_tick: float = wait_for(lambda: engine.get_cron("slow").last_tick, timeout=30) or 0.0
        wait_for(lambda: (engine.get_cron("slow").last_tick or 0) >= first_tick + 0.6, timeout=30)  # 3 more ticks
        assert len(runs) == 1
        assert sum(engine.counts().values()) == 1
    finally:
        release.set()
        engine.stop(10)
    assert entry.overlap == "skip"
