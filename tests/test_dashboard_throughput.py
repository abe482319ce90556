"""The dashboard's throughput chart: Store.throughput (each store's and the generic default), the engine's
per-minute buckets and GET /stats/throughput."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from threaddispatch.admin import make_wsgi_app
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(60)

TOKEN = "chart-token"
AUTH = f"Bearer {TOKEN}"


@pytest.fixture
def engine(store: Store) -> Iterator[JobEngine]:
    made = JobEngine(store)
    made.register("noop", lambda ctx, payload: payload)
    made.register("boom", _boom, max_retries=0)
    yield made
    made.stop(5)


def _boom(ctx: object, payload: object) -> object:
    raise RuntimeError("boom")


def _finish(engine: JobEngine, completed: int, failed: int) -> list[float]:
    """Run ``completed`` jobs that complete and ``failed`` that fail; their finish times."""
    ids = [engine.enqueue("noop", i) for i in range(completed)] + [engine.enqueue("boom", i) for i in range(failed)]
    engine.run_pending()
    jobs = [engine.get_job(job_id) for job_id in ids]
    assert [job.state for job in jobs] == [JobState.COMPLETED] * completed + [JobState.FAILED] * failed
    return [job.finished_at for job in jobs if job.finished_at is not None]


def _totals(rows: list[tuple[int, JobState, int]]) -> dict[JobState, int]:
    totals: dict[JobState, int] = {}
    for _index, state, count in rows:
        totals[state] = totals.get(state, 0) + count
    return totals


def test_the_store_counts_finished_jobs_per_bucket(engine: JobEngine) -> None:
    finished = _finish(engine, 3, 2)
    cancelled = engine.enqueue("noop", "never")
    engine.cancel(cancelled)
    since, now = min(finished) - 0.5, max(finished) + 0.5
    rows = engine.store.throughput(since=since, now=now, bucket=3600.0)
    assert sorted(rows, key=lambda row: row[1].value) == [(0, JobState.COMPLETED, 3), (0, JobState.FAILED, 2)]
    # One-second buckets: every job in the bucket its finish time falls in.
    fine = engine.store.throughput(since=since, now=now, bucket=1.0)
    assert _totals(fine) == {JobState.COMPLETED: 3, JobState.FAILED: 2}
    assert {index for index, _state, _count in fine} == {int((t - since) // 1.0) for t in finished}


def test_the_window_is_half_open(engine: JobEngine) -> None:
    finished = _finish(engine, 1, 0)
    assert engine.store.throughput(since=finished[0] + 1e-3, now=finished[0] + 60) == []
    assert engine.store.throughput(since=finished[0] - 60, now=finished[0]) == []
    assert _totals(engine.store.throughput(since=finished[0], now=finished[0] + 1)) == {JobState.COMPLETED: 1}


def test_the_generic_default_agrees_with_the_store(engine: JobEngine) -> None:
    finished = _finish(engine, 4, 1)
    since, now = min(finished) - 30, max(finished) + 30
    default = Store.throughput(engine.store, since=since, now=now, bucket=7.0)
    assert sorted(default) == sorted(engine.store.throughput(since=since, now=now, bucket=7.0))
    assert _totals(default) == {JobState.COMPLETED: 4, JobState.FAILED: 1}


def test_the_engine_buckets_the_last_minutes(engine: JobEngine) -> None:
    finished = _finish(engine, 2, 1)
    buckets = engine.throughput(10)
    assert len(buckets) == 10
    starts = [bucket["start"] for bucket in buckets]
    assert starts == sorted(starts) and all(b - a == 60 for a, b in itertools.pairwise(starts))
    assert starts[0] % 60 == 0 and starts[-1] - 60 <= max(finished) < starts[-1] + 60  # the current minute last
    assert sum(b["completed"] for b in buckets) == 2 and sum(b["failed"] for b in buckets) == 1


@pytest.mark.parametrize("minutes", [0, 1441, -1, True, 1.5, "60"])
def test_the_engine_refuses_a_bad_window(engine: JobEngine, minutes: object) -> None:
    with pytest.raises(ConfigurationError, match="minutes"):
        engine.throughput(minutes)  # type: ignore[arg-type]


def test_the_route_answers_per_minute_counts(engine: JobEngine) -> None:
    _finish(engine, 3, 1)
    app = make_wsgi_app(engine, token=TOKEN)
    assert app.handle("GET", "/stats/throughput").status == 401
    answer = app.handle("GET", "/stats/throughput", query="minutes=60", authorization=AUTH)
    assert answer.status == 200
    data = answer.json()
    assert data["minutes"] == 60 and len(data["buckets"]) == 60
    assert set(data["buckets"][0]) == {"start", "completed", "failed"}
    assert sum(b["completed"] for b in data["buckets"]) == 3 and sum(b["failed"] for b in data["buckets"]) == 1
    assert len(app.handle("GET", "/stats/throughput", authorization=AUTH).json()["buckets"]) == 60


@pytest.mark.parametrize("query", ["minutes=0", "minutes=1441", "minutes=x", "other=1"])
def test_the_route_refuses_bad_parameters(engine: JobEngine, query: str) -> None:
    app = make_wsgi_app(engine, token=TOKEN)
    answer = app.handle("GET", "/stats/throughput", query=query, authorization=AUTH)
    assert answer.status == 400
