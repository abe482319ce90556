"""The store contract: ONE test class run against every store.

The ``store`` fixture (tests/conftest.py) gives each kind of ``STORE_FACTORIES`` in turn:
memory, SQLite on a real file, PostgreSQL on the session's server. A new store joins by
adding a factory there, nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from threaddispatch.errors import ConfigurationError, InvalidStateError, JobNotFoundError, PayloadError, StoreError
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import (
    CronEntry,
    JobRecord,
    JobState,
    MemoryStore,
    SQLiteStore,
    Store,
    _sql,
    open_store,
)
from threaddispatch.stores.base import FINAL_STATES, Completion
from threaddispatch.testing import wait_for

T0 = 1_700_000_000.0

_ids = iter(range(1, 1 << 40))


def job(**fields: object) -> JobRecord:
    """A pending job due at T0 with a fresh sortable id."""
    values: dict[str, object] = {
        "id": f"job-{next(_ids):08d}",
        "name": "task",
        "payload": '{"n": 1}',
        "run_at": T0,
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(fields)
    return JobRecord(**values)  # type: ignore[arg-type]


def insert_version_1_jobs(conn: Any, jobs: list[JobRecord], placeholder: str) -> None:
    """Insert ``jobs`` into ``conn``'s dispatch_jobs as a store at migration 1 wrote them: only the
    columns that migration made (not those of ``_sql.LATER_COLUMNS``), by position as JobRecord's fields."""
    later = _sql.LATER_COLUMNS["dispatch_jobs"]
    names = [name for name, _kind, _constraints in _sql.TABLES["dispatch_jobs"] if name != "seq"]
    for record in jobs:
        values = [getattr(record, field.name) for field in dataclasses.fields(record)]
        row = {name: value for name, value in zip(names, values, strict=True) if name not in later}
        marks = ", ".join([placeholder] * len(row))
        conn.execute(f"INSERT INTO dispatch_jobs ({', '.join(row)}) VALUES ({marks})",
                     [value.value if isinstance(value, JobState) else value for value in row.values()])  # fmt: skip


def _noop(ctx: JobContext, payload: object) -> None:
    """A handler that does nothing."""


def _deep(depth: int) -> list[object]:
    """A list nested ``depth`` levels deep."""
    outer: list[object] = []
    inner = outer
    for _ in range(depth):
        nested: list[object] = []
        inner.append(nested)
        inner = nested
    return outer


_DEEP = _deep(100_000)
_HUGE = 10**30

#: (id, call on an engine with job "job" registered, exception, text its message must hold).
BAD_CALLS: list[tuple[str, Callable[[JobEngine], object], type[Exception], str]] = [
    ("register-name-int", lambda e: e.register(123, _noop), ConfigurationError, "job name"),  # type: ignore[arg-type]
    ("register-name-empty", lambda e: e.register("", _noop), ConfigurationError, "job name"),
    ("register-name-nul", lambda e: e.register("a\x00b", _noop), ConfigurationError, "job name"),
    ("register-priority-huge", lambda e: e.register("x", _noop, priority=_HUGE), ConfigurationError, "priority"),
    ("register-priority-2**63", lambda e: e.register("x", _noop, priority=2**63), ConfigurationError, "priority"),
    ("register-priority-bool", lambda e: e.register("x", _noop, priority=True), ConfigurationError, "priority"),
    ("register-retries-2**63", lambda e: e.register("x", _noop, max_retries=2**63), ConfigurationError, "max_retries"),
    ("register-timeout-huge", lambda e: e.register("x", _noop, timeout=10**400), ConfigurationError, "timeout"),
    ("register-queue-nul", lambda e: e.register("x", _noop, queue="q\x00"), ConfigurationError, "queue"),
    ("job-decorator-name-empty", lambda e: e.job("")(_noop), ConfigurationError, "job name"),
    ("enqueue-name-int", lambda e: e.enqueue(123), ConfigurationError, "job name"),  # type: ignore[arg-type]
    ("enqueue-name-nul", lambda e: e.enqueue("job\x00"), ConfigurationError, "job name"),
    ("enqueue-priority-2**63", lambda e: e.enqueue("job", priority=2**63), ConfigurationError, "priority"),
    ("enqueue-priority--2**63", lambda e: e.enqueue("job", priority=-(2**63)), ConfigurationError, "priority"),
    ("enqueue-retries-2**63", lambda e: e.enqueue("job", max_retries=2**63), ConfigurationError, "max_retries"),
    ("enqueue-retries-bool", lambda e: e.enqueue("job", max_retries=True), ConfigurationError, "max_retries"),
    ("enqueue-queue-nul", lambda e: e.enqueue("job", queue="q\x00"), ConfigurationError, "queue"),
    ("enqueue-unique_key-nul", lambda e: e.enqueue("job", unique_key="k\x00"), ConfigurationError, "unique_key"),
    ("enqueue-unique_key-int", lambda e: e.enqueue("job", unique_key=7), ConfigurationError, "unique_key"),  # type: ignore[arg-type]
    ("enqueue-delay-huge", lambda e: e.enqueue("job", delay=10**400), ConfigurationError, "delay"),
    ("enqueue-run_at-huge", lambda e: e.enqueue("job", run_at=10**400), ConfigurationError, "run_at"),
    ("enqueue-payload-deep", lambda e: e.enqueue("job", _DEEP), PayloadError, "payload of job 'job'"),
    ("enqueue_many-priority", lambda e: e.enqueue_many("job", [1], priority=2**63), ConfigurationError, "priority"),
    ("enqueue_many-queue-nul", lambda e: e.enqueue_many("job", [1], queue="\x00"), ConfigurationError, "queue"),
    ("enqueue_many-payload-deep", lambda e: e.enqueue_many("job", [1, _DEEP]), PayloadError, "payload #1"),
    ("list_jobs-limit", lambda e: e.list_jobs(limit=2**70), ConfigurationError, "limit"),
    ("list_jobs-offset", lambda e: e.list_jobs(offset=2**63), ConfigurationError, "offset"),
    ("list_jobs-limit-bool", lambda e: e.list_jobs(limit=True), ConfigurationError, "limit"),
    ("list_jobs-queue-nul", lambda e: e.list_jobs(queue="q\x00"), ConfigurationError, "queue"),
    ("counts-queue-nul", lambda e: e.counts(queue="q\x00"), ConfigurationError, "queue"),
    ("dlq-limit", lambda e: e.dlq(limit=2**70), ConfigurationError, "limit"),
    ("dlq-offset", lambda e: e.dlq(offset=-1), ConfigurationError, "offset"),
    ("dlq-queue-nul", lambda e: e.dlq(queue="q\x00"), ConfigurationError, "queue"),
    ("replay_all-limit", lambda e: e.replay_all(limit=2**63), ConfigurationError, "limit"),
    ("purge_dlq-older_than", lambda e: e.purge_dlq(older_than=10**400), ConfigurationError, "older_than"),
    ("cron-priority", lambda e: e.cron("@hourly", "job", priority=2**63), ConfigurationError, "priority"),
    ("cron-name-nul", lambda e: e.cron("@hourly", "job", name="c\x00"), ConfigurationError, "cron name"),
    ("cron-queue-nul", lambda e: e.cron("@hourly", "job", queue="q\x00"), ConfigurationError, "queue"),
    ("disable_cron-nul", lambda e: e.disable_cron("c\x00"), ConfigurationError, "cron name"),
    ("remove_cron-int", lambda e: e.remove_cron(5), ConfigurationError, "cron name"),  # type: ignore[arg-type]
    ("pause_queue-nul", lambda e: e.pause_queue("q\x00"), ConfigurationError, "queue"),
    ("get_job-nul", lambda e: e.get_job("id\x00"), ConfigurationError, "job id"),
    ("cancel-nul", lambda e: e.cancel("id\x00"), ConfigurationError, "job id"),
    ("retry-int", lambda e: e.retry(5), ConfigurationError, "job id"),  # type: ignore[arg-type]
    ("replay-nul", lambda e: e.replay("dl\x00"), ConfigurationError, "dead letter id"),
]


class TestStoreContract:
    """The behaviour every Store must have (see threaddispatch/stores/base.py)."""

    def test_enqueue_then_get_round_trips_every_field(self, store: Store) -> None:
        """A stored job comes back equal, as a fresh snapshot."""
        original = job(priority=3, timeout=2.5, max_retries=5, queue="mail")
        assert store.enqueue([original]) == [original.id]
        loaded = store.get(original.id)
        assert loaded == original and loaded is not original
        assert loaded.decoded_payload() == {"n": 1}
        assert store.get("missing") is None

    def test_enqueue_many_returns_ids_in_order_and_refuses_duplicate_ids(self, store: Store) -> None:
        """Many jobs go in at once; a duplicate id fails the whole batch."""
        jobs = [job() for _ in range(5)]
        assert store.enqueue(jobs) == [j.id for j in jobs]
        with pytest.raises(StoreError):
            store.enqueue([job(), job(id=jobs[0].id)])
        assert store.counts()[JobState.PENDING] == 5

    def test_claim_order_is_priority_then_run_at_then_insertion(self, store: Store) -> None:
        """Higher priority first; then earlier run_at; then first inserted."""
        low = job(priority=0, run_at=T0 - 10)
        high_late = job(priority=5, run_at=T0 - 1)
        high_early = job(priority=5, run_at=T0 - 5)
        tie_a = job(priority=1, run_at=T0 - 3)
        tie_b = job(priority=1, run_at=T0 - 3)
        store.enqueue([low, high_late, tie_a, high_early, tie_b])
        order = [j.id for j in store.claim(["default"], 10, worker_id="w", now=T0)]
        assert order == [high_early.id, high_late.id, tie_a.id, tie_b.id, low.id]

    def test_claim_marks_running_and_skips_future_and_other_queues(self, store: Store) -> None:
        """Only due jobs of the asked queues are claimed, up to the limit, with claim fields set."""
        due = [job() for _ in range(3)]
        future = job(run_at=T0 + 60)
        other = job(queue="other")
        store.enqueue([*due, future, other])
        first = store.claim(["default"], 2, worker_id="w1", now=T0)
        assert len(first) == 2
        for claimed in first:
            assert claimed.state is JobState.RUNNING
            assert (claimed.worker_id, claimed.attempts, claimed.started_at, claimed.heartbeat_at) == ("w1", 1, T0, T0)
        rest = store.claim(["default"], 10, worker_id="w1", now=T0)
        assert [j.id for j in rest] == [due[2].id]
        assert store.claim(["default"], 10, worker_id="w1", now=T0) == []
        assert store.claim([], 10, worker_id="w1", now=T0) == []
        assert store.claim(["default"], 0, worker_id="w1", now=T0 + 100) == []
        both = store.claim(["default", "other"], 10, worker_id="w1", now=T0 + 100)
        assert [j.id for j in both] == [other.id, future.id]

    @pytest.mark.timeout(30)
    def test_concurrent_claims_never_hand_a_job_out_twice(self, store: Store) -> None:
        """Eight threads claiming at once get every job exactly once between them."""
        jobs = [job() for _ in range(300)]
        store.enqueue(jobs)
        got: list[list[str]] = [[] for _ in range(8)]
        start = threading.Barrier(8)

        def claimer(index: int) -> None:
            start.wait()
            while True:
                claimed = store.claim(["default"], 3, worker_id=f"w{index}", now=T0)
                if not claimed:
                    return
                got[index].extend(j.id for j in claimed)

        threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        everything = [job_id for ids in got for job_id in ids]
        assert sorted(everything) == sorted(j.id for j in jobs)

    def test_heartbeat_updates_only_this_workers_running_jobs(self, store: Store) -> None:
        """Heartbeat returns the ids still claimed by the worker."""
        a, b = job(), job()
        store.enqueue([a, b])
        store.claim(["default"], 1, worker_id="w1", now=T0)
        store.claim(["default"], 1, worker_id="w2", now=T0)
        w1_job = next(j for j in (store.get(a.id), store.get(b.id)) if j and j.worker_id == "w1")
        assert store.heartbeat([a.id, b.id, "missing"], worker_id="w1", now=T0 + 5) == {w1_job.id}
        assert store.get(w1_job.id).heartbeat_at == T0 + 5  # type: ignore[union-attr]

    def test_reap_stale_requeues_or_dead_letters_when_out_of_attempts(self, store: Store) -> None:
        """A stale running job goes back to pending; one with no attempts left fails with a dead letter."""
        retryable, exhausted, fresh = job(max_retries=2), job(max_retries=0), job()
        store.enqueue([retryable, exhausted, fresh])
        store.claim(["default"], 2, worker_id="dead", now=T0)
        store.claim(["default"], 1, worker_id="alive", now=T0 + 20)
        reaped = store.reap_stale(older_than=T0 + 10, now=T0 + 30)
        assert sorted(reaped) == sorted([retryable.id, exhausted.id])
        back = store.get(retryable.id)
        assert back is not None and back.state is JobState.PENDING and back.worker_id is None and back.run_at == T0 + 30
        dead = store.get(exhausted.id)
        assert dead is not None and dead.state is JobState.FAILED
        letters = store.list_dead_letters()
        assert [letter.job_id for letter in letters] == [exhausted.id]
        assert store.get(fresh.id).state is JobState.RUNNING  # type: ignore[union-attr]
        assert store.reap_stale(older_than=T0 + 10, now=T0 + 31) == []

    def test_finishing_a_claim_is_fenced_by_worker_and_attempt(self, store: Store) -> None:
        """complete/retry/fail/cancel from a stale claim change nothing."""
        j = job()
        store.enqueue([j])
        (claimed,) = store.claim(["default"], 1, worker_id="w", now=T0)
        assert not store.complete(j.id, worker_id="other", attempts=1, result="1", now=T0)
        assert not store.complete(j.id, worker_id="w", attempts=2, result="1", now=T0)
        assert not store.retry_later(j.id, worker_id="other", attempts=1, run_at=T0, error="x", now=T0)
        assert store.fail(j.id, worker_id="other", attempts=1, error="x", now=T0) is None
        assert not store.cancel(j.id, now=T0, worker_id="other", attempts=1)
        assert store.complete(j.id, worker_id="w", attempts=claimed.attempts, result='{"ok": true}', now=T0 + 1)
        done = store.get(j.id)
        assert done is not None and done.state is JobState.COMPLETED and done.decoded_result() == {"ok": True}
        assert done.finished_at == T0 + 1
        assert not store.complete(j.id, worker_id="w", attempts=1, result="2", now=T0 + 2)

    def test_complete_many_and_complete_and_claim(self, store: Store) -> None:
        """Group commits report the ids that applied and claim the next jobs."""
        jobs = [job() for _ in range(4)]
        store.enqueue(jobs)
        first = store.claim(["default"], 2, worker_id="w", now=T0)
        outcomes = [Completion(j.id, "w", j.attempts, "1", None) for j in first]
        outcomes.append(Completion("missing", "w", 1, None, None))
        applied, claimed = store.complete_and_claim(outcomes, ["default"], 5, worker_id="w", now=T0 + 1)
        assert applied == {j.id for j in first}
        assert {j.id for j in claimed} == {j.id for j in jobs} - applied
        assert store.complete_many([Completion(j.id, "w", 1, None, "note") for j in claimed], now=T0 + 2) == {
            j.id for j in claimed
        }
        assert store.counts()[JobState.COMPLETED] == 4

    def test_group_commit_of_many_checks_each_claim(self, store: Store) -> None:
        """A large group commit (several statements' worth) applies exactly the outcomes that are live claims."""
        jobs = [job() for _ in range(250)]
        store.enqueue(jobs)
        claimed = store.claim(["default"], 250, worker_id="w", now=T0)
        assert len(claimed) == 250
        outcomes = [
            Completion(j.id, "w" if i % 3 else "other", j.attempts if i % 5 else j.attempts + 1, str(i), None)
            for i, j in enumerate(claimed)
        ]
        expected = {j.id for i, j in enumerate(claimed) if i % 3 and i % 5}
        assert store.complete_many(outcomes, now=T0 + 1) == expected
        for i, j in enumerate(claimed):
            stored = store.get(j.id)
            assert stored is not None
            if j.id in expected:
                assert (stored.state, stored.result, stored.finished_at) == (JobState.COMPLETED, str(i), T0 + 1)
            else:
                assert stored.state is JobState.RUNNING and stored.result is None
        assert store.complete_many(outcomes, now=T0 + 2) == set()

    def test_retry_later_then_claimable_when_due_with_attempts_kept(self, store: Store) -> None:
        """A retrying job waits for its run_at and its next claim is attempt 2."""
        j = job()
        store.enqueue([j])
        store.claim(["default"], 1, worker_id="w", now=T0)
        assert store.retry_later(j.id, worker_id="w", attempts=1, run_at=T0 + 10, error="boom", now=T0)
        waiting = store.get(j.id)
        assert waiting is not None and waiting.state is JobState.RETRYING and waiting.error == "boom"
        assert store.claim(["default"], 1, worker_id="w", now=T0 + 9) == []
        (again,) = store.claim(["default"], 1, worker_id="w", now=T0 + 10)
        assert again.attempts == 2

    def test_fail_pushes_dead_letter_that_replays_and_purges(self, store: Store) -> None:
        """fail makes a dead letter; replay inserts a new job and removes it; purge deletes the rest."""
        j = job(priority=4, queue="mail", max_retries=1)
        store.enqueue([j])
        store.claim(["mail"], 1, worker_id="w", now=T0)
        letter = store.fail(j.id, worker_id="w", attempts=1, error="bad", now=T0 + 1)
        assert letter is not None
        assert (letter.job_id, letter.name, letter.queue, letter.priority, letter.attempts, letter.error) == (
            j.id, "task", "mail", 4, 1, "bad",
        )  # fmt: skip
        assert store.get_dead_letter(letter.id) == letter
        assert store.get(j.id).state is JobState.FAILED  # type: ignore[union-attr]
        new = job(name=letter.name, payload=letter.payload, queue=letter.queue)
        assert store.replay_dead_letter(letter.id, job=new) == new.id
        assert store.list_dead_letters() == []
        with pytest.raises(JobNotFoundError):
            store.replay_dead_letter(letter.id, job=job())
        other = job()
        store.enqueue([other])
        store.fail(other.id, worker_id=None, attempts=None, error="forced", now=T0 + 5)
        assert len(store.list_dead_letters(queue="default")) == 1
        assert store.purge_dead_letters(older_than=T0) == 0
        assert store.purge_dead_letters() == 1

    def test_count_dead_letters_in_one_queue_or_all(self, store: Store) -> None:
        """count_dead_letters counts the letters of one queue, or of all; the base class default agrees."""
        jobs = [job(queue="mail"), job(queue="mail"), job()]
        store.enqueue(jobs)
        assert store.count_dead_letters() == 0
        for j in jobs:
            store.fail(j.id, worker_id=None, attempts=None, error="forced", now=T0)
        for queue, expected in ((None, 3), ("mail", 2), ("default", 1), ("none", 0)):
            assert store.count_dead_letters(queue=queue) == expected
            assert Store.count_dead_letters(store, queue=queue) == expected

    def test_dead_letter_pages_list_each_once_when_failed_at_is_out_of_insertion_order(self, store: Store) -> None:
        """Keyset pages of dead letters give each once, even when failures were recorded out of time order."""
        jobs = [job() for _ in range(4)]
        store.enqueue(jobs)
        store.claim(["default"], 4, worker_id="w", now=T0)
        for j, offset in zip(jobs, (3, 1, 0, 2), strict=True):  # worker threads may record failures out of order
            assert store.fail(j.id, worker_id="w", attempts=1, error="bad", now=T0 + offset) is not None
        seen: list[str] = []
        after: tuple[str, float] | None = None
        position = 0
        for _ in range(12):
            letters = store.list_dead_letters_after(after, limit=2, position=position)
            page = letters[:1]
            seen.extend(letter.job_id for letter in page)
            if len(letters) <= 1:
                break
            after, position = (page[-1].id, page[-1].failed_at), position + 1
        assert sorted(seen) == sorted(j.id for j in jobs)

    def test_release_gives_claims_back_with_or_without_refund(self, store: Store) -> None:
        """Released claims become pending; refund takes the attempt back."""
        a, b = job(), job()
        store.enqueue([a, b])
        store.claim(["default"], 2, worker_id="w", now=T0)
        assert store.release([a.id], worker_id="other", now=T0) == 0
        assert store.release([a.id], worker_id="w", now=T0 + 1) == 1
        assert store.release([b.id], worker_id="w", now=T0 + 1, refund_attempt=False) == 1
        assert (store.get(a.id).state, store.get(a.id).attempts) == (JobState.PENDING, 0)  # type: ignore[union-attr]
        assert store.get(b.id).attempts == 1  # type: ignore[union-attr]
        assert len(store.claim(["default"], 5, worker_id="w2", now=T0 + 1)) == 2

    def test_cancel_rules(self, store: Store) -> None:
        """Pending and running jobs cancel; finished ones do not; unknown ids raise."""
        pending, running = job(), job(priority=9)
        store.enqueue([pending, running])
        store.claim(["default"], 1, worker_id="w", now=T0)
        assert store.cancel(pending.id, now=T0, error="stop")
        assert store.cancel(running.id, now=T0)
        assert store.get(pending.id).state is JobState.CANCELLED  # type: ignore[union-attr]
        assert store.heartbeat([running.id], worker_id="w", now=T0 + 1) == set()
        assert not store.cancel(pending.id, now=T0)
        with pytest.raises(JobNotFoundError):
            store.cancel("missing", now=T0)

    def test_requeue_failed_job_resets_attempts_and_drops_its_dead_letters(self, store: Store) -> None:
        """requeue runs a failed job again; other states are refused."""
        j = job()
        store.enqueue([j])
        store.claim(["default"], 1, worker_id="w", now=T0)
        store.fail(j.id, worker_id="w", attempts=1, error="x", now=T0)
        store.requeue(j.id, now=T0 + 1)
        again = store.get(j.id)
        assert again is not None and (again.state, again.attempts, again.run_at) == (JobState.PENDING, 0, T0 + 1)
        assert store.list_dead_letters() == []
        with pytest.raises(InvalidStateError):
            store.requeue(j.id, now=T0)
        with pytest.raises(JobNotFoundError):
            store.requeue("missing", now=T0)

    def test_unique_key_held_while_active_only(self, store: Store) -> None:
        """A second job with an active job's key is not created; after it finishes the key is free."""
        first = job(unique_key="k")
        assert store.enqueue([first]) == [first.id]
        assert store.enqueue([job(unique_key="k"), job(unique_key="k")]) == [first.id, first.id]
        assert len(store.claim(["default"], 1, worker_id="w", now=T0)) == 1
        assert store.enqueue([job(unique_key="k")]) == [first.id]  # running still holds it
        store.complete(first.id, worker_id="w", attempts=1, result=None, now=T0)
        second = job(unique_key="k")
        both = store.enqueue([second, job(unique_key="k")])
        assert both == [second.id, second.id]
        assert store.counts()[JobState.PENDING] == 1

    def test_purge_finished_deletes_old_final_jobs_only(self, store: Store) -> None:
        """Completed/failed/cancelled jobs older than the cutoff go; others stay."""
        old, recent, pending = job(), job(), job(run_at=T0 + 100)
        store.enqueue([old, recent, pending])
        store.claim(["default"], 2, worker_id="w", now=T0)
        store.complete(old.id, worker_id="w", attempts=1, result=None, now=T0)
        store.complete(recent.id, worker_id="w", attempts=1, result=None, now=T0 + 50)
        assert store.purge_finished(older_than=T0 + 10) == 1
        assert store.get(old.id) is None and store.get(recent.id) is not None and store.get(pending.id) is not None

    def test_counts_by_queue_is_counts_for_each_queue(self, store: Store) -> None:
        """counts_by_queue answers counts(queue=q) for every asked queue, every state present, unknown queues 0."""
        store.enqueue([job(queue="a"), job(queue="a"), job(queue="b"), job(queue="other")])
        asked = ["a", "b", "none"]
        answer = store.counts_by_queue(asked)
        assert answer == {q: store.counts(queue=q) for q in asked}
        assert answer["a"][JobState.PENDING] == 2 and set(answer["none"]) == set(JobState)
        assert store.counts_by_queue([]) == {}

    def test_counts_and_list_jobs_filters_and_order(self, store: Store) -> None:
        """counts has every state; list_jobs is newest first and filters by state and queue."""
        a = job(created_at=T0)
        b = job(created_at=T0 + 1, queue="q2")
        c = job(created_at=T0 + 2)
        store.enqueue([a, b, c])
        counts = store.counts()
        assert set(counts) == set(JobState) and counts[JobState.PENDING] == 3
        assert store.counts(queue="q2")[JobState.PENDING] == 1
        assert [j.id for j in store.list_jobs()] == [c.id, b.id, a.id]
        assert [j.id for j in store.list_jobs(queue="default", limit=1, offset=1)] == [a.id]
        assert store.list_jobs(state=JobState.RUNNING) == []
        with pytest.raises(ConfigurationError):
            store.list_jobs(limit=-1)

    def test_paused_queues(self, store: Store) -> None:
        """Pause flags are stored per queue."""
        store.set_queue_paused("a", True, now=T0)
        store.set_queue_paused("b", True, now=T0)
        store.set_queue_paused("b", False, now=T0)
        assert store.paused_queues() == {"a"}

    def test_lease_is_exclusive_until_expiry_or_release(self, store: Store) -> None:
        """A lease is held by one holder; renewal works; expiry or release frees it."""
        assert store.acquire_lease("cron", holder="a", ttl=10, now=T0)
        assert not store.acquire_lease("cron", holder="b", ttl=10, now=T0 + 5)
        assert store.acquire_lease("cron", holder="a", ttl=10, now=T0 + 5)
        assert not store.acquire_lease("cron", holder="b", ttl=10, now=T0 + 14)
        assert store.acquire_lease("cron", holder="b", ttl=10, now=T0 + 15)
        store.release_lease("cron", holder="a")  # not a's any more: no effect
        assert not store.acquire_lease("cron", holder="a", ttl=10, now=T0 + 16)
        store.release_lease("cron", holder="b")
        assert store.acquire_lease("cron", holder="a", ttl=10, now=T0 + 16)

    def test_cron_entries_fire_once_per_tick(self, store: Store) -> None:
        """upsert keeps last_tick; fire_cron is a compare-and-set that inserts the job."""
        entry = CronEntry("nightly", "@daily", "task", "null", last_tick=T0)
        stored = store.upsert_cron(entry, now=T0)
        assert stored.last_tick == T0 and stored.created_at == T0
        updated = store.upsert_cron(CronEntry("nightly", "@hourly", "task", "null", last_tick=None), now=T0 + 1)
        assert (updated.expression, updated.last_tick) == ("@hourly", T0)
        assert not store.fire_cron("nightly", tick=T0, job=job())
        first = job(unique_key="cron:nightly:1")
        assert store.fire_cron("nightly", tick=T0 + 3600, job=first)
        assert not store.fire_cron("nightly", tick=T0 + 3600, job=job())
        assert store.get(first.id) is not None
        assert [c.name for c in store.list_crons()] == ["nightly"]
        assert store.list_crons()[0].last_tick == T0 + 3600
        with pytest.raises(JobNotFoundError):
            store.fire_cron("missing", tick=T0, job=job())
        assert store.delete_cron("nightly") and not store.delete_cron("nightly")

    def test_migrate_is_idempotent_and_close_refuses_further_use(self, store: Store) -> None:
        """migrate can run again; a closed store raises StoreError; close is idempotent."""
        version = store.migrate()
        assert store.migrate() == version >= 1
        store.close()
        store.close()
        with pytest.raises(StoreError):
            store.get("x")

    # -- cancelling only waiting jobs (issue 11 item 9) ------------------------------------------------

    def test_cancel_without_running_cancels_only_pending_or_retrying_jobs(self, store: Store) -> None:
        """include_running=False cancels pending and retrying jobs; running and finished ones stay as they are."""
        pending, retrying, running = job(), job(priority=9), job(priority=5)
        store.enqueue([pending, retrying, running])
        first = store.claim(["default"], 1, worker_id="w", now=T0)[0]
        assert first.id == retrying.id
        assert store.retry_later(retrying.id, worker_id="w", attempts=1, run_at=T0 + 60, error="x", now=T0)
        assert store.claim(["default"], 1, worker_id="w", now=T0)[0].id == running.id
        assert not store.cancel(running.id, now=T0, include_running=False)
        assert store.get(running.id).state is JobState.RUNNING  # type: ignore[union-attr]
        assert store.heartbeat([running.id], worker_id="w", now=T0 + 1) == {running.id}
        assert store.cancel(pending.id, now=T0, include_running=False, error="stop")
        assert store.cancel(retrying.id, now=T0, include_running=False)
        for cancelled in (pending, retrying):
            assert store.get(cancelled.id).state is JobState.CANCELLED  # type: ignore[union-attr]
        assert not store.cancel(pending.id, now=T0, include_running=False)
        with pytest.raises(JobNotFoundError):
            store.cancel("missing", now=T0, include_running=False)

    @pytest.mark.timeout(120)
    def test_cancel_without_running_racing_a_claim_is_one_or_the_other(self, store: Store) -> None:
        """A claim racing cancel(include_running=False) either gets the job (cancel False) or not (cancel True)."""
        for _ in range(40):
            raced = job()
            store.enqueue([raced])
            barrier = threading.Barrier(2, timeout=30)
            outcome: dict[str, object] = {}

            def claimer() -> None:
                barrier.wait()
                outcome["claimed"] = [c.id for c in store.claim(["default"], 1, worker_id="w", now=T0)]

            def canceller() -> None:
                barrier.wait()
                outcome["cancelled"] = store.cancel(raced.id, now=T0, include_running=False)

            threads = [threading.Thread(target=claimer), threading.Thread(target=canceller)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            claimed = raced.id in outcome["claimed"]  # type: ignore[operator]
            assert claimed != outcome["cancelled"], outcome
            state = store.get(raced.id).state  # type: ignore[union-attr]
            assert state is (JobState.RUNNING if claimed else JobState.CANCELLED)

    @pytest.mark.timeout(120)
    def test_engine_cancel_of_waiting_jobs_never_cancels_one_whose_handler_ran(self, store: Store) -> None:
        """JobEngine.cancel(running=False) racing the engine's claims: cancelled before it ran, or refused."""
        engine = JobEngine(
            store, concurrency=4, poll_interval=0.001, max_poll_interval=0.01, heartbeat_interval=0.05,
            stale_job_threshold=10.0, shutdown_timeout=10.0,
        )  # fmt: skip
        ran: set[str] = set()
        lock = threading.Lock()

        def work(ctx: JobContext, payload: object) -> None:
            with lock:
                ran.add(ctx.id)

        engine.register("work", work)
        engine.start()
        try:
            outcomes: dict[str, str] = {}
            for _ in range(60):
                job_id = engine.enqueue("work")
                try:
                    engine.cancel(job_id, running=False)
                except InvalidStateError as error:
                    assert job_id in str(error) and ("running" in str(error) or "completed" in str(error))
                    outcomes[job_id] = "refused"
                else:
                    outcomes[job_id] = "cancelled"
            wait_for(lambda: all(engine.get_job(i).state in FINAL_STATES for i in outcomes), timeout=60)
        finally:
            assert engine.stop(10)
        for job_id, outcome in outcomes.items():
            state = engine.get_job(job_id).state
            if outcome == "cancelled":
                assert job_id not in ran and state is JobState.CANCELLED
            else:
                assert job_id in ran and state is JobState.COMPLETED

    def test_engine_cancel_without_running_names_the_state_it_refuses(self, store: Store) -> None:
        """cancel(running=False) of a running or finished job raises InvalidStateError saying its state."""
        engine = JobEngine(store)
        engine.register("work", lambda ctx, payload: None)
        running, done = engine.enqueue("work"), engine.enqueue("work")
        store.claim(["default"], 2, worker_id="w", now=time.time())
        assert store.complete(done, worker_id="w", attempts=1, result=None, now=time.time())
        with pytest.raises(InvalidStateError, match=f"'{running}' is running"):
            engine.cancel(running, running=False)
        with pytest.raises(InvalidStateError, match=f"'{done}' is already completed"):
            engine.cancel(done, running=False)
        with pytest.raises(JobNotFoundError):
            engine.cancel("missing", running=False)
        with pytest.raises(ConfigurationError, match="running"):
            engine.cancel(running, running="no")  # type: ignore[arg-type]
        engine.cancel(running)  # running=True (the default) still cancels a running job
        assert engine.get_job(running).state is JobState.CANCELLED

    # -- bad input refused at the call, for every store (issue 11 item 16) ------------------------------

    @pytest.mark.parametrize(("call", "error", "names"), [pytest.param(*row[1:], id=row[0]) for row in BAD_CALLS])
    def test_engine_refuses_bad_input_at_the_call_naming_the_argument(
        self, store: Store, call: Callable[[JobEngine], object], error: type[Exception], names: str
    ) -> None:
        """Bad names, NUL characters, out-of-range ints, bools and over-deep payloads raise at the call, naming it."""
        engine = JobEngine(store)
        engine.register("job", _noop)
        with pytest.raises(error) as caught:
            call(engine)
        assert names in str(caught.value)
        assert store.list_jobs() == []

    @pytest.mark.timeout(60)
    def test_engine_records_a_failure_whose_error_text_holds_a_nul(self, store: Store) -> None:
        """An exception message with a NUL is stored (spelled out) on every store: the job fails, never stranded."""
        engine = JobEngine(store, poll_interval=0.01, max_poll_interval=0.05, heartbeat_interval=5.0,
                           stale_job_threshold=60.0, shutdown_timeout=10.0)  # fmt: skip

        def nul_error(ctx: JobContext, payload: object) -> None:
            raise ValueError("bad\x00byte")

        engine.register("nul_error", nul_error, max_retries=0)
        job_id = engine.enqueue("nul_error")
        engine.start()
        try:
            with pytest.raises(InvalidStateError, match="ValueError"):
                engine.result(job_id, timeout=20)
        finally:
            assert engine.stop(10)
        assert "bad\\x00byte" in (engine.get_job(job_id).error or "")

    @pytest.mark.parametrize(("limit", "offset"), [(2**70, 0), (0, 2**63), (True, 0), (-1, 0)])
    def test_store_listings_refuse_limits_outside_64_bits(self, store: Store, limit: int, offset: int) -> None:
        """list_jobs and list_dead_letters refuse a limit or offset that is not an int in 0..2**63-1."""
        for listing in (store.list_jobs, store.list_dead_letters):
            with pytest.raises(ConfigurationError, match="limit" if offset == 0 else "offset"):
                listing(limit=limit, offset=offset)

    def test_engine_accepts_the_64_bit_extremes(self, store: Store) -> None:
        """The largest priority and max_retries the stores hold pass and round-trip."""
        engine = JobEngine(store)
        engine.register("job", _noop, priority=-(2**63 - 1), max_retries=2**63 - 2)
        low = engine.get_job(engine.enqueue("job"))
        high = engine.get_job(engine.enqueue("job", priority=2**63 - 1, unique_key="k"))
        assert (low.priority, low.max_retries) == (-(2**63 - 1), 2**63 - 2)
        assert high.priority == 2**63 - 1
        assert len(engine.list_jobs(limit=2**63 - 1, offset=0)) == 2


@pytest.mark.timeout(60)
def test_sqlite_two_processes_claim_disjoint_sets(tmp_path: Path) -> None:
    """Two processes claiming from one SQLite file never get the same job."""
    path = tmp_path / "shared.db"
    store = SQLiteStore(path)
    jobs = [job() for _ in range(400)]
    store.enqueue(jobs)
    script = textwrap.dedent(
        f"""
        import sys
        from threaddispatch.stores import SQLiteStore
        store = SQLiteStore({str(path)!r})
        got = []
        while True:
            claimed = store.claim(["default"], 2, worker_id=sys.argv[1], now={T0})
            if not claimed:
                break
            got.extend(j.id for j in claimed)
        print("\\n".join(got))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, f"p{i}"], stdout=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=50)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(outputs[0] + outputs[1]) == sorted(j.id for j in jobs)
    store.close()


def test_sqlite_schema_is_versioned(tmp_path: Path) -> None:
    """The file records its schema version; a second store on it migrates to the same version."""
    first = SQLiteStore(tmp_path / "v.db")
    second = SQLiteStore(tmp_path / "v.db")
    assert first.schema_version() == second.schema_version() == SQLiteStore.MIGRATIONS[-1][0]
    first.close()
    second.close()


def test_sqlite_refuses_memory_path() -> None:
    """':memory:' is refused: each thread would get a different database."""
    with pytest.raises(ConfigurationError, match="memory"):
        SQLiteStore(":memory:")


def test_open_store_urls(tmp_path: Path) -> None:
    """memory:// and sqlite:/// build stores; other URLs are refused naming the URL."""
    assert isinstance(open_store("memory://"), MemoryStore)
    sqlite_store = open_store(f"sqlite:///{tmp_path}/u.db")
    assert isinstance(sqlite_store, SQLiteStore) and sqlite_store.path == f"{tmp_path}/u.db"
    sqlite_store.close()
    for bad in ("redis://localhost", "sqlite://", "nonsense"):
        with pytest.raises(ConfigurationError, match="URL"):
            open_store(bad)
