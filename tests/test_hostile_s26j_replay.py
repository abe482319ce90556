"""Hostile: replaying a dead letter, once, twice at once, and what the replayed job keeps.

The promises attacked: ``lock=`` (README, "Dependencies, chains and serial locks") "lets at
most one job holding that lock run at a time across every worker process", and
``@engine.job(lock=lambda payload: ...)`` gives every job of that name its lock; a
``unique_key`` "returns the id of a pending job with the same key instead of adding
another"; ``replay(id)`` enqueues the dead letter's job again and deletes the dead letter
(``Store.replay_dead_letter``: atomically, so a dead letter is replayed once however many
ask at once: threads, the admin API over a real socket, the engine).

What failed (fixed): the replayed job was built from the dead letter alone (``JobEngine.replay``,
``new_record`` without ``lock``/``unique_key``/``depends_on``), so it held neither the serial
lock of its registration nor its unique key nor its dependencies. A replayed job then ran
beside the lock's holder, an enqueue with its key added a second job, and a replayed
dependent read no dependency results. The concurrent replay held (one new job), and holds.
Everything runs on the test's thread or on bounded threads of its own, with the store's
claim called directly (no engine threads): state, not timing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.client import HTTPConnection
from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch.admin import make_server, make_wsgi_app
from threaddispatch.errors import JobNotFoundError
from threaddispatch.stores import Store

TOKEN = "s26j-token"


def _engine(store: Store) -> JobEngine:
    engine = JobEngine(store)

    def build(ctx: Any, payload: dict[str, Any]) -> int:
        if payload.get("fail"):
            raise RuntimeError("boom")
        return 1

    engine.register("build", build, max_retries=0, lock=lambda payload: f"customer:{payload['c']}")
    return engine


def _dead_letter(engine: JobEngine, **options: Any) -> str:
    """The id of the dead letter of one failed 'build' job of customer 1."""
    failed = engine.enqueue("build", {"c": 1, "fail": True}, **options)
    engine.run_pending()
    assert engine.get_job(failed).state.value == "failed"
    (letter,) = [letter for letter in engine.dlq() if letter.job_id == failed]
    return letter.id


def test_a_replayed_job_keeps_its_registrations_serial_lock(store: Store) -> None:
    """While another job of customer 1's lock runs, the replayed job of that lock is not claimed."""
    engine = _engine(store)
    try:
        letter_id = _dead_letter(engine)
        holder = engine.enqueue("build", {"c": 1})
        claimed = store.claim(["default"], 5, worker_id="w1", now=time.time())
        assert [job.id for job in claimed] == [holder]
        replayed = engine.replay(letter_id)
        again = store.claim(["default"], 5, worker_id="w2", now=time.time())
        assert [job.id for job in again] == [], "the replayed job was claimed while its lock's holder runs"
        assert engine.get_job(replayed).lock == "customer:1"
    finally:
        engine.stop()


def test_a_replayed_job_keeps_its_unique_key(store: Store) -> None:
    """After a replay, an enqueue with the failed job's unique_key returns the replayed job's id (retry() does)."""
    engine = _engine(store)
    try:
        letter_id = _dead_letter(engine, unique_key="report:1")
        replayed = engine.replay(letter_id)
        assert engine.get_job(replayed).state.value == "pending"
        assert engine.enqueue("build", {"c": 1}, unique_key="report:1") == replayed
    finally:
        engine.stop()


def test_retry_keeps_the_lock_and_the_unique_key(store: Store) -> None:
    """The reference: retry() of the same failed job keeps both (requeue keeps the record)."""
    engine = _engine(store)
    try:
        failed = engine.enqueue("build", {"c": 1, "fail": True}, unique_key="report:1")
        engine.run_pending()
        holder = engine.enqueue("build", {"c": 1})
        assert [job.id for job in store.claim(["default"], 5, worker_id="w1", now=time.time())] == [holder]
        engine.retry(failed)
        assert store.claim(["default"], 5, worker_id="w2", now=time.time()) == []
        assert engine.enqueue("build", {"c": 1}, unique_key="report:1") == failed
    finally:
        engine.stop()


class _Admin:
    def __init__(self, engine: JobEngine) -> None:
        self.httpd = make_server(make_wsgi_app(engine, "/api", token=TOKEN), "127.0.0.1", 0)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="threaddispatch-test-s26j-admin"
        )
        self.thread.start()

    def post(self, path: str) -> tuple[int, Any]:
        conn = HTTPConnection("127.0.0.1", self.httpd.server_port, timeout=30)
        try:
            conn.request("POST", path, headers={"Authorization": f"Bearer {TOKEN}"})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.mark.timeout(120)
def test_one_dead_letter_replayed_at_once_by_threads_and_the_admin_api_makes_one_job(store: Store) -> None:
    """Four threads (two engine.replay, two POST /dlq/{id}/replay) race on each of 20 dead letters: one new job each."""
    engine = _engine(store)
    admin = _Admin(engine)
    try:
        letters = [_dead_letter(engine) for _ in range(20)]
        for letter_id in letters:
            barrier = threading.Barrier(4, timeout=30)
            outcomes: list[object] = []
            lock = threading.Lock()

            def by_engine(letter: str = letter_id, gate: threading.Barrier = barrier) -> None:
                gate.wait()
                try:
                    outcome: object = ("new", engine.replay(letter))
                except JobNotFoundError:
                    outcome = "gone"
                with lock:
                    outcomes.append(outcome)

            def by_admin(letter: str = letter_id, gate: threading.Barrier = barrier) -> None:
                gate.wait()
                status, body = admin.post(f"/api/dlq/{letter}/replay")
                outcome: object = (
                    "gone" if status == 404 else ("new", body.get("id", body)) if status == 200 else (status, body)
                )
                with lock:
                    outcomes.append(outcome)

            runners: list[Callable[[], None]] = [by_engine, by_engine, by_admin, by_admin]
            threads = [
                threading.Thread(target=fn, name=f"threaddispatch-test-s26j-{i}") for i, fn in enumerate(runners)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not any(thread.is_alive() for thread in threads)
            made = [o for o in outcomes if isinstance(o, tuple) and o[0] == "new"]
            assert len(made) == 1 and outcomes.count("gone") == 3, outcomes
        assert engine.dlq_count() == 0
        assert engine.counts()["pending"] == 20
    finally:
        admin.close()
        engine.stop()


def test_a_replayed_dependent_reads_its_dependencies_results(store: Store) -> None:
    """The README's chain: build_report failed for good once; its replay reads fetch_rows' result as before."""
    engine = JobEngine(store)
    seen: list[list[Any]] = []
    attempts = {"n": 0}

    def fetch_rows(ctx: Any, payload: dict[str, int]) -> list[int]:
        return list(range(payload["n"]))

    def build_report(ctx: Any, payload: dict[str, int]) -> dict[str, int]:
        seen.append(list(ctx.dependency_results))
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise RuntimeError("the warehouse was down")
        (rows,) = ctx.dependency_results
        return {"rows": len(rows)}

    engine.register("fetch_rows", fetch_rows)
    engine.register("build_report", build_report, max_retries=0)
    try:
        _fetch, report = engine.chain(
            engine.job_spec("fetch_rows", {"n": 3}), engine.job_spec("build_report", {"c": 42})
        )
        engine.run_pending()
        engine.run_pending()
        assert engine.get_job(report).state.value == "failed"
        (letter,) = [letter for letter in engine.dlq() if letter.job_id == report]
        replayed = engine.replay(letter.id)
        engine.run_pending()
        assert seen == [[[0, 1, 2]], [[0, 1, 2]]]
        assert engine.get_job(replayed).state.value == "completed"
    finally:
        engine.stop()
