"""The SQL only SQLiteStore runs: its schema spelling, the claim and the batched completion: its one job.

The statements both SQL stores share are in :mod:`threaddispatch.stores._sql`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from threaddispatch.stores import _sql
from threaddispatch.stores._sql import job_from_row
from threaddispatch.stores.base import Completion, JobRecord, QueueLimits

__all__ = [
    "FRESH_COLUMNS",
    "INSERT_ROWS",
    "SCHEMA_V1",
    "SCHEMA_V2",
    "SCHEMA_V3",
    "SCHEMA_V4",
    "SCHEMA_V5",
    "SCHEMA_V6",
    "SCHEMA_V7",
    "SCHEMA_V8",
    "SCHEMA_V9",
    "SCHEMA_V10",
    "SCHEMA_V11",
    "SCHEMA_V12",
    "STATEMENTS",
    "TYPES",
    "UNSET_COLUMNS",
    "chunks",
    "claim_in",
    "claim_rows_in",
    "complete_alone_in",
    "complete_in",
    "fresh_params",
    "insert_fresh_in",
    "jobs_from_claim",
    "marks",
]

_CHUNK = 500  # ids per statement, far below SQLite's variable limit

TYPES: _sql.Types = {"SEQ": "INTEGER PRIMARY KEY", "INT": "INTEGER", "REAL": "REAL", "BOOL": "INTEGER"}
# The claim index's keys: seq is the implicit last key of a SQLite index.
SCHEMA_V1 = _sql.schema_v1(TYPES, ready_keys="queue, priority DESC, run_at")
SCHEMA_V2 = _sql.schema_workers(TYPES)  # the worker registry
SCHEMA_V3 = _sql.schema_trace_context(TYPES)  # the enqueuing span's traceparent, on jobs and dead letters
SCHEMA_V4 = _sql.schema_dependencies(TYPES)  # depends_on, the waiting state and dispatch_job_deps
SCHEMA_V5 = _sql.schema_locks(TYPES)  # serial locks
SCHEMA_V6 = _sql.schema_cron_overlap(TYPES)  # a cron entry's overlap policy
SCHEMA_V7 = _sql.schema_queue_limits(TYPES)  # cluster limits: each queue's limits and token bucket
# Migration 8: the ready log, the wake-ups for jobs an UPDATE makes claimable (the watcher sees
# inserted rows by seq, not updated ones): a job becoming pending or retrying from any other
# state (a released dependent, a job handed back, reaped, requeued, a failed attempt's retry),
# and the next job of a serial lock once its holder finished (that job's state does not change:
# its turn comes). Row triggers in the updating transaction; their WHEN is all a claim
# (pending -> running) or a completion without a lock costs. ``at`` is the wall clock (not the
# caller's ``now``); each insert deletes the two oldest rows if they are over a minute old, so
# the log stays about a minute long whether a watcher runs or not.
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_PRUNE = (
    "DELETE FROM dispatch_ready_log WHERE seq IN (SELECT seq FROM dispatch_ready_log ORDER BY seq LIMIT 2) "
    f"AND at < {_NOW} - 60.0;"
)
SCHEMA_V8 = (
    "CREATE TABLE IF NOT EXISTS dispatch_ready_log (seq INTEGER PRIMARY KEY, queue TEXT NOT NULL, "
    "run_at REAL NOT NULL, at REAL NOT NULL)",
    f"""CREATE TRIGGER IF NOT EXISTS dispatch_jobs_ready AFTER UPDATE OF state ON dispatch_jobs
        WHEN NEW.state IN {_sql.READY} AND OLD.state NOT IN {_sql.READY}
        BEGIN
            INSERT INTO dispatch_ready_log (queue, run_at, at) VALUES (NEW.queue, NEW.run_at, {_NOW});
            {_PRUNE}
        END""",
    f"""CREATE TRIGGER IF NOT EXISTS dispatch_jobs_unlocked AFTER UPDATE OF state ON dispatch_jobs
        WHEN OLD.lock_key IS NOT NULL AND OLD.state IN {_sql.ACTIVE} AND NEW.state IN {_sql.FINAL}
        BEGIN
            INSERT INTO dispatch_ready_log (queue, run_at, at)
            SELECT queue, run_at, {_NOW} FROM (SELECT queue, run_at, state FROM dispatch_jobs
                WHERE lock_key = OLD.lock_key AND state IN {_sql.ACTIVE} ORDER BY seq LIMIT 1)
            WHERE state IN {_sql.READY};
            {_PRUNE}
        END""",
)
# Migration 9: a queue resumed by any process (its dispatch_queues row set unpaused, or deleted
# while paused) is a ready log row ``(queue, run_at = when it was resumed)``: the watchers of every
# process announce it like a job made ready, so engines idle on that queue look at it now. Pausing,
# and "resuming" a queue that was not paused, write none.
SCHEMA_V9 = (
    f"""CREATE TRIGGER IF NOT EXISTS dispatch_queues_resumed AFTER UPDATE OF paused ON dispatch_queues
        WHEN OLD.paused AND NOT NEW.paused
        BEGIN
            INSERT INTO dispatch_ready_log (queue, run_at, at) VALUES (NEW.queue, {_NOW}, {_NOW});
            {_PRUNE}
        END""",
    f"""CREATE TRIGGER IF NOT EXISTS dispatch_queues_unpaused AFTER DELETE ON dispatch_queues
        WHEN OLD.paused
        BEGIN
            INSERT INTO dispatch_ready_log (queue, run_at, at) VALUES (OLD.queue, {_NOW}, {_NOW});
            {_PRUNE}
        END""",
)
# Migration 10: lock holds (LockHold), and their release's wake-up: deleting a hold (its handler
# returned, or its worker was reaped) logs the lock's next job when that one is ready, as the
# unlocked trigger does for a job finishing (a hold of another claim may still keep the lock:
# the watcher's wake-up then claims nothing, harmlessly).
SCHEMA_V10 = (
    *_sql.schema_lock_holds(TYPES),
    f"""CREATE TRIGGER IF NOT EXISTS dispatch_lock_holds_released AFTER DELETE ON dispatch_lock_holds
        BEGIN
            INSERT INTO dispatch_ready_log (queue, run_at, at)
            SELECT queue, run_at, {_NOW} FROM (SELECT queue, run_at, state FROM dispatch_jobs
                WHERE lock_key = OLD.lock_key AND state IN {_sql.ACTIVE} ORDER BY seq LIMIT 1)
            WHERE state IN {_sql.READY};
            {_PRUNE}
        END""",
)
# Migration 11: a dead letter keeps its job's lock, unique key, dependencies and timeout (for its replay).
SCHEMA_V11 = _sql.schema_letter_job(TYPES)
# Migration 12: the waits' index by waiting job, which a dependent's release and its waiting_on
# read (STATEMENTS counts the waits left instead of decrementing a count on the dependent's row).
SCHEMA_V12 = _sql.schema_dependents_index(TYPES)
#: The shared statements in sqlite3's placeholder style; a dependent's waits are counted (see Statements).
STATEMENTS = _sql.Statements("?", counted_waits=True)


def chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    """``ids`` in slices of at most 500 (an IN list far below SQLite's variable limit)."""
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def marks(count: int) -> str:
    """``count`` comma-separated ``?`` placeholders."""
    return ", ".join("?" * count)


#: The columns a new job's INSERT names (:func:`fresh_params`); the others of ``JOB_COLUMNS``
#: (:data:`UNSET_COLUMNS`, all nullable without a default) are NULL in a new job and left out: each
#: column bound costs, and a 4-job INSERT of these 16 measured 20% less CPU than one of all 24.
FRESH_COLUMNS = (
    "id", "name", "payload", "queue", "state", "priority", "attempts", "max_retries", "timeout", "run_at",
    "created_at", "updated_at", "trace_context", "on_dependency_failure", "waiting_on", "lock_key",
)  # fmt: skip
UNSET_COLUMNS = (
    "started_at", "finished_at", "heartbeat_at", "worker_id", "unique_key", "result", "error", "depends_on",
)  # fmt: skip
#: Jobs per INSERT statement: 16 variables each, 512 in all (below even an old SQLite's 999).
INSERT_ROWS = 32
_INSERT_HEAD = f"INSERT INTO dispatch_jobs ({', '.join(FRESH_COLUMNS)}) VALUES "
_INSERT_ROW = f"({marks(len(FRESH_COLUMNS))})"
_INSERT_SQL: dict[int, str] = {}  # the INSERT of ``count`` new jobs, by count, built on first use


def fresh_params(job: JobRecord) -> tuple[Any, ...] | None:
    """The values of :data:`FRESH_COLUMNS` for ``job``; None unless ``job`` is new and plain: no unique
    key or dependencies (those look up or settle first) and NULL in every :data:`UNSET_COLUMNS`."""
    if (
        job.unique_key is not None
        or job.depends_on
        or job.started_at is not None
        or job.finished_at is not None
        or job.heartbeat_at is not None
        or job.worker_id is not None
        or job.result is not None
        or job.error is not None
    ):
        return None
    return (job.id, job.name, job.payload, job.queue, job.state.value, job.priority, job.attempts, job.max_retries,
            job.timeout, job.run_at, job.created_at, job.updated_at, job.trace_context, job.on_dependency_failure,
            job.waiting_on, job.lock)  # fmt: skip


def _insert_sql(count: int) -> str:
    """One INSERT of ``count`` new jobs (VALUES in order: their seqs follow that order)."""
    sql = _INSERT_SQL.get(count)
    if sql is None:
        sql = _INSERT_SQL.setdefault(count, _INSERT_HEAD + ", ".join([_INSERT_ROW] * count))
    return sql


def insert_fresh_in(conn: sqlite3.Connection, params: Sequence[Any], count: int) -> int | None:
    """Insert ``count`` new jobs, ``params`` their :func:`fresh_params` flattened in order, as one INSERT
    per :data:`INSERT_ROWS` (one statement is atomic on its own: more than one needs the caller's
    transaction). The seq of the last row inserted."""
    if count <= INSERT_ROWS:
        return conn.execute(_insert_sql(count), params).lastrowid
    width = len(params) // count
    last: int | None = None
    for start in range(0, count, INSERT_ROWS):
        rows = min(INSERT_ROWS, count - start)
        last = conn.execute(_insert_sql(rows), params[start * width : (start + rows) * width]).lastrowid
    return last


def _claim_sql(queue_count: int, holds: bool) -> str:
    """The claim statement for ``queue_count`` queues: (worker_id, now, now, now, *queues, now, limit).

    ``holds``: the file has ``dispatch_lock_holds`` (migration 10), which the lock check reads."""
    return (
        "UPDATE dispatch_jobs SET state = 'running', worker_id = ?, attempts = attempts + 1, "
        "started_at = ?, heartbeat_at = ?, updated_at = ? "
        "WHERE seq IN (SELECT j.seq FROM dispatch_jobs AS j WHERE j.state IN ('pending', 'retrying') "
        f"AND j.queue IN ({marks(queue_count)}) AND j.run_at <= ? AND {_sql.lock_free('j', holds=holds)} "
        "ORDER BY j.priority DESC, j.run_at, j.seq LIMIT ?) "
        f"RETURNING {_sql.JOB_COLUMNS}"
    )


_CLAIM_SQL: dict[tuple[int, bool], str] = {}  # _claim_sql by (number of queues, holds), built on first use


_COMPLETE_ROWS = 100  # outcomes per completion statement (5 variables each)
_COMPLETE_SQL: dict[int, str] = {}  # _complete_sql by number of outcomes, built on first use


_ALONE_SQL: dict[int, str] = {}  # _complete_sql(count, alone=True) by number of outcomes
_NO_DEPENDENTS = "NOT EXISTS (SELECT 1 FROM dispatch_job_deps AS d WHERE d.depends_on = dispatch_jobs.id)"


def _complete_sql(count: int, *, alone: bool = False) -> str:
    """Complete ``count`` claims in one statement: (now, now, *(job_id, worker_id, attempts, result, error)...);
    RETURNING each applied id. ``alone``: only jobs without dependents (an indexed probe per job; the same
    test in RETURNING would scan the dependencies' index).

    A claim is completed only while it is still that worker's running attempt, as ``Statements.complete``.
    """
    rows = ", ".join(["(?, ?, ?, ?, ?)"] * count)
    return (
        "UPDATE dispatch_jobs SET state = 'completed', result = v.column4, error = v.column5, finished_at = ?, "
        f"updated_at = ? FROM (VALUES {rows}) AS v WHERE dispatch_jobs.id = v.column1 "
        "AND dispatch_jobs.state = 'running' AND dispatch_jobs.worker_id = v.column2 "
        f"AND dispatch_jobs.attempts = v.column3 {f'AND {_NO_DEPENDENTS} ' if alone else ''}"
        "RETURNING dispatch_jobs.id"
    )


def _complete_chunks(
    outcomes: Sequence[Completion], now: float, *, alone: bool
) -> Iterator[tuple[str, list[Any], Sequence[Completion]]]:
    """The completion statements for ``outcomes``, :data:`_COMPLETE_ROWS` at a time: (sql, params, chunk)."""
    cache = _ALONE_SQL if alone else _COMPLETE_SQL
    for start in range(0, len(outcomes), _COMPLETE_ROWS):
        chunk = outcomes[start : start + _COMPLETE_ROWS]
        sql = cache.get(len(chunk))
        if sql is None:
            sql = cache.setdefault(len(chunk), _complete_sql(len(chunk), alone=alone))
        params: list[Any] = [now, now]
        for outcome in chunk:
            params.extend(outcome)
        yield sql, params, chunk


def complete_alone_in(
    conn: sqlite3.Connection, outcomes: Sequence[Completion], now: float
) -> tuple[set[str], list[Completion]]:
    """Complete the ``outcomes`` whose jobs have no dependents, one statement per 100: each is a whole
    transaction on its own (nothing to release with it), so no BEGIN/COMMIT is needed. The ids applied,
    and the outcomes not applied (a job with dependents, or a claim no longer running) for :func:`complete_in`."""
    done: set[str] = set()
    rest: list[Completion] = []
    for sql, params, chunk in _complete_chunks(outcomes, now, alone=True):
        applied = {row[0] for row in conn.execute(sql, params).fetchall()}
        done |= applied
        rest.extend(outcome for outcome in chunk if outcome.job_id not in applied)
    return done, rest


def complete_in(conn: sqlite3.Connection, outcomes: Sequence[Completion], now: float) -> set[str]:
    """Complete ``outcomes`` (job_id, worker_id, attempts, result, error) in the open transaction; the ids applied."""
    done: set[str] = set()
    for sql, params, _chunk in _complete_chunks(outcomes, now, alone=False):
        applied = [row[0] for row in conn.execute(sql, params).fetchall()]
        done.update(applied)
        release_in(conn, applied, "completed", now)
    return done


def release_in(conn: sqlite3.Connection, finished: Sequence[str], state: str, now: float) -> None:
    """Release the waiting dependents of the jobs ``finished`` (that ended in ``state``) in the open transaction.

    One indexed DELETE per 500 ids finds them; jobs with no dependents cost only that probe.
    """
    for chunk in chunks(finished):
        rows = conn.execute(
            f"DELETE FROM dispatch_job_deps WHERE depends_on IN ({marks(len(chunk))}) RETURNING job_id, depends_on",
            chunk,
        ).fetchall()
        if rows:
            STATEMENTS.release_dependents(conn, rows, state, now)


def _claim_order(job: JobRecord) -> tuple[int, float]:
    return (-job.priority, job.run_at)


def claim_in(
    conn: sqlite3.Connection,
    queues: Sequence[str],
    limit: int,
    worker_id: str,
    now: float,
    *,
    limits: Mapping[str, QueueLimits] | None = None,
    holds: bool = True,
) -> list[JobRecord]:
    """Claim up to ``limit`` due jobs of ``queues`` for ``worker_id`` in the open transaction, in claim order.

    A queue of ``limits`` is claimed alone, within its cluster limits (the write transaction
    keeps every other claimer of the file out of its bucket until the commit). ``holds``: the
    file has the lock holds' table (see :func:`claim_rows_in`).
    """
    if limit <= 0 or not queues:
        return []
    if limits and any(queue in limits for queue in queues):
        return _claim_limited(conn, queues, limit, worker_id, now=now, limits=limits, holds=holds)
    return jobs_from_claim(claim_rows_in(conn, queues, limit, worker_id, now, holds=holds))


def claim_rows_in(
    conn: sqlite3.Connection, queues: Sequence[str], limit: int, worker_id: str, now: float, *, holds: bool = True
) -> list[tuple[Any, ...]]:
    """claim_in over queues none of which is limited, as ONE statement; the claimed rows, for
    :func:`jobs_from_claim` (after the commit: no Python work inside the write lock). ``holds``:
    the file has ``dispatch_lock_holds`` (False only for a file kept below migration 10)."""
    if limit <= 0 or not queues:
        return []
    key = (len(queues), holds)
    sql = _CLAIM_SQL.get(key)
    if sql is None:
        sql = _CLAIM_SQL.setdefault(key, _claim_sql(len(queues), holds))
    rows: list[tuple[Any, ...]] = conn.execute(sql, (worker_id, now, now, now, *queues, now, limit)).fetchall()
    return rows


def jobs_from_claim(rows: Sequence[Sequence[Any]]) -> list[JobRecord]:
    """The jobs of :func:`claim_rows_in`'s rows, in claim order (RETURNING gives rows in no particular order)."""
    jobs = [job_from_row(row) for row in rows]
    if len(jobs) > 1:
        jobs.sort(key=_claim_order)
    return jobs


def _claim_limited(
    conn: sqlite3.Connection,
    queues: Sequence[str],
    limit: int,
    worker_id: str,
    *,
    now: float,
    limits: Mapping[str, QueueLimits],
    holds: bool,
) -> list[JobRecord]:
    """claim_in over queues some of which are limited: each limited one alone, then the others together."""
    jobs: list[JobRecord] = []
    names = list(dict.fromkeys(queues))
    for queue in names:
        if queue in limits and len(jobs) < limit:

            def claim(count: int, queue: str = queue) -> list[JobRecord]:
                return claim_in(conn, [queue], count, worker_id, now, holds=holds)

            jobs.extend(STATEMENTS.claim_limited(conn, limits[queue], limit - len(jobs), now, claim))
    free = [queue for queue in names if queue not in limits]
    if free and len(jobs) < limit:
        jobs.extend(claim_in(conn, free, limit - len(jobs), worker_id, now, holds=holds))
    jobs.sort(key=_claim_order)
    return jobs
