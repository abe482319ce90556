"""Crons live in the store: a worker fires every stored cron whose job it registered, whoever declared it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta, timezone
from typing import Any

import pytest
from conftest import SHARED_STORE_PARAMS

from threaddispatch.backoff import Constant
from threaddispatch.cron import parse
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store
from threaddispatch.testing import wait_for

FAST: dict[str, Any] = {
    "poll_interval": 0.01,
    "max_poll_interval": 0.05,
    "heartbeat_interval": 0.05,
    "stale_job_threshold": 0.3,
    "shutdown_timeout": 5.0,
    "backoff": Constant(0.01),
}


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stores that two engines can share, each with its own store object (not memory)."""
    kind: str = request.param
    return kind


@pytest.fixture
def make_engine(make_store: Callable[[], Store]) -> Iterator[Callable[..., JobEngine]]:
    """Engines on one database (each its own store, as two processes would have); all stopped at teardown."""
    engines: list[JobEngine] = []

    def make(**options: Any) -> JobEngine:
        engine = JobEngine(make_store(), **{**FAST, **options})
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(5)


class CronRecorder:
    """An extension recording ``on_cron_fired`` calls."""

    def __init__(self) -> None:
        self.fired: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def on_cron_fired(self, name: str, job_id: str) -> None:
        with self.lock:
            self.fired.append((name, job_id))

    def calls(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.fired)


@pytest.mark.timeout(60)
def test_a_cron_stored_by_another_engine_fires_where_its_job_is_registered(
    make_engine: Callable[..., JobEngine],
) -> None:
    """Engine A declares the cron and never starts; engine B only registered the handler and fires it."""
    declaring = make_engine()
    declaring.register("tick", lambda ctx, payload: None)
    declaring.cron("@every 0.2s", "tick", {"n": 1}, name="ticker")
    recorder = CronRecorder()
    worker = make_engine(extensions=[recorder])
    ran: list[object] = []
    worker.register("tick", lambda ctx, payload: ran.append(payload))
    worker.start()
    wait_for(lambda: worker.counts()["completed"] >= 2, 30, message="the stored cron fired in the worker")
    worker.stop(5)
    assert ran[:2] == [{"n": 1}, {"n": 1}]
    fired = recorder.calls()
    assert len(fired) >= 2 and {name for name, _ in fired} == {"ticker"}
    for _, job_id in fired:
        job = worker.get_job(job_id)
        assert job.name == "tick" and (job.unique_key or "").startswith("cron:ticker:")


@pytest.mark.timeout(60)
def test_a_stored_cron_for_an_unregistered_job_warns_once(
    make_engine: Callable[..., JobEngine], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that cannot run a stored cron's job says so once, however many turns its cron loop makes."""
    declaring = make_engine()
    declaring.register("report", lambda ctx, payload: None)
    declaring.cron("@every 0.1s", "report", name="reports")
    worker = make_engine()
    worker.register("tick", lambda ctx, payload: None)
    worker.cron("@every 0.1s", "tick", name="ticker")
    caplog.set_level(logging.WARNING, logger="threaddispatch.jobs")
    worker.start()
    # Each tick of "ticker" is a turn of the cron loop, which lists the stored crons again.
    wait_for(lambda: worker.counts()["completed"] >= 4, 30, message="several cron loop turns")
    worker.stop(5)
    records = [r for r in caplog.records if "'reports'" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "report" in records[0].getMessage() and "not registered" in records[0].getMessage()
    # Only ticks were made (a tick fired just before stop() may still be pending: not counted as done).
    assert all(job.name == "tick" for job in worker.list_jobs(limit=1000))


def _fired(engine: JobEngine, name: str) -> set[str]:
    """Ids of the jobs the cron entry ``name`` enqueued."""
    return {job.id for job in engine.list_jobs(limit=1000) if (job.unique_key or "").startswith(f"cron:{name}:")}


@pytest.mark.timeout(60)
def test_a_deleted_cron_stops_firing_in_the_engine_that_declared_it(make_engine: Callable[..., JobEngine]) -> None:
    """remove_cron by another engine (or DELETE /crons/{name}) stops the declaring engine firing it."""
    declaring = make_engine()
    declaring.register("tick", lambda ctx, payload: None)
    declaring.cron("@every 0.1s", "tick", name="ticker")
    declaring.cron("@every 0.1s", "tick", name="witness")
    declaring.start()
    wait_for(lambda: _fired(declaring, "ticker") and _fired(declaring, "witness"), 30, message="both crons fired")
    assert make_engine().remove_cron("ticker")
    seen = _fired(declaring, "ticker")
    # Each "witness" tick is a turn of the cron loop, which lists the store again (without "ticker").
    start = len(_fired(declaring, "witness"))
    wait_for(lambda: len(_fired(declaring, "witness")) >= start + 3, 30, message="witness kept firing")
    declaring.stop(5)
    assert len(_fired(declaring, "ticker") - seen) <= 1  # at most a tick fired before the next listing


def test_a_zone_travels_with_the_stored_expression(make_engine: Callable[..., JobEngine]) -> None:
    """cron(tz=...) stores the zone as a CRON_TZ= prefix, so every process reads the ticks in that zone."""
    engine = make_engine()
    engine.register("tick", lambda ctx, payload: None)
    entry = engine.cron("30 2 * * *", "tick", tz="Europe/Berlin", name="berlin")
    assert entry.expression == "CRON_TZ=Europe/Berlin 30 2 * * *"
    stored = parse(entry.expression)
    local = parse("30 2 * * *", tz="Europe/Berlin")
    assert [stored.next_after(t) for t in (0.0, 1e9, 1.7e9)] == [local.next_after(t) for t in (0.0, 1e9, 1.7e9)]
    assert engine.cron("@every 1m", "tick", name="plain").expression == "@every 1m"
    assert engine.cron("0 * * * *", "tick", tz="UTC", name="utc").expression == "CRON_TZ=UTC 0 * * * *"
    with pytest.raises(ConfigurationError, match="no IANA name"):
        engine.cron("0 * * * *", "tick", tz=timezone(timedelta(hours=2)), name="fixed")
