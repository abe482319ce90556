"""A replayed dead letter's new job keeps what the failed job had, and is placed as retry() places one.

``JobEngine.replay`` builds the new job from the failed job's record (its serial ``lock``,
``unique_key``, ``depends_on``), or, once that record was purged, from the dead letter and the
registration's lock; ``Store.replay_dead_letter`` places it in the letter's delete transaction
with the requeue's rules: a held unique key or a failed dependency refuses it (the letter is
kept), an unfinished dependency makes it wait. Every store kind; the store is driven from the
test's thread (``run_pending`` and the store's claim), so the tests read state, not timing.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from threaddispatch import JobEngine
from threaddispatch.admin import make_wsgi_app
from threaddispatch.errors import InvalidStateError, JobNotFoundError
from threaddispatch.stores import Store
from threaddispatch.stores.base import JobState

TOKEN = "replay-token"


def _engine(store: Store, *, failing: bool = True, **options: Any) -> JobEngine:
    """An engine with 'build' (lock per customer; returns its dependencies' results) and 'fetch'.

    With ``failing``, a job whose payload says ``"fail"`` raises; 'build' also raises for a dependency
    without a result (one that failed, for a dependent of policy "run")."""
    engine = JobEngine(store, **options)

    def build(ctx: Any, payload: dict[str, Any]) -> list[Any]:
        results = list(ctx.dependency_results)
        if (failing and payload.get("fail")) or None in results:
            raise RuntimeError("boom")
        return results

    def fetch(ctx: Any, payload: dict[str, Any]) -> int:
        if failing and payload.get("fail"):
            raise RuntimeError("fetch failed")
        return int(payload.get("n", 0))

    engine.register("build", build, max_retries=0, lock=lambda payload: f"customer:{payload['c']}")
    engine.register("fetch", fetch, max_retries=0)
    return engine


def _letter_of(engine: JobEngine, job_id: str) -> str:
    (letter,) = [letter for letter in engine.dlq(limit=500) if letter.job_id == job_id]
    return letter.id


def _failed(engine: JobEngine, payload: dict[str, Any], **options: Any) -> tuple[str, str]:
    """(job id, dead letter id) of one 'build' job that failed for good."""
    job_id = engine.enqueue("build", {**payload, "fail": True}, **options)
    engine.run_pending()
    assert engine.get_job(job_id).state is JobState.FAILED
    return job_id, _letter_of(engine, job_id)


def test_an_enqueue_time_lock_is_kept_over_the_registrations(store: Store) -> None:
    """A job enqueued with lock= keeps that lock when replayed (the original record's, not the registration's)."""
    engine = _engine(store)
    try:
        _job, letter = _failed(engine, {"c": 1}, lock="report:nightly")
        replayed = engine.replay(letter)
        assert engine.get_job(replayed).lock == "report:nightly"
    finally:
        engine.stop()


def test_a_purged_jobs_replay_keeps_what_its_dead_letter_kept(store: Store) -> None:
    """Once the failed job's record is purged the dead letter still has its lock=, unique_key and depends_on."""
    engine = _engine(store)
    manager = JobEngine(store)  # no registration: nothing to recompute a lock from
    try:
        dependency = engine.enqueue("fetch", {"n": 1})
        options: dict[str, Any] = {"unique_key": "report:7", "lock": "report:nightly", "depends_on": [dependency]}
        job_id, letter = _failed(engine, {"c": 7}, **options)
        (kept,) = [kept for kept in engine.dlq() if kept.id == letter]
        assert (kept.lock, kept.unique_key, kept.depends_on, kept.on_dependency_failure) == (
            "report:nightly", "report:7", (dependency,), "cancel",
        )  # fmt: skip
        assert kept.to_dict()["depends_on"] == [dependency]
        assert store.purge_finished(older_than=time.time() + 60) >= 2
        assert engine.store.get(job_id) is None and engine.store.get(dependency) is None
        replayed = manager.replay(letter)
        record = engine.get_job(replayed)
        assert (record.lock, record.unique_key, record.depends_on) == ("report:nightly", "report:7", (dependency,))
        assert record.state is JobState.PENDING and engine.dlq_count() == 0  # a purged dependency blocks nothing
        assert engine.enqueue("build", {"c": 7}, unique_key="report:7") == replayed
    finally:
        manager.stop()
        engine.stop()


def test_a_management_engine_replays_with_the_failed_jobs_lock_and_key(store: Store) -> None:
    """An engine without the handlers (the CLI's, the admin's) keeps the record's lock, key and timeout."""
    worker = _engine(store)
    manager = JobEngine(store)
    try:
        _job, letter = _failed(worker, {"c": 2}, unique_key="report:2")
        replayed = manager.replay(letter)
        record = manager.get_job(replayed)
        assert (record.lock, record.unique_key) == ("customer:2", "report:2")
        assert worker.enqueue("build", {"c": 2}, unique_key="report:2") == replayed
    finally:
        manager.stop()
        worker.stop()


def test_a_held_unique_key_refuses_the_replay_and_keeps_the_letter(store: Store) -> None:
    """While another unfinished job holds the key the replay raises InvalidStateError naming it; nothing changes."""
    engine = _engine(store)
    try:
        _job, letter = _failed(engine, {"c": 3}, unique_key="report:3")
        holder = engine.enqueue("build", {"c": 3}, unique_key="report:3")
        before = engine.counts()
        with pytest.raises(InvalidStateError, match=rf"unique_key 'report:3' is held by active job '{holder}'"):
            engine.replay(letter)
        assert engine.get_dead_letter(letter).id == letter
        assert engine.counts() == before
        engine.run_pending()  # the holder completes: the key is free
        assert engine.get_job(holder).state is JobState.COMPLETED
        replayed = engine.replay(letter)
        assert engine.get_job(replayed).unique_key == "report:3"
    finally:
        engine.stop()


def test_replay_all_skips_a_refused_letter_and_logs_it(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """replay_all replays the others; the refused one stays a dead letter, with a warning naming it."""
    engine = _engine(store)
    try:
        _job, held = _failed(engine, {"c": 4}, unique_key="report:4")
        _other, free = _failed(engine, {"c": 5})
        engine.enqueue("build", {"c": 4}, unique_key="report:4")
        with caplog.at_level(logging.WARNING, logger="threaddispatch.jobs"):
            replayed = engine.replay_all()
        assert len(replayed) == 1 and engine.get_job(replayed[0]).lock == "customer:5"
        assert list(replayed.refused) == [held] and "report:4" in replayed.refused[held]
        assert [letter.id for letter in engine.dlq()] == [held]
        assert any(held in record.getMessage() and "not replayed" in record.getMessage() for record in caplog.records)
        with pytest.raises(JobNotFoundError):
            engine.get_dead_letter(free)
    finally:
        engine.stop()


def test_a_replayed_dependent_waits_for_its_dependency_run_again(store: Store) -> None:
    """A dependent of policy "run" failed after its dependency failed; that one is retried: the replay waits
    for it (waiting, never claimed), then runs with its result."""
    engine = _engine(store)
    try:
        dependency = engine.enqueue("fetch", {"n": 5, "fail": True})
        dependent = engine.enqueue("build", {"c": 6}, depends_on=[dependency], on_dependency_failure="run")
        engine.run_pending()
        assert engine.get_job(dependency).state is JobState.FAILED
        # It ran anyway (policy "run") and failed: the dependency's result is None, which build refuses.
        assert engine.get_job(dependent).state is JobState.FAILED
        letter = _letter_of(engine, dependent)
        engine.store.requeue(dependency, now=time.time())  # pending again, as retry() makes it
        replayed = engine.replay(letter)
        record = engine.get_job(replayed)
        assert (record.state, record.waiting_on, record.depends_on) == (JobState.WAITING, 1, (dependency,))
        assert record.on_dependency_failure == "run"
        claimed = store.claim(["default"], 10, worker_id="w", now=time.time())
        assert [job.id for job in claimed] == [dependency]  # the dependency only
        store.complete(dependency, worker_id="w", attempts=claimed[0].attempts, result="5", now=time.time())
        assert engine.get_job(replayed).state is JobState.PENDING
        engine.run_pending()
        assert engine.get_job(replayed).state is JobState.COMPLETED
        assert engine.get_job(replayed).result == "[5]"
    finally:
        engine.stop()


def test_an_immediate_replay_runs_a_pending_job_and_not_a_waiting_one(store: Store) -> None:
    """In immediate mode the replay runs its job before returning, unless the job waits for a dependency."""
    engine = _engine(store)
    immediate = _engine(store, failing=False, immediate=True)
    try:
        _job, letter = _failed(engine, {"c": 8})
        dependency = engine.enqueue("fetch", {"n": 1}, delay=3600.0)
        dependent = engine.enqueue("build", {"c": 9}, depends_on=[dependency], on_dependency_failure="run")
        engine.cancel(dependency)
        engine.run_pending()  # the dependent runs (policy "run") without the result, and fails
        assert engine.get_job(dependent).state is JobState.FAILED
        waiting_letter = _letter_of(engine, dependent)
        engine.store.requeue(dependency, now=time.time())  # pending again: the replayed dependent waits for it
        waits = immediate.replay(waiting_letter)
        assert immediate.get_job(waits).state is JobState.WAITING  # not run
        ran = immediate.replay(letter)  # (what the store hands out before it runs too: the dependency first)
        assert immediate.get_job(ran).state is JobState.COMPLETED
    finally:
        immediate.stop()
        engine.stop()


def test_the_admin_api_answers_a_refused_replay_with_409(store: Store) -> None:
    """POST /dlq/{id}/replay goes through JobEngine.replay: a held unique key is a 409 naming it; the letter stays."""
    engine = _engine(store)
    app = make_wsgi_app(engine, "/api", token=TOKEN)
    try:
        _job, letter = _failed(engine, {"c": 10}, unique_key="report:10")
        holder = engine.enqueue("build", {"c": 10}, unique_key="report:10")
        response = app.handle("POST", f"/dlq/{letter}/replay", authorization=f"Bearer {TOKEN}")
        assert response.status == 409, response.body
        assert holder in json.loads(response.body)["error"]["message"]
        assert engine.get_dead_letter(letter).id == letter
        engine.run_pending()
        response = app.handle("POST", f"/dlq/{letter}/replay", authorization=f"Bearer {TOKEN}")
        assert response.status == 200, response.body
        replayed = json.loads(response.body)["job_id"]
        assert (engine.get_job(replayed).lock, engine.get_job(replayed).unique_key) == ("customer:10", "report:10")
    finally:
        engine.stop()
