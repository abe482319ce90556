"""SQLiteStore's writer lock: this process's writers queue on a lock, never in SQLite's busy handler."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlite_threads import run_threads, wait_exit_code, waits_on_writer_lock

import threaddispatch.stores.sqlite as sqlite_module
from threaddispatch.stores import JobRecord, JobState, SQLiteStore
from threaddispatch.stores.base import Completion
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def _job() -> JobRecord:
    now = time.time()
    return JobRecord(id=uuid.uuid4().hex, name="noop", payload="null", run_at=now, created_at=now, updated_at=now)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("producer_store", ["same store", "another store on the file"])
def test_an_enqueue_meeting_another_threads_write_waits_on_the_writer_lock_not_inside_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, producer_store: str
) -> None:
    """While a worker thread's claim holds the write transaction, an enqueue on another thread waits
    before entering SQLite (woken when the claim commits), instead of in SQLite's busy handler, which
    sleeps 1, 2, 5, 10 ... ms between looks (the enqueue p99 with a worker running). The same for an
    enqueue through another store of this process on the same file: the writer lock is per path."""
    store = SQLiteStore(tmp_path / "jobs.db", busy_timeout=60)
    other = store if producer_store == "same store" else SQLiteStore(str(tmp_path / "." / "jobs.db"), busy_timeout=60)
    inside = threading.Event()
    release = threading.Event()
    claim_rows_in = sqlite_module.claim_rows_in  # type: ignore[attr-defined]

    def held_claim(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        assert release.wait(60)
        return claim_rows_in(*args, **kwargs)

    monkeypatch.setattr(sqlite_module, "claim_rows_in", held_claim)
    outcome: list[object] = []

    def enqueue() -> None:
        try:
            outcome.append(other.enqueue([_job()]))
        except BaseException as error:
            outcome.append(error)

    claimer = threading.Thread(target=lambda: store.claim(["default"], 1, worker_id="w", now=time.time()))
    producer = threading.Thread(target=enqueue, name="producer")
    try:
        claimer.start()
        assert inside.wait(30)
        producer.start()
        # Either the producer waits in the store's write path (fixed), or it entered SQLite and
        # waits in SQLite's busy handler, up to busy_timeout.
        wait_for(lambda: outcome or waits_on_writer_lock(producer), 30, message="the producer to block")
        assert outcome == [], f"the enqueue ended inside SQLite's busy wait: {outcome}"
    finally:
        release.set()
        claimer.join(30)
        producer.join(60)
        other.close()
        store.close()
    assert len(outcome) == 1 and isinstance(outcome[0], list)
    assert store._connections.writer is other._connections.writer
    assert not claimer.is_alive() and not producer.is_alive()


@pytest.mark.timeout(120)
def test_concurrent_writers_of_every_kind_keep_every_write(tmp_path: Path) -> None:
    """Enqueues, claims and completions from six threads, each through the writer lock: nothing lost."""
    store = SQLiteStore(tmp_path / "jobs.db")
    done: set[str] = set()
    done_lock = threading.Lock()
    produced = threading.Event()

    def produce() -> None:
        for _ in range(100):
            store.enqueue([_job()])

    def work(name: str) -> None:
        while True:
            # Read before the claim: an empty claim that began after every enqueue returned means none
            # is left (one that began before may have missed the last ones).
            finished = produced.is_set()
            jobs = store.claim(["default"], 5, worker_id=name, now=time.time())
            if not jobs:
                if finished:
                    return
                produced.wait(0.001)
            for job in jobs:
                store.complete(job.id, worker_id=name, attempts=job.attempts, result=None, now=time.time())
                with done_lock:
                    done.add(job.id)

    def produce_all() -> None:
        try:
            assert run_threads([produce] * 3) == []
        finally:
            produced.set()

    try:
        workers = [lambda name=f"claimer-{n}": work(name) for n in range(3)]
        assert run_threads([produce_all, *workers]) == []
        assert len(done) == 300
        assert store.counts()[JobState.COMPLETED] == 300
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_while_the_writer_lock_is_held_writes_with_its_own(tmp_path: Path) -> None:
    """The writer lock is per process: a child forked while the parent's writer lock was taken
    (a thread mid-write) renews it, and its enqueue goes through at once."""
    store = SQLiteStore(tmp_path / "jobs.db", busy_timeout=30)
    try:
        writer = store._connections.writer
        assert writer.acquire(timeout=30)
        try:
            pid = os.fork()
            if pid == 0:  # the child: exit status 0 once its enqueue is stored
                code = 1
                try:
                    store.enqueue([_job()])
                    code = 0
                finally:
                    os._exit(code)
        finally:
            writer.release()
        assert wait_exit_code(pid, 30) == 0
        assert store.counts()[JobState.PENDING] == 1
    finally:
        store.close()


def _holds(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The statements this thread runs while holding the store's writer lock, one list per hold."""
    holds: list[list[str]] = []
    held = [False]
    last: list[str] = []
    lock_type = type(store._connections.writer_lock)
    acquire, release = lock_type.acquire, lock_type.release

    def traced_acquire(self: Any, deadline: float) -> str | None:
        holder = acquire(self, deadline)
        if holder is None:
            held[0] = True
            holds.append([])
        return holder

    def traced_release(self: Any) -> None:
        held[0] = False
        release(self)

    def trace(sql: str) -> None:
        # A statement is traced again at the start of each trigger it fires: count it once.
        if held[0] and (not last or last[0] != sql):
            last[:] = [sql]
            holds[-1].append(sql.split(maxsplit=1)[0].upper())

    monkeypatch.setattr(lock_type, "acquire", traced_acquire)
    monkeypatch.setattr(lock_type, "release", traced_release)
    with store._connections.slot().lock:
        store._connections.conn().set_trace_callback(trace)
    return holds


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_the_fetchers_writes_hold_the_writer_lock_for_the_fewest_statements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str
) -> None:
    """The enqueue p99 with a worker running: an enqueue waits for whatever write holds the lock, and the
    holder gives the GIL away at every statement (to threads running Python while the enqueue waits). A
    claim is one statement (no BEGIN/COMMIT); completing jobs without dependents and claiming their
    successors is one transaction of two statements (no dependents' probe); the rows become jobs after it."""
    store = SQLiteStore(tmp_path / "jobs.db", durability=durability)
    try:
        store.enqueue([_job() for _ in range(4)])
        holds = _holds(store, monkeypatch)
        claimed = store.claim(["default"], 2, worker_id="w", now=time.time())
        outcomes = [Completion(job.id, "w", job.attempts, None, None) for job in claimed]
        done, jobs = store.complete_and_claim(outcomes, ["default"], 2, worker_id="w", now=time.time())
        assert done == {job.id for job in claimed} and len(jobs) == 2
        assert holds == [["UPDATE"], ["BEGIN", "UPDATE", "UPDATE", "COMMIT"]]
        assert store.counts()[JobState.COMPLETED] == 2
    finally:
        store.close()


def test_a_completion_releases_its_dependents_in_its_own_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job with dependents is completed with their release in ONE transaction (never a completion
    committed without it), beside jobs without dependents completed alone."""
    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        first, plain = _job(), _job()
        store.enqueue([first, plain])
        dependent = dataclasses.replace(_job(), depends_on=(first.id,))
        store.enqueue([dependent])
        claimed = store.claim(["default"], 2, worker_id="w", now=time.time())
        assert {job.id for job in claimed} == {first.id, plain.id}
        holds = _holds(store, monkeypatch)
        outcomes = [Completion(job.id, "w", job.attempts, None, None) for job in claimed]
        assert store.complete_many(outcomes, now=time.time()) == {first.id, plain.id}
        assert holds[0] == ["UPDATE"]
        assert holds[1][0] == "BEGIN" and "DELETE" in holds[1] and holds[1][-1] == "COMMIT"
        assert store.get(dependent.id).state is JobState.PENDING  # type: ignore[union-attr]
    finally:
        store.close()
