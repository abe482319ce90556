"""A job due absurdly far ahead: refused at enqueue; one already stored is shown, never a crash.

``enqueue(delay=)`` and ``enqueue(run_at=)`` take a due time at most
:data:`~threaddispatch._job_enqueue.MAX_DUE_AHEAD` seconds (1e9 s, about 31 years: MAX_WAIT's
number on POSIX) from now; a later one raises ConfigurationError naming it at the call. A stored
time no ``datetime`` can hold (written before this rule, by another client, or far in the
past) is shown by the command line as ``far future (epoch ...)`` / ``far past (epoch ...)``.

Found: ``enqueue(delay=1e15)`` was stored, then ``threaddispatch jobs show`` said "year 31690765 is
out of range" (exit 2, the job unreadable from the command line); a stored ``run_at=1e300`` made it
print an OverflowError traceback.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import datetime, timezone
from typing import Any

import pytest
from conftest import SHARED_STORE_PARAMS
from test_cli import assert_user_error, run

from threaddispatch._job_enqueue import MAX_DUE_AHEAD, new_record
from threaddispatch.admin import make_wsgi_app
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore, Store
from threaddispatch.stores.base import JobState

pytestmark = pytest.mark.timeout(60)

FAR_AHEAD = [1e15, 1e300, MAX_DUE_AHEAD * 2, 10**12]
FAR_IDS = ["1e15", "1e300", "twice-MAX_DUE_AHEAD", "int-1e12"]


@pytest.fixture(params=SHARED_STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The stores the command line, run here as another client would, can open by URL."""
    kind: str = request.param
    return kind


def _engine(store: Store | None = None) -> JobEngine:
    engine = JobEngine(MemoryStore() if store is None else store)
    engine.register("noop", lambda ctx, payload: payload)
    return engine


@pytest.mark.parametrize("delay", FAR_AHEAD, ids=FAR_IDS)
def test_a_delay_past_max_wait_is_refused_at_enqueue(delay: float) -> None:
    """enqueue/enqueue_many(delay=huge): ConfigurationError naming delay and the time asked for; nothing stored."""
    engine = _engine()
    for call in (
        lambda: engine.enqueue("noop", 1, delay=delay),
        lambda: engine.enqueue_many("noop", [1, 2], delay=delay),
    ):
        with pytest.raises(ConfigurationError, match=r"delay/run_at") as refused:
            call()
        assert f"{float(delay):.6g} seconds" in str(refused.value), refused.value
    assert engine.list_jobs() == []


@pytest.mark.parametrize(
    "run_at",
    [time.time() + 2 * MAX_DUE_AHEAD, 1e300, datetime(9999, 12, 31, tzinfo=timezone.utc)],
    ids=["twice-MAX_DUE_AHEAD-ahead", "1e300", "year-9999"],
)
def test_a_run_at_past_max_wait_from_now_is_refused_at_enqueue(run_at: Any) -> None:
    """enqueue(run_at=...) more than MAX_DUE_AHEAD ahead: ConfigurationError; nothing stored."""
    engine = _engine()
    with pytest.raises(ConfigurationError, match=r"at most 1000000000 seconds .*delay/run_at"):
        engine.enqueue("noop", 1, run_at=run_at)
    assert engine.list_jobs() == []


def test_a_delay_of_max_wait_is_accepted_and_due_then() -> None:
    """The bound itself is valid: the job waits, pending, due MAX_DUE_AHEAD seconds from now."""
    engine = _engine()
    before = time.time()
    job = engine.get_job(engine.enqueue("noop", 1, delay=MAX_DUE_AHEAD))
    assert job.state is JobState.PENDING
    assert before + MAX_DUE_AHEAD <= job.run_at <= time.time() + MAX_DUE_AHEAD
    in_the_past = engine.get_job(engine.enqueue("noop", 2, run_at=-1e15))  # due now: still accepted
    assert in_the_past.run_at == -1e15


def _stored_due_at(engine: JobEngine, run_at: float) -> str:
    """A pending job due at ``run_at`` written straight to the store, as an older client could have."""
    now = time.time()
    record = dataclasses.replace(new_record("noop", "1", "default", 0, 3, 300.0, now, now), run_at=run_at)
    [job_id] = engine.store.enqueue([record])
    return job_id


@pytest.mark.parametrize(
    ("run_at", "shown"),
    [(1e300, "far future (epoch 1e+300)"), (1e15, "far future (epoch 1e+15)"), (-1e15, "far past (epoch -1e+15)")],
    ids=["1e300", "1e15", "minus-1e15"],
)
def test_jobs_show_prints_a_stored_time_no_datetime_holds(
    store: Store, store_url: str, run_at: float, shown: str
) -> None:
    """``jobs show``: exit 0, the time shown as far future/past with its epoch value; ``jobs list`` too."""
    engine = _engine(store)
    job_id = _stored_due_at(engine, run_at)
    result = run("jobs", "show", job_id, store=store_url)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("run_at:")]
    assert line.split(":", 1)[1].strip() == shown, line
    listed = run("jobs", "list", store=store_url)
    assert listed.returncode == 0 and job_id in listed.stdout, (listed.stdout, listed.stderr)
    as_json = run("jobs", "list", "--json", store=store_url)
    assert as_json.returncode == 0, as_json.stderr
    assert [job["run_at"] for job in json.loads(as_json.stdout) if job["id"] == job_id] == [run_at]


def test_cli_enqueue_with_a_huge_delay_is_a_one_line_error(store: Store, store_url: str) -> None:
    """``threaddispatch enqueue NAME JSON --delay 1e15``: exit 2, one line naming delay/run_at; nothing stored."""
    result = run("enqueue", "noop", "{}", "--delay", "1e15", store=store_url)
    assert_user_error(result, "delay/run_at", "1e+15 seconds")
    assert store.list_jobs() == []


@pytest.mark.timeout(30)
def test_a_worker_keeps_running_beside_a_stored_far_future_job(store: Store) -> None:
    """An engine claiming from a store that holds a job due at 1e300 runs the other jobs; no thread dies."""
    died: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = died.append
    engine = JobEngine(store, poll_interval=0.01, max_poll_interval=0.05, heartbeat_interval=0.05)
    engine.register("noop", lambda ctx, payload: payload)
    try:
        far = _stored_due_at(engine, 1e300)
        engine.start()
        job_id = engine.enqueue("noop", 7)
        assert engine.result(job_id, timeout=10) == 7
        assert engine.get_job(far).state is JobState.PENDING
    finally:
        assert engine.stop(10)
        threading.excepthook = previous
    assert died == []


@pytest.mark.parametrize("run_at", [1e300, -1e15], ids=["1e300", "minus-1e15"])
def test_the_admin_api_answers_a_stored_time_no_datetime_holds(store: Store, run_at: float) -> None:
    """GET /jobs/<id> and /jobs: 200 with run_at as the stored number (JSON has no date to overflow)."""
    engine = _engine(store)
    job_id = _stored_due_at(engine, run_at)
    app = make_wsgi_app(engine, allow_unauthenticated=True)
    one = app.handle("GET", f"/jobs/{job_id}")
    assert one.status == 200, one.body
    assert one.json()["job"]["run_at"] == run_at
    listing = app.handle("GET", "/jobs")
    assert listing.status == 200, listing.body
    assert [job["run_at"] for job in listing.json()["jobs"] if job["id"] == job_id] == [run_at]
