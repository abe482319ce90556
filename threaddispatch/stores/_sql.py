"""The SQL and row mapping the SQL stores (SQLiteStore, PostgresStore) share: its one job.

Both keep the same tables, so the column lists, row -> record mapping, listing filters and
every statement whose text differs only in its placeholder live here, written once.
:class:`Statements` builds them for one placeholder style (``"?"`` for sqlite3, ``"%s"``
for psycopg) once, at import of the store. The schema DDL is one column list
(:data:`TABLES`) that :func:`schema_v1` (and, for the later worker registry,
:func:`schema_workers`) spells in each backend's types. What differs
between the backends (claims, transactions and locking, RETURNING and CTE forms, COPY,
NOTIFY) stays in its own store.

It runs past 600 lines because it is the one copy of the shared SQL: every statement both
stores run, each written once (the alternative, one copy per store, is what it replaced).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, TypedDict

from threaddispatch.errors import InvalidStateError, JobNotFoundError
from threaddispatch.stores.base import (
    CronEntry,
    DeadLetter,
    JobRecord,
    JobState,
    LockHold,
    QueueLimits,
    WorkerInfo,
    key_held,
    limited_room,
    requeue_waits,
)

Column = tuple[str, str, str]  # (name, generic type, constraints)

#: Every table both SQL stores create, and its columns in order. Types are generic: SEQ (the
#: insertion-order primary key), INT (64-bit), REAL and BOOL, spelled by each backend's
#: :class:`Types`; TEXT and INTEGER (32-bit) are spelled alike by both. The columns after
#: ``seq`` follow JobRecord's, DeadLetter's and CronEntry's fields, so ``JobRecord(*row)``
#: builds a record from a row of :data:`JOB_COLUMNS`.
TABLES: dict[str, tuple[Column, ...]] = {
    "dispatch_jobs": (
        ("seq", "SEQ", ""),
        ("id", "TEXT", "NOT NULL UNIQUE"),
        ("name", "TEXT", "NOT NULL"),
        ("payload", "TEXT", "NOT NULL"),
        ("queue", "TEXT", "NOT NULL"),
        ("state", "TEXT", "NOT NULL"),
        ("priority", "INT", "NOT NULL DEFAULT 0"),
        ("attempts", "INT", "NOT NULL DEFAULT 0"),
        ("max_retries", "INT", "NOT NULL"),
        ("timeout", "REAL", ""),
        ("run_at", "REAL", "NOT NULL"),
        ("created_at", "REAL", "NOT NULL"),
        ("updated_at", "REAL", "NOT NULL"),
        ("started_at", "REAL", ""),
        ("finished_at", "REAL", ""),
        ("heartbeat_at", "REAL", ""),
        ("worker_id", "TEXT", ""),
        ("unique_key", "TEXT", ""),
        ("result", "TEXT", ""),
        ("error", "TEXT", ""),
        ("trace_context", "TEXT", ""),  # added by a later migration (LATER_COLUMNS), as those below
        ("depends_on", "TEXT", ""),  # a JSON list of job ids, NULL for none
        ("on_dependency_failure", "TEXT", "NOT NULL DEFAULT 'cancel'"),
        ("waiting_on", "INT", "NOT NULL DEFAULT 0"),
        ("lock_key", "TEXT", ""),  # JobRecord.lock (LOCK is an SQL keyword)
    ),
    # One row per (waiting job, job it still waits for): deleted when the dependency finishes
    # (which releases the job). A later migration (see schema_dependencies).
    "dispatch_job_deps": (
        ("job_id", "TEXT", "NOT NULL"),
        ("depends_on", "TEXT", "NOT NULL"),
    ),
    "dispatch_dead_letters": (
        ("seq", "SEQ", ""),
        ("id", "TEXT", "NOT NULL UNIQUE"),
        ("job_id", "TEXT", "NOT NULL"),
        ("name", "TEXT", "NOT NULL"),
        ("queue", "TEXT", "NOT NULL"),
        ("payload", "TEXT", "NOT NULL"),
        ("priority", "INT", "NOT NULL"),
        ("max_retries", "INT", "NOT NULL"),
        ("attempts", "INT", "NOT NULL"),
        ("error", "TEXT", ""),
        ("failed_at", "REAL", "NOT NULL"),
        ("trace_context", "TEXT", ""),  # added by a later migration (LATER_COLUMNS), as those below
        # The failed job's fields a replay keeps (LETTER_JOB_COLUMNS: the jobs' columns of the same
        # names), so its replay keeps them once the job is purged. NULL on_dependency_failure: a
        # letter stored before that migration (or by a release before it), which kept none of them.
        ("unique_key", "TEXT", ""),
        ("lock_key", "TEXT", ""),
        ("depends_on", "TEXT", ""),
        ("on_dependency_failure", "TEXT", ""),
        ("timeout", "REAL", ""),
    ),
    "dispatch_crons": (
        ("name", "TEXT", "PRIMARY KEY"),
        ("expression", "TEXT", "NOT NULL"),
        ("job_name", "TEXT", "NOT NULL"),
        ("payload", "TEXT", "NOT NULL"),
        ("queue", "TEXT", "NOT NULL"),
        ("priority", "INT", "NOT NULL"),
        ("last_tick", "REAL", ""),
        ("created_at", "REAL", "NOT NULL"),
        ("updated_at", "REAL", "NOT NULL"),
        ("overlap", "TEXT", "NOT NULL DEFAULT 'skip'"),  # a later migration (LATER_COLUMNS)
    ),
    "dispatch_leases": (
        ("name", "TEXT", "PRIMARY KEY"),
        ("holder", "TEXT", "NOT NULL"),
        ("expires_at", "REAL", "NOT NULL"),
    ),
    "dispatch_queues": (
        ("queue", "TEXT", "PRIMARY KEY"),
        ("paused", "BOOL", "NOT NULL"),
        ("updated_at", "REAL", "NOT NULL"),
    ),
    # A queue's limits for the whole cluster and its token bucket (a later migration: see
    # schema_queue_limits). ``rate`` / ``max_running`` NULL: no such limit.
    "dispatch_queue_limits": (
        ("queue", "TEXT", "PRIMARY KEY"),
        ("rate", "REAL", ""),
        ("burst", "INT", "NOT NULL"),
        ("max_running", "INT", ""),
        ("tokens", "REAL", "NOT NULL"),
        ("updated_at", "REAL", "NOT NULL"),
    ),
    # The worker registry (a later migration: see schema_workers); its columns follow WorkerInfo's
    # fields, ``queues`` as a JSON list.
    "dispatch_workers": (
        ("id", "TEXT", "PRIMARY KEY"),
        ("host", "TEXT", "NOT NULL"),
        ("pid", "INT", "NOT NULL"),
        ("queues", "TEXT", "NOT NULL"),
        ("concurrency", "INT", "NOT NULL"),
        ("started_at", "REAL", "NOT NULL"),
        ("heartbeat_at", "REAL", "NOT NULL"),
        ("running", "INT", "NOT NULL"),
    ),
    # Serial locks held past their job's running state while its handler still runs (LockHold;
    # a later migration: see schema_lock_holds). One row per claim (job_id, attempts, worker_id).
    "dispatch_lock_holds": (
        ("lock_key", "TEXT", "NOT NULL"),
        ("job_id", "TEXT", "NOT NULL"),
        ("attempts", "INT", "NOT NULL"),
        ("worker_id", "TEXT", "NOT NULL"),
        ("heartbeat_at", "REAL", "NOT NULL"),
    ),
}
#: The columns of ``dispatch_dead_letters`` copied from the failed job's columns of the same names
#: (a later migration: :func:`schema_letter_job`); the rest of :data:`LETTER_COLUMNS` came before.
LETTER_JOB_COLUMNS = ("unique_key", "lock_key", "depends_on", "on_dependency_failure", "timeout")
#: The columns of :data:`TABLES` that later migrations add to tables created before them (by
#: :func:`add_columns`), by table; :func:`schema_v1` leaves them out. Each must be nullable or
#: have a default, so the rows already stored stay valid.
LATER_COLUMNS: dict[str, tuple[str, ...]] = {
    "dispatch_jobs": ("trace_context", "depends_on", "on_dependency_failure", "waiting_on", "lock_key"),
    "dispatch_dead_letters": ("trace_context", *LETTER_JOB_COLUMNS),
    "dispatch_crons": ("overlap",),
}
#: The migration ledger, created before any migration runs (so not part of one).
VERSION_TABLE: tuple[Column, ...] = (
    ("version", "INTEGER", "PRIMARY KEY"),
    ("description", "TEXT", "NOT NULL"),
    ("applied_at", "REAL", "NOT NULL"),
)


class Types(TypedDict):
    """One backend's spelling of the generic column types of :data:`TABLES`."""

    SEQ: str
    INT: str
    REAL: str
    BOOL: str


def _names(table: str) -> str:
    return ", ".join(name for name, _type, _constraints in TABLES[table] if name != "seq")


JOB_COLUMNS = _names("dispatch_jobs")
#: JOB_COLUMNS as SQLiteStore reads them (``Statements(counted_waits=True)``): a waiting job's
#: ``waiting_on`` is the number of its ``dispatch_job_deps`` rows left, counted in the reading
#: statement (one snapshot with its state); the column keeps the count it began waiting with.
JOB_READ_COLUMNS = ", ".join(
    "CASE WHEN state = 'waiting' THEN (SELECT count(*) FROM dispatch_job_deps AS w WHERE w.job_id = "
    "dispatch_jobs.id) ELSE waiting_on END"
    if name == "waiting_on"
    else name
    for name in JOB_COLUMNS.split(", ")
)
_JOB_WIDTH = len(TABLES["dispatch_jobs"]) - 1  # the columns of JOB_COLUMNS
LETTER_COLUMNS = _names("dispatch_dead_letters")
#: LETTER_COLUMNS of a schema before :func:`schema_letter_job` (a store kept below that migration).
_LETTER_BEFORE_JOB = ", ".join(name for name in LETTER_COLUMNS.split(", ") if name not in LETTER_JOB_COLUMNS)
_LETTER_WIDTH = len(_LETTER_BEFORE_JOB.split(", "))
CRON_COLUMNS = _names("dispatch_crons")
WORKER_COLUMNS = _names("dispatch_workers")
HOLD_COLUMNS = _names("dispatch_lock_holds")
#: SQL lists of the ACTIVE_STATES, READY_STATES and FINAL_STATES.
ACTIVE = "('pending', 'retrying', 'running', 'waiting')"
_V1_ACTIVE = "('pending', 'retrying', 'running')"  # ACTIVE_STATES before the waiting state (migration 1's index)
READY = "('pending', 'retrying')"
#: The active states of a job no worker holds: ready, or waiting for its dependencies.
UNCLAIMED = "('pending', 'retrying', 'waiting')"
FINAL = "('completed', 'failed', 'cancelled')"
_FINAL_VALUES = frozenset({"completed", "failed", "cancelled"})
#: Variables per sqlite3 statement of the dependencies' batches (IN lists, VALUES pairs): far below
#: SQLite's limit (999 before 3.32).
_DEP_CHUNK = 500


def letter_columns(job_fields: bool) -> str:
    """:data:`LETTER_COLUMNS`, or (``job_fields`` False: a schema before :func:`schema_letter_job`) those before it."""
    return LETTER_COLUMNS if job_fields else _LETTER_BEFORE_JOB


def letter_copy(job_fields: bool) -> str:
    """The jobs' columns a dead letter copies after its error and failed_at, in :func:`letter_columns` order."""
    return ", ".join(("trace_context", *LETTER_JOB_COLUMNS)) if job_fields else "trace_context"


def _create_table(table: str, columns: Sequence[Column], types: Types) -> str:
    spelled = {"TEXT": "TEXT", "INTEGER": "INTEGER", "SEQ": types["SEQ"], "INT": types["INT"],
               "REAL": types["REAL"], "BOOL": types["BOOL"]}  # fmt: skip
    lines = [f"{name} {spelled[kind]} {constraints}".rstrip() for name, kind, constraints in columns]
    body = ",\n        ".join(lines)
    return f"CREATE TABLE IF NOT EXISTS {table} (\n        {body})"


def version_table(types: Types) -> str:
    """The ``CREATE TABLE IF NOT EXISTS dispatch_schema_version`` statement in ``types``."""
    return _create_table("dispatch_schema_version", VERSION_TABLE, types)


def schema_v1(types: Types, *, ready_keys: str) -> tuple[str, ...]:
    """Migration 1's statements: the tables of :data:`TABLES` in ``types``, and their indexes.

    ``ready_keys`` are the claim index's keys, which must give the claim order (priority
    descending, run_at, seq) to a backend's ready-jobs scan.
    """
    table = {
        name: _create_table(name, [c for c in columns if c[0] not in LATER_COLUMNS.get(name, ())], types)
        for name, columns in TABLES.items()
    }
    return (
        table["dispatch_jobs"],
        # The claim index: ready jobs of a queue in claim order.
        f"CREATE INDEX IF NOT EXISTS dispatch_jobs_ready ON dispatch_jobs ({ready_keys}) WHERE state IN {READY}",
        "CREATE INDEX IF NOT EXISTS dispatch_jobs_running ON dispatch_jobs (heartbeat_at) WHERE state = 'running'",
        f"CREATE INDEX IF NOT EXISTS dispatch_jobs_finished ON dispatch_jobs (finished_at) WHERE state IN {FINAL}",
        _unique_index(_V1_ACTIVE),
        table["dispatch_dead_letters"],
        "CREATE INDEX IF NOT EXISTS dispatch_dead_letters_job ON dispatch_dead_letters (job_id)",
        table["dispatch_crons"],
        table["dispatch_leases"],
        table["dispatch_queues"],
    )


def add_columns(types: Types, table: str, names: Sequence[str]) -> tuple[str, ...]:
    """``ALTER TABLE table ADD COLUMN`` statements for the columns ``names`` of :data:`TABLES` (see LATER_COLUMNS)."""
    spelled = {"TEXT": "TEXT", "INTEGER": "INTEGER", **types}
    columns = {name: (kind, constraints) for name, kind, constraints in TABLES[table]}
    return tuple(
        f"ALTER TABLE {table} ADD COLUMN {name} {spelled[columns[name][0]]} {columns[name][1]}".rstrip()
        for name in names
    )


def schema_trace_context(types: Types) -> tuple[str, ...]:
    """The trace context's migration: a ``trace_context`` column on jobs and on dead letters."""
    return (
        *add_columns(types, "dispatch_jobs", ("trace_context",)),
        *add_columns(types, "dispatch_dead_letters", ("trace_context",)),
    )


def schema_letter_job(types: Types) -> tuple[str, ...]:
    """The dead letters' migration: the failed job's lock, unique key, dependencies and timeout on its letter."""
    return add_columns(types, "dispatch_dead_letters", LETTER_JOB_COLUMNS)


def _unique_index(active: str) -> str:
    return (
        "CREATE UNIQUE INDEX IF NOT EXISTS dispatch_jobs_unique ON dispatch_jobs (unique_key) "
        f"WHERE unique_key IS NOT NULL AND state IN {active}"
    )


def schema_dependencies(types: Types) -> tuple[str, ...]:
    """The dependencies' migration: the jobs' dependency columns, ``dispatch_job_deps``, and the
    unique-key index rebuilt so that a waiting job holds its key."""
    return (
        *add_columns(types, "dispatch_jobs", ("depends_on", "on_dependency_failure", "waiting_on")),
        _create_table("dispatch_job_deps", TABLES["dispatch_job_deps"], types),
        "CREATE INDEX IF NOT EXISTS dispatch_job_deps_on ON dispatch_job_deps (depends_on)",
        "CREATE INDEX IF NOT EXISTS dispatch_jobs_waiting ON dispatch_jobs (seq) WHERE state = 'waiting'",
        "DROP INDEX IF EXISTS dispatch_jobs_unique",
        _unique_index(ACTIVE),
    )


def schema_dependents_index(types: Types) -> tuple[str, ...]:
    """The waits' index by waiting job, ``dispatch_job_deps (job_id)``: SQLite's release (is any row of
    the dependent left?) and its read of a waiting job's ``waiting_on`` (how many are left: see
    :data:`JOB_READ_COLUMNS`), the upkeep's sweeps (one probe per waiting job instead of a scan of
    every row: O(waiting x rows) before, 7 s for 10k jobs waiting on one) and a requeue's delete."""
    del types  # the same spelling on both backends
    return ("CREATE INDEX IF NOT EXISTS dispatch_job_deps_job ON dispatch_job_deps (job_id)",)


def schema_locks(types: Types) -> tuple[str, ...]:
    """The serial locks' migration: the jobs' ``lock_key``, and the index the claim's lock check reads."""
    return (
        *add_columns(types, "dispatch_jobs", ("lock_key",)),
        "CREATE INDEX IF NOT EXISTS dispatch_jobs_lock ON dispatch_jobs (lock_key, seq) "
        f"WHERE lock_key IS NOT NULL AND state IN {ACTIVE}",
    )


def schema_cron_overlap(types: Types) -> tuple[str, ...]:
    """The cron overlap policy's migration: ``dispatch_crons.overlap`` (existing entries: ``'skip'``)."""
    return add_columns(types, "dispatch_crons", ("overlap",))


def schema_queue_limits(types: Types) -> tuple[str, ...]:
    """The cluster limits' migration: ``dispatch_queue_limits``, and the index counting a queue's running jobs."""
    return (
        _create_table("dispatch_queue_limits", TABLES["dispatch_queue_limits"], types),
        "CREATE INDEX IF NOT EXISTS dispatch_jobs_running_queue ON dispatch_jobs (queue) WHERE state = 'running'",
    )


def lock_free(alias: str, *, holds: bool = True) -> str:
    """The claim's serial-lock condition on the candidate row ``alias``: no lock, or it is the lock's turn.

    Its turn: no job with the lock is running, none inserted before it (lower seq) is still
    active, and (``holds``: the schema has ``dispatch_lock_holds``) no hold of the lock is
    left by a handler still running past its job's running state. Inside one claim statement
    every candidate is judged on the same snapshot, so of a lock's ready jobs only the first
    passes; on PostgreSQL a concurrent claim that locked that first one skips it and finds the
    others still behind it (it is active). A hold is stored before its job leaves the running
    state (or in the same transaction), so every snapshot sees one or the other.
    """
    held = f" AND NOT EXISTS (SELECT 1 FROM dispatch_lock_holds AS h WHERE h.lock_key = {alias}.lock_key)"
    return (
        f"({alias}.lock_key IS NULL OR (NOT EXISTS (SELECT 1 FROM dispatch_jobs AS held "
        f"WHERE held.lock_key = {alias}.lock_key AND held.state IN {ACTIVE} "
        f"AND (held.state = 'running' OR held.seq < {alias}.seq)){held if holds else ''}))"
    )


def schema_workers(types: Types) -> tuple[str, ...]:
    """The worker registry's migration: its table in ``types``, and the reaper's index."""
    return (
        _create_table("dispatch_workers", TABLES["dispatch_workers"], types),
        "CREATE INDEX IF NOT EXISTS dispatch_workers_heartbeat ON dispatch_workers (heartbeat_at)",
    )


def schema_lock_holds(types: Types) -> tuple[str, ...]:
    """The lock holds' migration: ``dispatch_lock_holds`` (one row per claim) and the claim's lock-check index."""
    return (
        _create_table("dispatch_lock_holds", TABLES["dispatch_lock_holds"], types),
        "CREATE UNIQUE INDEX IF NOT EXISTS dispatch_lock_holds_claim "
        "ON dispatch_lock_holds (job_id, attempts, worker_id)",
        "CREATE INDEX IF NOT EXISTS dispatch_lock_holds_lock ON dispatch_lock_holds (lock_key)",
    )


def hold_from_row(row: Sequence[Any]) -> LockHold:
    """A :class:`LockHold` from a row of :data:`HOLD_COLUMNS`."""
    lock, job_id, attempts, worker_id, heartbeat_at = row
    return LockHold(lock, job_id, int(attempts), worker_id, float(heartbeat_at))


_LIST_JOBS = "SELECT {columns} FROM dispatch_jobs {where}ORDER BY created_at DESC, seq DESC LIMIT {m} OFFSET {m}"
_LIST_LETTERS = (
    "SELECT {columns} FROM dispatch_dead_letters {where}ORDER BY failed_at DESC, seq DESC LIMIT {m} OFFSET {m}"
)

Mark = Literal["?", "%s"]


class _Connection(Protocol):
    """What :class:`Statements`' methods need of a connection: sqlite3's and psycopg's both fit."""

    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Any: ...


_STATES: dict[str, JobState] = {state.value: state for state in JobState}


def job_from_row(row: Sequence[Any]) -> JobRecord:
    """A :class:`JobRecord` from a row of :data:`JOB_COLUMNS`."""
    job = JobRecord(*row)
    state = _STATES.get(job.state)
    job.state = JobState(job.state) if state is None else state
    depends_on: Any = job.depends_on
    job.depends_on = tuple(json.loads(depends_on)) if depends_on else ()
    return job


def letter_from_row(row: Sequence[Any]) -> DeadLetter:
    """A :class:`DeadLetter` from a row of :func:`letter_columns` (either width)."""
    letter = DeadLetter(*row[:_LETTER_WIDTH])
    if len(row) > _LETTER_WIDTH:
        unique_key, lock, depends_on, policy, timeout = row[_LETTER_WIDTH:]
        letter.unique_key, letter.lock, letter.on_dependency_failure, letter.timeout = unique_key, lock, policy, timeout
        letter.depends_on = tuple(json.loads(depends_on)) if depends_on else ()
    return letter


def cron_from_row(row: Sequence[Any]) -> CronEntry:
    """A :class:`CronEntry` from a row of :data:`CRON_COLUMNS`."""
    return CronEntry(*row)


def job_params(job: JobRecord) -> tuple[Any, ...]:
    """The values of :data:`JOB_COLUMNS` for ``job`` (``state`` as its str value)."""
    return (
        job.id, job.name, job.payload, job.queue, job.state.value, job.priority, job.attempts, job.max_retries,
        job.timeout, job.run_at, job.created_at, job.updated_at, job.started_at, job.finished_at,
        job.heartbeat_at, job.worker_id, job.unique_key, job.result, job.error, job.trace_context,
        json.dumps(list(job.depends_on)) if job.depends_on else None, job.on_dependency_failure, job.waiting_on,
        job.lock,
    )  # fmt: skip


def cron_params(entry: CronEntry, now: float) -> tuple[Any, ...]:
    """The values of :data:`CRON_COLUMNS` for :attr:`Statements.upsert_cron` (created and updated ``now``)."""
    return (entry.name, entry.expression, entry.job_name, entry.payload, entry.queue, entry.priority,
            entry.last_tick, now, now, entry.overlap)  # fmt: skip


def worker_params(info: WorkerInfo) -> tuple[Any, ...]:
    """The values of :data:`WORKER_COLUMNS` for ``info`` (``queues`` as JSON text)."""
    return (info.id, info.host, info.pid, json.dumps(list(info.queues)), info.concurrency, info.started_at,
            info.heartbeat_at, info.running)  # fmt: skip


def worker_from_row(row: Sequence[Any]) -> WorkerInfo:
    """A :class:`WorkerInfo` from a row of :data:`WORKER_COLUMNS`."""
    worker_id, host, pid, queues, concurrency, started_at, heartbeat_at, running = row
    return WorkerInfo(worker_id, host, int(pid), tuple(json.loads(queues)), int(concurrency), started_at,
                      heartbeat_at, int(running))  # fmt: skip


def counts_from_rows(rows: Iterable[Sequence[Any]]) -> dict[JobState, int]:
    """``Store.counts`` (every state present) from rows ``(state, count)`` of ``count_all`` or ``count_queue``."""
    result = dict.fromkeys(JobState, 0)
    for state, count in rows:
        result[JobState(state)] = int(count)
    return result


def _settle(job: JobRecord, states: dict[str, str]) -> tuple[JobRecord, list[str]]:
    """:meth:`Statements.settle_new` of ``job`` given the ``states`` of its dependencies that exist."""
    unfinished: list[str] = []
    failed: tuple[str, str] | None = None
    for dependency in dict.fromkeys(job.depends_on):
        state = states.get(dependency)
        if state is None:
            raise JobNotFoundError(f"job {job.id!r} depends on {dependency!r}: no job with that id")
        if state not in _FINAL_VALUES:
            unfinished.append(dependency)
        elif state != "completed" and failed is None:
            failed = (dependency, state)
    placed = _copy_record(job)
    if failed is not None and job.on_dependency_failure == "cancel":
        placed.state, placed.finished_at = JobState.CANCELLED, job.created_at
        placed.error = f"dependency {failed[0]} {failed[1]}"
        return placed, []
    placed.state, placed.waiting_on = (JobState.WAITING, len(unfinished)) if unfinished else (JobState.PENDING, 0)
    return placed, unfinished


def _copy_record(job: JobRecord) -> JobRecord:
    """A shallow copy of ``job`` (its fields are immutable values): 1.8 µs, where ``dataclasses.replace``
    takes 7 (it calls ``__init__`` with every field by keyword). JobRecord is a plain dataclass
    with a ``__dict__`` and no ``__post_init__``, so copying the dict is the whole record."""
    copied: JobRecord = object.__new__(JobRecord)
    copied.__dict__.update(job.__dict__)
    return copied


@functools.lru_cache(maxsize=_DEP_CHUNK)
def _in_list(count: int) -> str:
    """sqlite3's state lookup of ``count`` ids (at most :data:`_DEP_CHUNK`), built once per count."""
    return f"SELECT id, state FROM dispatch_jobs WHERE id IN ({', '.join('?' * count)})"


@functools.lru_cache(maxsize=_DEP_CHUNK)
def _pairs_insert(count: int) -> str:
    """sqlite3's insert of ``count`` waits (at most ``_DEP_CHUNK // 2``), built once per count."""
    return f"INSERT INTO dispatch_job_deps (job_id, depends_on) VALUES {', '.join(['(?, ?)'] * count)}"


class Statements:
    """The shared statements, built once for one placeholder style ``mark`` (``"?"`` or ``"%s"``).

    Its methods run the few steps that are the same statements in the same order in both
    stores, inside the transaction the calling store holds.

    ``counted_waits`` (SQLiteStore): a finished dependency never writes its waiting dependent's
    row, which holds the JSON list of all its dependencies (SQLite rewrites a row whole on every
    UPDATE, so a count kept there made each completion O(N) and a fan-in of N O(N²)). The
    dependent is released when none of its ``dispatch_job_deps`` rows is left, and reads count
    them (:data:`JOB_READ_COLUMNS`). Safe because SQLite serialises writers: the release's
    NOT EXISTS sees every other writer's deletes. PostgreSQL (READ COMMITTED: two completions'
    transactions may each still see the other's row) keeps the decrement, whose row lock orders
    them; it stores a TOASTed list as a pointer the UPDATE copies.
    """

    # Statements without parameters: the same for every placeholder style.
    schema_version = "SELECT coalesce(max(version), 0) FROM dispatch_schema_version"
    count_all = "SELECT state, count(*) FROM dispatch_jobs GROUP BY state"
    count_letters = "SELECT count(*) FROM dispatch_dead_letters"
    list_crons = f"SELECT {CRON_COLUMNS} FROM dispatch_crons ORDER BY name"
    list_holds = f"SELECT {HOLD_COLUMNS} FROM dispatch_lock_holds ORDER BY heartbeat_at, job_id"
    purge_all_letters = "DELETE FROM dispatch_dead_letters"

    __slots__ = (
        "_list_jobs",
        "_list_letters",
        "acquire_lease",
        "active_holder",
        "arrays",
        "cancel_dependent",
        "complete",
        "consume_deps",
        "count_letters_queue",
        "count_queue",
        "counted_waits",
        "cron_exists",
        "cron_overlap",
        "decrement_dependent",
        "delete_cron",
        "delete_job_letters",
        "delete_letter",
        "dependency_states",
        "fire_cron",
        "get_job",
        "get_letter",
        "heartbeat_worker",
        "hold_active",
        "hold_claim",
        "hold_running",
        "insert_deps",
        "insert_job",
        "list_holds_of",
        "list_workers",
        "lock_active",
        "pause_queue",
        "purge_letters_before",
        "queue_bucket",
        "queue_running",
        "reap_holds",
        "reap_workers",
        "record_version",
        "register_worker",
        "release_dependent",
        "release_hold",
        "release_lease",
        "remove_worker",
        "requeue",
        "retry_later",
        "set_queue_limits",
        "spend_tokens",
        "sweep_cancel",
        "sweep_release",
        "upsert_cron",
    )

    def count_dead_letters(self, queue: str | None) -> tuple[str, tuple[object, ...]]:
        """The statement and parameters counting dead letters, in ``queue`` or in all."""
        return (self.count_letters, ()) if queue is None else (self.count_letters_queue, (queue,))

    def __init__(self, mark: Mark, *, counted_waits: bool = False) -> None:
        m = mark
        self.counted_waits = counted_waits
        read = JOB_READ_COLUMNS if counted_waits else JOB_COLUMNS
        # Insert one job; parameters :func:`job_params`.
        self.insert_job = f"INSERT INTO dispatch_jobs ({JOB_COLUMNS}) VALUES ({', '.join([m] * _JOB_WIDTH)})"
        # The id of the active job holding a unique key.
        self.active_holder = f"SELECT id FROM dispatch_jobs WHERE unique_key = {m} AND state IN {ACTIVE}"
        # Complete one claim: (result, error, now, now, job_id, worker_id, attempts).
        self.complete = (
            f"UPDATE dispatch_jobs SET state = 'completed', result = {m}, error = {m}, finished_at = {m}, "
            f"updated_at = {m} WHERE id = {m} AND state = 'running' AND worker_id = {m} AND attempts = {m}"
        )
        # Send one claim back to retrying: (run_at, error, now, job_id, worker_id, attempts).
        self.retry_later = (
            f"UPDATE dispatch_jobs SET state = 'retrying', worker_id = NULL, run_at = {m}, error = {m}, "
            f"updated_at = {m} WHERE id = {m} AND state = 'running' AND worker_id = {m} AND attempts = {m}"
        )
        self.get_job = f"SELECT {read} FROM dispatch_jobs WHERE id = {m}"
        self.count_queue = f"SELECT state, count(*) FROM dispatch_jobs WHERE queue = {m} GROUP BY state"
        # Make a finished job pending again: (now, now, job_id).
        self.requeue = (
            f"UPDATE dispatch_jobs SET state = 'pending', attempts = 0, run_at = {m}, finished_at = NULL, "
            f"result = NULL, worker_id = NULL, updated_at = {m} WHERE id = {m}"
        )
        self.delete_job_letters = f"DELETE FROM dispatch_dead_letters WHERE job_id = {m}"
        # By whether the schema has the letters' job fields (see letter_columns).
        self.get_letter = tuple(
            f"SELECT {letter_columns(fields)} FROM dispatch_dead_letters WHERE id = {m}" for fields in (False, True)
        )
        self.count_letters_queue = f"SELECT count(*) FROM dispatch_dead_letters WHERE queue = {m}"
        self.delete_letter = f"DELETE FROM dispatch_dead_letters WHERE id = {m}"
        self.purge_letters_before = f"DELETE FROM dispatch_dead_letters WHERE failed_at < {m}"
        self.pause_queue = (
            f"INSERT INTO dispatch_queues (queue, paused, updated_at) VALUES ({m}, {m}, {m}) "
            "ON CONFLICT (queue) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at"
        )
        # Take or renew a lease: (name, holder, now + ttl, now). PostgresStore appends RETURNING.
        self.acquire_lease = (
            f"INSERT INTO dispatch_leases (name, holder, expires_at) VALUES ({m}, {m}, {m}) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
            f"WHERE dispatch_leases.holder = excluded.holder OR dispatch_leases.expires_at <= {m}"
        )
        self.release_lease = f"DELETE FROM dispatch_leases WHERE name = {m} AND holder = {m}"
        # Create or update a cron entry, keeping its ``last_tick``: :func:`cron_params`.
        # PostgresStore appends RETURNING.
        self.upsert_cron = (
            f"INSERT INTO dispatch_crons ({CRON_COLUMNS}) VALUES ({', '.join([m] * 10)}) ON CONFLICT (name) DO UPDATE "
            "SET expression = excluded.expression, job_name = excluded.job_name, payload = excluded.payload, "
            "queue = excluded.queue, priority = excluded.priority, updated_at = excluded.updated_at, "
            "overlap = excluded.overlap"
        )
        self.delete_cron = f"DELETE FROM dispatch_crons WHERE name = {m}"
        # Compare-and-set ``last_tick``: (tick, now, name, tick).
        self.fire_cron = (
            f"UPDATE dispatch_crons SET last_tick = {m}, updated_at = {m} WHERE name = {m} "
            f"AND (last_tick IS NULL OR last_tick < {m})"
        )
        self.cron_exists = f"SELECT 1 FROM dispatch_crons WHERE name = {m}"
        # fire_cron's overlap check: the entry's policy (name); an unfinished job holding a lock (lock).
        self.cron_overlap = f"SELECT overlap FROM dispatch_crons WHERE name = {m}"
        self.lock_active = f"SELECT 1 FROM dispatch_jobs WHERE lock_key = {m} AND state IN {ACTIVE} LIMIT 1"
        # Lock holds (LockHold): whether a lock has one (lock); hold a running claim's lock (now,
        # job_id, worker_id, attempts), RETURNING the job id; hold the lock of whoever runs a job
        # (now, job_id: an operator's cancel); delete one (job_id, attempts, worker_id); delete the
        # stale (older_than); list one lock's (lock).
        self.hold_active = f"SELECT 1 FROM dispatch_lock_holds WHERE lock_key = {m} LIMIT 1"
        hold_insert = (
            f"INSERT INTO dispatch_lock_holds ({HOLD_COLUMNS}) SELECT lock_key, id, attempts, worker_id, {m} "
            f"FROM dispatch_jobs WHERE id = {m} AND state = 'running' AND lock_key IS NOT NULL"
        )
        on_conflict = " ON CONFLICT (job_id, attempts, worker_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
        self.hold_claim = f"{hold_insert} AND worker_id = {m} AND attempts = {m}{on_conflict} RETURNING job_id"
        self.hold_running = f"{hold_insert} AND worker_id IS NOT NULL{on_conflict}"
        self.release_hold = f"DELETE FROM dispatch_lock_holds WHERE job_id = {m} AND attempts = {m} AND worker_id = {m}"
        self.reap_holds = f"DELETE FROM dispatch_lock_holds WHERE heartbeat_at < {m}"
        self.list_holds_of = (
            f"SELECT {HOLD_COLUMNS} FROM dispatch_lock_holds WHERE lock_key = {m} ORDER BY heartbeat_at, job_id"
        )
        # Cluster limits: register a queue's (queue, rate, burst, max_running, tokens, now), its
        # bucket keeping its tokens up to the new burst; read its bucket (queue; PostgresStore
        # appends FOR UPDATE); count its running jobs (queue); store its bucket (tokens, now, queue).
        self.set_queue_limits = (
            "INSERT INTO dispatch_queue_limits (queue, rate, burst, max_running, tokens, updated_at) "
            f"VALUES ({m}, {m}, {m}, {m}, {m}, {m}) ON CONFLICT (queue) DO UPDATE SET rate = excluded.rate, "
            "burst = excluded.burst, max_running = excluded.max_running, tokens = CASE WHEN "
            "dispatch_queue_limits.tokens < excluded.burst THEN dispatch_queue_limits.tokens ELSE excluded.burst END"
        )
        self.queue_bucket = f"SELECT tokens, updated_at FROM dispatch_queue_limits WHERE queue = {m}"
        self.queue_running = f"SELECT count(*) FROM dispatch_jobs WHERE queue = {m} AND state = 'running'"
        self.spend_tokens = f"UPDATE dispatch_queue_limits SET tokens = {m}, updated_at = {m} WHERE queue = {m}"
        # Dependencies, recorded in batches (a statement per chunk, not a round trip per dependency: a
        # PostgreSQL fan-in of 70k paid three each). ``arrays`` (psycopg binds a list as one array):
        # the states of any number of ids (ids) in one ``= ANY``, any number of waits (job_ids,
        # dependencies) in one unnest INSERT. sqlite3 (no arrays): IN lists and multi-row VALUES of
        # at most _DEP_CHUNK variables, built by size on first use (:func:`_in_list`, :func:`_pairs_insert`).
        self.arrays = m == "%s"
        self.dependency_states = f"SELECT id, state FROM dispatch_jobs WHERE id = ANY({m})"
        self.insert_deps = (
            f"INSERT INTO dispatch_job_deps (job_id, depends_on) SELECT * FROM unnest({m}::text[], {m}::text[])"
        )
        # Consume the rows of a finished dependency (its id), returning (dependent, dependency); count
        # one or more finished dependencies off a waiting job (n, n, now, id), pending at 0; or
        # (counted_waits) release a waiting job none of whose rows is left (now, id, id); cancel a
        # waiting job of policy "cancel" (error, now, now, id).
        self.consume_deps = f"DELETE FROM dispatch_job_deps WHERE depends_on = {m} RETURNING job_id, depends_on"
        self.decrement_dependent = (
            f"UPDATE dispatch_jobs SET waiting_on = waiting_on - {m}, state = CASE WHEN waiting_on - {m} <= 0 "
            f"THEN 'pending' ELSE state END, updated_at = {m} WHERE id = {m} AND state = 'waiting'"
        )
        self.release_dependent = (
            f"UPDATE dispatch_jobs SET state = 'pending', waiting_on = 0, updated_at = {m} WHERE id = {m} "
            f"AND state = 'waiting' AND NOT EXISTS (SELECT 1 FROM dispatch_job_deps WHERE job_id = {m})"
        )
        self.cancel_dependent = (
            f"UPDATE dispatch_jobs SET state = 'cancelled', waiting_on = 0, error = {m}, finished_at = {m}, "
            f"updated_at = {m} WHERE id = {m} AND state = 'waiting' AND on_dependency_failure = 'cancel' RETURNING id"
        )
        # The upkeep's backstop (Store.release_waiting): cancel (now, now) then release (now) the
        # waiting jobs whose remaining dependency rows name only finished jobs.
        self.sweep_cancel = (
            f"UPDATE dispatch_jobs SET state = 'cancelled', waiting_on = 0, error = 'a dependency failed or was "
            f"cancelled', finished_at = {m}, updated_at = {m} WHERE state = 'waiting' "
            "AND on_dependency_failure = 'cancel' AND EXISTS (SELECT 1 FROM dispatch_job_deps d JOIN dispatch_jobs p "
            "ON p.id = d.depends_on WHERE d.job_id = dispatch_jobs.id AND p.state IN ('failed', 'cancelled')) "
            "RETURNING id"
        )
        self.sweep_release = (
            f"UPDATE dispatch_jobs SET state = 'pending', waiting_on = 0, updated_at = {m} WHERE state = 'waiting' "
            "AND NOT EXISTS (SELECT 1 FROM dispatch_job_deps d JOIN dispatch_jobs p ON p.id = d.depends_on "
            f"WHERE d.job_id = dispatch_jobs.id AND p.state NOT IN {FINAL})"
        )
        self.record_version = (
            f"INSERT INTO dispatch_schema_version (version, description, applied_at) VALUES ({m}, {m}, {m})"
        )
        # The worker registry: insert or replace a row (worker_params); heartbeat (running, now, id);
        # remove (id); list the live (oldest heartbeat kept); reap the stale (older_than).
        self.register_worker = (
            f"INSERT INTO dispatch_workers ({WORKER_COLUMNS}) VALUES ({', '.join([m] * 8)}) ON CONFLICT (id) "
            "DO UPDATE SET host = excluded.host, pid = excluded.pid, queues = excluded.queues, "
            "concurrency = excluded.concurrency, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, running = excluded.running"
        )
        self.heartbeat_worker = f"UPDATE dispatch_workers SET running = {m}, heartbeat_at = {m} WHERE id = {m}"
        self.remove_worker = f"DELETE FROM dispatch_workers WHERE id = {m}"
        self.list_workers = (
            f"SELECT {WORKER_COLUMNS} FROM dispatch_workers WHERE heartbeat_at >= {m} ORDER BY started_at, id"
        )
        self.reap_workers = f"DELETE FROM dispatch_workers WHERE heartbeat_at < {m}"
        where_state, where_queue = f"state = {m}", f"queue = {m}"
        self._list_jobs = {
            (False, False): _LIST_JOBS.format(columns=read, where="", m=m),
            (True, False): _LIST_JOBS.format(columns=read, where=f"WHERE {where_state} ", m=m),
            (False, True): _LIST_JOBS.format(columns=read, where=f"WHERE {where_queue} ", m=m),
            (True, True): _LIST_JOBS.format(columns=read, where=f"WHERE {where_state} AND {where_queue} ", m=m),
        }
        self._list_letters = {
            (fields, by_queue): _LIST_LETTERS.format(
                columns=letter_columns(fields), where=f"WHERE {where_queue} " if by_queue else "", m=m
            )
            for fields in (False, True)
            for by_queue in (False, True)
        }

    def list_jobs(
        self, state: JobState | None, queue: str | None, limit: int, offset: int
    ) -> tuple[str, tuple[Any, ...]]:
        """``(query, params)`` for ``Store.list_jobs`` (rows of :data:`JOB_COLUMNS`, newest first)."""
        params: tuple[Any, ...] = () if state is None else (JobState(state).value,)
        if queue is not None:
            params += (queue,)
        return self._list_jobs[state is not None, queue is not None], (*params, limit, offset)

    def list_dead_letters(
        self, queue: str | None, limit: int, offset: int, *, job_fields: bool = True
    ) -> tuple[str, tuple[Any, ...]]:
        """``(query, params)`` for ``Store.list_dead_letters`` (rows of :func:`letter_columns`, newest first)."""
        if queue is None:
            return self._list_letters[job_fields, False], (limit, offset)
        return self._list_letters[job_fields, True], (queue, limit, offset)

    def apply_migrations(self, conn: _Connection, migrations: Sequence[tuple[int, str, Sequence[str]]]) -> int:
        """Run the ``migrations`` newer than the recorded version, recording each; returns the version reached.

        The caller holds the backend's transaction and migration lock and has created
        ``dispatch_schema_version``.
        """
        row = conn.execute(self.schema_version).fetchone()
        current = int(row[0]) if row else 0
        for version, description, statements in migrations:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(self.record_version, (version, description, time.time()))
            current = version
        return current

    def check_requeue(self, conn: _Connection, job_id: str, state: str, unique_key: str | None) -> None:
        """``Store.requeue``'s checks of a job's ``state`` and ``unique_key``: InvalidStateError unless it may rerun."""
        if state not in ("failed", "cancelled"):
            raise InvalidStateError(f"job {job_id!r} is {state}; only failed or cancelled jobs requeue")
        self.check_key_free(conn, f"job {job_id!r}", unique_key)

    def check_key_free(self, conn: _Connection, subject: str, unique_key: str | None) -> None:
        """InvalidStateError naming ``subject`` while an active job holds ``unique_key``: a job run again
        (requeued, or a replayed dead letter's) never joins or doubles the holder."""
        if unique_key is not None:
            holder = conn.execute(self.active_holder, (unique_key,)).fetchone()
            if holder is not None:
                raise key_held(subject, unique_key, str(holder[0]))

    def rerun_waits(
        self, conn: _Connection, job_id: str, depends_on: Sequence[str], policy: str, *, subject: str | None = None
    ) -> list[str]:
        """The dependencies a job run again waits for (:func:`requeue_waits` on their stored states); the
        requeue's and the replay's one reading of them, inside the caller's write transaction."""
        found = self.states_of(conn, dict.fromkeys(depends_on))
        states: dict[str, str | None] = {dependency: found.get(dependency) for dependency in depends_on}
        return requeue_waits(job_id, depends_on, policy, states, subject=subject)

    def place_replay(self, conn: _Connection, dead_letter_id: str, job: JobRecord) -> tuple[JobRecord, list[str]]:
        """``Store.replay_dead_letter``'s placement of ``job``, as a requeue places a job run again: the record
        to insert (waiting or pending) and the dependencies it waits for; InvalidStateError for a held
        unique key or a refusing dependency. Inside the caller's write transaction (the letter's delete)."""
        subject = f"the job of dead letter {dead_letter_id!r}"
        self.check_key_free(conn, subject, job.unique_key)
        waits = self.rerun_waits(conn, job.id, job.depends_on, job.on_dependency_failure, subject=subject)
        state = JobState.WAITING if waits else JobState.PENDING
        return dataclasses.replace(job, state=state, waiting_on=len(waits)), waits

    def states_of(self, conn: _Connection, ids: Iterable[str]) -> dict[str, str]:
        """The stored state of each of the distinct ``ids`` that names a job (the others are left out).

        One statement for all (``arrays``) or per :attr:`_dep_chunk` ids, inside the caller's
        transaction: a round trip per chunk, not per id.
        """
        wanted = list(ids)
        if self.arrays:
            return dict(conn.execute(self.dependency_states, (wanted,)).fetchall()) if wanted else {}
        states: dict[str, str] = {}
        for start in range(0, len(wanted), _DEP_CHUNK):
            chunk = wanted[start : start + _DEP_CHUNK]
            states.update(conn.execute(_in_list(len(chunk)), chunk).fetchall())
        return states

    def settle_new(self, conn: _Connection, job: JobRecord) -> tuple[JobRecord, list[str]]:
        """The state ``job`` (with ``depends_on``) is inserted in, and the dependencies it waits for.

        Waiting on its unfinished dependencies; cancelled when one ended failed or cancelled
        under policy ``"cancel"``; pending when none is left. JobNotFoundError for an
        unknown id (the first in ``depends_on`` order). Inside the caller's write transaction.
        """
        return _settle(job, self.states_of(conn, dict.fromkeys(job.depends_on)))

    def settle_run(
        self, conn: _Connection, jobs: Sequence[JobRecord]
    ) -> tuple[list[tuple[JobRecord, list[str]]], JobNotFoundError | None]:
        """:meth:`settle_new` of each of ``jobs`` in order (one without dependencies as it is), with one
        lookup of their distinct dependencies for all.

        A job may depend on one before it in ``jobs`` (not stored yet): that one's settled state
        counts, as the stored row would once inserted before it. Returns the settled jobs and their
        waits, up to the first job whose dependency is unknown, and that job's JobNotFoundError (or
        None): the caller inserts the ones before it, then raises it, as one by one would have.
        """
        earlier: set[str] = set()
        stored: dict[str, None] = {}
        for job in jobs:
            for dependency in job.depends_on:
                if dependency not in earlier:
                    stored[dependency] = None
            earlier.add(job.id)
        states = self.states_of(conn, stored) if stored else {}
        settled: list[tuple[JobRecord, list[str]]] = []
        own: dict[str, str] = {}  # the settled state of each of ``jobs`` settled so far
        for job in jobs:
            if job.depends_on:
                seen = {dependency: own.get(dependency) or states.get(dependency) for dependency in job.depends_on}
                try:
                    placed = _settle(job, {key: value for key, value in seen.items() if value is not None})
                except JobNotFoundError as error:
                    return settled, error
            else:
                placed = (job, [])
            own[job.id] = placed[0].state.value
            settled.append(placed)
        return settled, None

    def record_waits(self, conn: _Connection, job_id: str, dependencies: Sequence[str]) -> None:
        """Record that job ``job_id`` (just inserted waiting) waits for each of ``dependencies``."""
        self.record_all_waits(conn, [(job_id, dependencies)])

    def record_all_waits(self, conn: _Connection, waits: Sequence[tuple[str, Sequence[str]]]) -> None:
        """:meth:`record_waits` of each ``(job_id, dependencies)``: one INSERT for all (``arrays``) or per
        250 rows."""
        job_ids = [job_id for job_id, dependencies in waits for _ in dependencies]
        if not job_ids:
            return
        dependencies = [dependency for _job_id, named in waits for dependency in named]
        if self.arrays:
            conn.execute(self.insert_deps, (job_ids, dependencies))
            return
        rows = _DEP_CHUNK // 2
        for start in range(0, len(job_ids), rows):
            pairs = zip(job_ids[start : start + rows], dependencies[start : start + rows], strict=True)
            params = [value for pair in pairs for value in pair]
            conn.execute(_pairs_insert(len(params) // 2), params)

    def release_dependents(self, conn: _Connection, consumed: Iterable[Sequence[Any]], state: str, now: float) -> None:
        """Count finished dependencies off their waiting dependents, inside the caller's write transaction.

        ``consumed``: the deleted ``dispatch_job_deps`` rows ``(dependent, dependency)`` of
        jobs that ended in ``state``. A failed or cancelled dependency cancels a dependent of
        policy ``"cancel"``, whose own dependents are then released in turn (a worklist, so a
        long chain does not recurse). Otherwise the dependent becomes pending once its last row
        is gone: its count drops by the rows consumed, or (``counted_waits``) it is released when
        no row is left, its row written only then (one statement, an indexed probe, per dependent
        whatever its number of dependencies).
        """
        work: list[tuple[Iterable[Sequence[Any]], str]] = [(consumed, state)]
        while work:
            rows, ended = work.pop()
            by_dependent: dict[str, list[str]] = {}
            for dependent, dependency in rows:
                by_dependent.setdefault(dependent, []).append(dependency)
            for dependent, dependencies in by_dependent.items():
                if ended != "completed":
                    error = f"dependency {dependencies[0]} {ended}"
                    if conn.execute(self.cancel_dependent, (error, now, now, dependent)).fetchone() is not None:
                        work.append((conn.execute(self.consume_deps, (dependent,)).fetchall(), "cancelled"))
                        continue
                if self.counted_waits:
                    conn.execute(self.release_dependent, (now, dependent, dependent))
                else:
                    count = len(dependencies)
                    conn.execute(self.decrement_dependent, (count, count, now, dependent))

    def release_one(self, conn: _Connection, job_id: str, state: str, now: float) -> None:
        """:meth:`release_dependents` of the one job ``job_id`` that ended in ``state``."""
        self.release_dependents(conn, conn.execute(self.consume_deps, (job_id,)).fetchall(), state, now)

    def sweep_waiting(self, conn: _Connection, now: float) -> int:
        """``Store.release_waiting`` inside the caller's write transaction: how many jobs it settled."""
        cancelled = [row[0] for row in conn.execute(self.sweep_cancel, (now, now)).fetchall()]
        for job_id in cancelled:
            self.release_one(conn, job_id, "cancelled", now)
        return len(cancelled) + int(conn.execute(self.sweep_release, (now,)).rowcount)

    def register_limits(self, conn: _Connection, limits: Sequence[QueueLimits], now: float) -> None:
        """``Store.set_queue_limits``'s rows, inside the caller's transaction (a new bucket starts full)."""
        for queue_limits in limits:
            conn.execute(
                self.set_queue_limits,
                (
                    queue_limits.queue,
                    queue_limits.rate_limit,
                    queue_limits.rate_burst,
                    queue_limits.max_concurrency,
                    float(queue_limits.rate_burst),
                    now,
                ),
            )

    def claim_limited(
        self,
        conn: _Connection,
        limits: QueueLimits,
        wanted: int,
        now: float,
        claim: Callable[[int], list[JobRecord]],
        *,
        bucket_sql: str | None = None,
    ) -> list[JobRecord]:
        """Claim up to ``wanted`` jobs of ``limits.queue`` with ``claim(n)``, within its cluster limits.

        Inside the caller's transaction, which must keep other claimers of the queue out from
        the bucket's read to the commit: SQLite's write transaction, or PostgreSQL's row lock
        (``bucket_sql`` reading it FOR UPDATE; the running count, a later statement, then sees
        every claim committed before the lock was granted). The bucket is refilled to ``now``
        and spent by the jobs claimed.
        """
        queue = limits.queue
        row = conn.execute(bucket_sql or self.queue_bucket, (queue,)).fetchone()
        tokens, updated = (float(limits.rate_burst), now) if row is None else (float(row[0]), float(row[1]))
        running = 0
        if limits.max_concurrency is not None:
            running = int(conn.execute(self.queue_running, (queue,)).fetchone()[0])
        room, tokens = limited_room(limits, tokens, updated, running, wanted, now=now)
        jobs = claim(room) if room > 0 else []
        if limits.rate_limit is not None:
            conn.execute(self.spend_tokens, (tokens - len(jobs), max(updated, now), queue))
        return jobs

    def cron_skips(self, conn: _Connection, name: str, job: JobRecord, *, holds: bool = True) -> bool:
        """Whether ``Store.fire_cron`` stores no ``job`` for entry ``name``: its overlap is ``"skip"`` and
        an unfinished job holds ``job.lock`` (the entry's previous one), or (``holds``) a lock hold
        does (its handler still runs past a timeout or a cancel). Inside the firing transaction."""
        if job.lock is None:
            return False
        row = conn.execute(self.cron_overlap, (name,)).fetchone()
        if row is None or row[0] != "skip":
            return False
        if conn.execute(self.lock_active, (job.lock,)).fetchone() is not None:
            return True
        return holds and conn.execute(self.hold_active, (job.lock,)).fetchone() is not None

    def hold_claims(self, conn: _Connection, claims: Sequence[tuple[str, int]], worker_id: str, now: float) -> set[str]:
        """``Store.hold_locks`` inside the caller's write transaction: the job ids now held."""
        held: set[str] = set()
        for job_id, attempts in claims:
            row = conn.execute(self.hold_claim, (now, job_id, worker_id, attempts)).fetchone()
            if row is not None:
                held.add(str(row[0]))
        return held

    def release_claims(self, conn: _Connection, claims: Sequence[tuple[str, int]], worker_id: str) -> int:
        """``Store.release_holds`` inside the caller's write transaction: how many holds were deleted."""
        return sum(
            int(conn.execute(self.release_hold, (job_id, attempts, worker_id)).rowcount) for job_id, attempts in claims
        )

    def holds_listed(self, conn: _Connection, lock: str | None) -> list[LockHold]:
        """``Store.list_holds``'s read."""
        rows = (
            conn.execute(self.list_holds).fetchall()
            if lock is None
            else conn.execute(self.list_holds_of, (lock,)).fetchall()
        )
        return [hold_from_row(row) for row in rows]

    def advance_cron(self, conn: _Connection, name: str, tick: float, now: float) -> bool:
        """``Store.fire_cron``'s compare-and-set: ``last_tick = tick`` if it is earlier (or None).

        Returns False when another process fired this tick already; JobNotFoundError for an unknown entry.
        """
        if conn.execute(self.fire_cron, (tick, now, name, tick)).rowcount == 1:
            return True
        if conn.execute(self.cron_exists, (name,)).fetchone() is None:
            raise JobNotFoundError(f"no cron entry named {name!r}")
        return False
