"""``GET /locks`` and ``GET /locks/{key}`` over a real socket: who holds each serial lock.

Two kinds of holder: a running job with a lock (its claim), and a hold (``Store.list_holds``)
that keeps a job's lock past its running state until its handler returns. The admin API
lists them, oldest heartbeat first, with the job's name and state and ``held_by``, capped by
``limit`` with the ``total``; a key shows only its own holds. Holds are made
through the store (claim, ``hold_locks``, fail: deterministic, no worker thread), and once
by a real engine whose handler runs past its timeout. Every store, via the ``store`` fixture.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from test_admin import BASE, TOKEN, Server, assert_error

from threaddispatch.admin import make_wsgi_app
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)

BOUND = 30.0  # how long a blocked handler waits for its release: a bound, never reached in a passing run


@pytest.fixture
def engine(store: Store) -> Iterator[JobEngine]:
    """An engine (not started) with a no-op job ``noop`` registered."""
    made = JobEngine(store)
    made.register("noop", lambda ctx, payload: payload, max_retries=0)
    yield made
    made.stop(5)


@pytest.fixture
def api(engine: JobEngine) -> Iterator[Server]:
    """The admin app for ``engine`` at /api/dispatch with TOKEN, on a real socket."""
    server = Server(make_wsgi_app(engine, token=TOKEN))
    yield server
    server.close()


def held(engine: JobEngine, lock: str, *, heartbeat: float, worker: str = "w") -> str:
    """A failed job of ``lock`` whose handler still runs: its lock kept by a hold heartbeated at ``heartbeat``."""
    job_id = engine.enqueue("noop", {"lock": lock}, lock=lock, priority=1 << 40)
    [claimed] = engine.store.claim(["default"], 1, worker_id=worker, now=time.time() + 1)
    assert claimed.id == job_id
    assert engine.store.hold_locks([(job_id, claimed.attempts)], worker_id=worker, now=heartbeat) == {job_id}
    assert engine.store.fail(job_id, worker_id=worker, attempts=claimed.attempts, error="timed out", now=time.time())
    return job_id


def _path(key: str) -> str:
    return f"{BASE}/locks/{quote(key, safe='')}"


def test_no_holds_is_an_empty_listing_and_the_routes_are_listed(api: Server) -> None:
    """GET /locks with nothing held answers an empty list and a total of 0; the index lists both routes."""
    reply = api.request("GET", f"{BASE}/locks")
    assert (reply.status, reply.body) == (200, {"holds": [], "total": 0})
    assert api.request("GET", _path("customer:42")).body == {"lock": "customer:42", "holds": [], "total": 0}
    routes = api.request("GET", f"{BASE}/").body["routes"]
    assert f"GET {BASE}/locks" in routes and f"GET {BASE}/locks/{{key}}" in routes


def test_holds_are_listed_oldest_heartbeat_first_with_their_jobs(engine: JobEngine, api: Server) -> None:
    """Each hold: lock key, job id, job name and state, attempt, worker id and heartbeat time."""
    now = time.time()
    newer = held(engine, "customer:7", heartbeat=now, worker="w-2")
    older = held(engine, "customer:42", heartbeat=now - 10)
    started = {job_id: engine.get_job(job_id).started_at for job_id in (newer, older)}
    assert None not in started.values()
    reply = api.request("GET", f"{BASE}/locks")
    assert reply.status == 200, reply
    assert reply.body == {
        "holds": [
            {"lock": "customer:42", "job_id": older, "attempts": 1, "worker_id": "w", "heartbeat_at": now - 10,
             "job_name": "noop", "job_state": "failed", "held_by": "outlived", "held_since": started[older]},
            {"lock": "customer:7", "job_id": newer, "attempts": 1, "worker_id": "w-2", "heartbeat_at": now,
             "job_name": "noop", "job_state": "failed", "held_by": "outlived", "held_since": started[newer]},
        ],
        "total": 2,
    }  # fmt: skip


def test_a_running_job_with_a_lock_is_listed_as_its_holder(engine: JobEngine, api: Server) -> None:
    """A claimed job of a lock holds it by its claim: listed with held_by "running", beside an outlived hold."""
    now = time.time()
    outlived = held(engine, "customer:42", heartbeat=now - 10)
    running = engine.enqueue("noop", {}, lock="customer:7")
    free = engine.enqueue("noop", {})  # no lock: running, but holds nothing
    claimed = engine.store.claim(["default"], 5, worker_id="w-run", now=time.time() + 1)
    assert {job.id for job in claimed} == {running, free}
    engine.store.heartbeat([running], worker_id="w-run", now=now)
    holds = api.request("GET", f"{BASE}/locks").body
    assert holds["total"] == 2
    assert [(h["job_id"], h["lock"], h["held_by"], h["job_state"], h["worker_id"]) for h in holds["holds"]] == [
        (outlived, "customer:42", "outlived", "failed", "w"),
        (running, "customer:7", "running", "running", "w-run"),
    ]
    assert holds["holds"][1]["held_since"] == next(job.started_at for job in claimed if job.id == running)
    one = api.request("GET", _path("customer:7")).body
    assert [h["job_id"] for h in one["holds"]] == [running] and one["total"] == 1
    assert engine.store.complete(running, worker_id="w-run", attempts=1, result=None, now=time.time())
    assert [h["job_id"] for h in api.request("GET", f"{BASE}/locks").body["holds"]] == [outlived]


def test_one_keys_holds_whatever_the_key_holds(engine: JobEngine, api: Server) -> None:
    """GET /locks/{key} shows that key's holds only; a key with '/', spaces or non-ASCII is one path segment or more."""
    now = time.time()
    plain = held(engine, "customer:42", heartbeat=now)
    odd_key = " report/nightly été "
    odd = held(engine, odd_key, heartbeat=now)
    one = api.request("GET", _path("customer:42"))
    assert one.status == 200, one
    assert one.body["lock"] == "customer:42" and one.body["total"] == 1
    assert [hold["job_id"] for hold in one.body["holds"]] == [plain]
    other = api.request("GET", _path(odd_key))
    assert other.status == 200, other
    assert [(hold["lock"], hold["job_id"]) for hold in other.body["holds"]] == [(odd_key, odd)]
    slashed = api.request("GET", f"{BASE}/locks/{quote(odd_key, safe='/')}")  # an unencoded '/' reaches it too
    assert slashed.body["holds"] == other.body["holds"]
    assert api.request("GET", _path("customer:4")).body["holds"] == []  # a prefix of a key is another key


def test_limit_caps_the_page_and_total_counts_them_all(engine: JobEngine, api: Server) -> None:
    """``limit`` (1 to 500, default 50) caps the holds shown, oldest first; ``total`` counts every one."""
    now = time.time()
    oldest = held(engine, "a", heartbeat=now - 2)
    held(engine, "b", heartbeat=now - 1)
    held(engine, "c", heartbeat=now)
    reply = api.request("GET", f"{BASE}/locks", params={"limit": 1})
    assert [hold["job_id"] for hold in reply.body["holds"]] == [oldest] and reply.body["total"] == 3
    assert len(api.request("GET", f"{BASE}/locks", params={"limit": 500}).body["holds"]) == 3
    assert api.request("GET", _path("a"), params={"limit": 1}).body["total"] == 1
    for bad in (0, 501, "ten", -1):
        assert_error(api.request("GET", f"{BASE}/locks", params={"limit": bad}), 400, "bad_parameter", "limit")
        assert_error(api.request("GET", _path("a"), params={"limit": bad}), 400, "bad_parameter", "limit")
    assert_error(api.request("GET", f"{BASE}/locks", params={"lock": "a"}), 400, "bad_parameter", "lock")
    assert_error(api.request("GET", f"{BASE}/locks", params={"cursor": "x"}), 400, "bad_parameter", "cursor")


def test_a_hold_whose_job_was_purged_shows_no_name(engine: JobEngine, api: Server) -> None:
    """The job's record purged (retention) while its handler still runs: the hold stays, its name, state and
    start (``held_since``) None."""
    job_id = held(engine, "customer:42", heartbeat=time.time())
    assert engine.store.purge_finished(older_than=time.time() + 60) == 1
    assert engine.store.get(job_id) is None
    [hold] = api.request("GET", f"{BASE}/locks").body["holds"]
    assert (hold["job_id"], hold["job_name"], hold["job_state"], hold["held_since"]) == (job_id, None, None, None)


def test_the_locks_routes_need_the_token_and_refuse_other_methods(engine: JobEngine, api: Server) -> None:
    """No token: 401; a wrong one: 401; POST or DELETE: 405 with Allow; HEAD answers as GET."""
    held(engine, "customer:42", heartbeat=time.time())
    for path in (f"{BASE}/locks", _path("customer:42")):
        assert_error(api.request("GET", path, token=None), 401, "unauthorized")
        assert_error(api.request("GET", path, token="wrong"), 401, "unauthorized")
        refused = api.request("DELETE", path)
        assert_error(refused, 405, "method_not_allowed")
        assert refused.headers["allow"] == "GET, HEAD"
        assert api.request("HEAD", path).status == 200


@pytest.mark.timeout(60)
def test_a_handler_past_its_timeout_is_listed_until_it_returns(store: Store) -> None:
    """A real worker: the timed-out job's hold appears on GET /locks, and goes when its handler returns."""
    started, release = threading.Event(), threading.Event()

    def stuck(ctx: JobContext, payload: Any) -> None:
        started.set()
        release.wait(BOUND)  # ignores ctx.cancelled, as blocking code does

    worker = JobEngine(store, concurrency=2, poll_interval=0.02, max_poll_interval=0.05)
    worker.register("stuck", stuck, lock="report:nightly", timeout=0.2, max_retries=0)
    server = Server(make_wsgi_app(JobEngine(store), token=TOKEN))
    try:
        worker.start()
        job_id = worker.enqueue("stuck", {})
        assert started.wait(BOUND)
        wait_for(lambda: worker.get_job(job_id).state is JobState.FAILED, BOUND, message="the job timed out")

        def listed() -> list[dict[str, Any]]:
            holds: list[dict[str, Any]] = server.request("GET", f"{BASE}/locks").body["holds"]
            return holds

        [hold] = wait_for(listed, BOUND, interval=0.02, message="the hold listed")
        assert (hold["lock"], hold["job_id"], hold["job_name"], hold["job_state"]) == (
            "report:nightly", job_id, "stuck", "failed"
        )  # fmt: skip
        assert hold["worker_id"] == worker.worker_id
        release.set()
        wait_for(lambda: not listed(), BOUND, interval=0.02, message="the hold released")
    finally:
        release.set()
        worker.stop(10)
        server.close()
