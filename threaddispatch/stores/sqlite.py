"""SQLiteStore: the embedded default job store, one file shared by threads and processes.

- WAL journal, ``synchronous=NORMAL`` (durable across process crashes; a power cut
  may lose the last commits, never corrupt the file), ``busy_timeout``.
- One connection per thread per process: connections live in a ``threading.local``
  tagged with the pid, so a forked child opens its own and never touches the parent's
  (the huey pid guard).
- Safe to ``fork()`` while threads use the store (a JobEngine running, gunicorn
  ``--preload``): just before the fork the lifecycle hook takes every thread's connection
  lock, which each thread holds around all its sqlite3 calls, so no thread is inside
  SQLite (whose own mutexes a child would inherit held); it then closes every connection
  in the parent, so the child inherits none, nor SQLite's per-file lock state. Both
  processes reopen connections on next use; the child never touches a parent's
  connection, not even to close it.
- Short transactions; every write that reads first runs under ``BEGIN IMMEDIATE`` so
  two processes never both decide from the same snapshot. A claim is ONE
  ``UPDATE ... RETURNING`` statement (SQLite >= 3.35).
- Versioned migrations (:attr:`SQLiteStore.MIGRATIONS`, recorded in
  ``dispatch_schema_version``); a SQL backend mirrors the list with its own DDL.

SQLite serialises writers: throughput is bounded by one writer at a time, which is
ample for one machine. Use PostgreSQL for several machines.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from threaddispatch import _lifecycle
from threaddispatch.backoff import check_seconds
from threaddispatch.errors import (
    ConfigurationError,
    JobNotFoundError,
    StoreError,
    StoreUnavailableError,
)
from threaddispatch.stores import _sql
from threaddispatch.stores._sql import Statements, cron_from_row, job_from_row, job_params, letter_from_row
from threaddispatch.stores.base import (
    WORKER_LOST_ERROR,
    Completion,
    CronEntry,
    DeadLetter,
    JobRecord,
    JobState,
    Store,
)

__all__ = ["SQLiteStore"]

F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("threaddispatch.stores.sqlite")
# How long, past busy_timeout, fork preparation and close() wait for a thread to leave its SQLite call.
_QUIESCE_GRACE = 10.0
# Connections a forked child found still open (their thread was inside SQLite past the wait):
# referenced for the life of the child so that deallocating them never closes them there.
_ABANDONED: list[sqlite3.Connection] = []

_MIN_VERSION = (3, 35, 0)  # UPDATE ... RETURNING
_CHUNK = 500  # ids per statement, far below SQLite's variable limit
_SQL = Statements("?")
_INSERT = _SQL.insert_job
_COMPLETE = _SQL.complete
_GET_CRON = f"SELECT {_sql.CRON_COLUMNS} FROM dispatch_crons WHERE name = ?"

_TYPES: _sql.Types = {"SEQ": "INTEGER PRIMARY KEY", "INT": "INTEGER", "REAL": "REAL", "BOOL": "INTEGER"}
# The claim index's keys: seq is the implicit last key of a SQLite index.
_SCHEMA_V1 = _sql.schema_v1(_TYPES, ready_keys="queue, priority DESC, run_at")


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _claim_sql(queue_count: int) -> str:
    """The claim statement for ``queue_count`` queues: (worker_id, now, now, now, *queues, now, limit)."""
    return (
        "UPDATE dispatch_jobs SET state = 'running', worker_id = ?, attempts = attempts + 1, "
        "started_at = ?, heartbeat_at = ?, updated_at = ? "
        "WHERE seq IN (SELECT seq FROM dispatch_jobs WHERE state IN ('pending', 'retrying') "
        f"AND queue IN ({_marks(queue_count)}) AND run_at <= ? "
        "ORDER BY priority DESC, run_at, seq LIMIT ?) "
        f"RETURNING {_sql.JOB_COLUMNS}"
    )


_CLAIM_SQL: dict[int, str] = {}  # _claim_sql by number of queues, built on first use


_COMPLETE_ROWS = 100  # outcomes per completion statement (5 variables each)
_COMPLETE_SQL: dict[int, str] = {}  # _complete_sql by number of outcomes, built on first use


def _complete_sql(count: int) -> str:
    """Complete ``count`` claims in one statement: (now, now, *(job_id, worker_id, attempts, result, error)...).

    A claim is completed only while it is still that worker's running attempt, as :data:`_COMPLETE`.
    """
    rows = ", ".join(["(?, ?, ?, ?, ?)"] * count)
    return (
        "UPDATE dispatch_jobs SET state = 'completed', result = v.column4, error = v.column5, finished_at = ?, "
        f"updated_at = ? FROM (VALUES {rows}) AS v WHERE dispatch_jobs.id = v.column1 "
        "AND dispatch_jobs.state = 'running' AND dispatch_jobs.worker_id = v.column2 "
        "AND dispatch_jobs.attempts = v.column3 RETURNING dispatch_jobs.id"
    )


def _complete_in(conn: sqlite3.Connection, outcomes: Sequence[Completion], now: float) -> set[str]:
    """Complete ``outcomes`` (job_id, worker_id, attempts, result, error) in the open transaction; the ids applied."""
    done: set[str] = set()
    for start in range(0, len(outcomes), _COMPLETE_ROWS):
        chunk = outcomes[start : start + _COMPLETE_ROWS]
        sql = _COMPLETE_SQL.get(len(chunk))
        if sql is None:
            sql = _COMPLETE_SQL.setdefault(len(chunk), _complete_sql(len(chunk)))
        params: list[Any] = [now, now]
        for outcome in chunk:
            params.extend(outcome)
        done.update(row[0] for row in conn.execute(sql, params).fetchall())
    return done


def _claim_order(job: JobRecord) -> tuple[int, float]:
    return (-job.priority, job.run_at)


def _translate(fn: F) -> F:
    """A store method: run it holding this thread's connection lock (see :class:`_Slot`) and
    turn sqlite3 errors into StoreUnavailableError (locked/busy) or StoreError."""

    @functools.wraps(fn)
    def wrapper(self: SQLiteStore, *args: Any, **kwargs: Any) -> Any:
        with self._slot().lock:
            try:
                return fn(self, *args, **kwargs)
            except sqlite3.OperationalError as error:
                text = str(error).lower()
                if "locked" in text or "busy" in text or "unable to open" in text:
                    raise StoreUnavailableError(f"SQLite store unavailable: {error}") from error
                raise StoreError(f"SQLite store error: {error}") from error
            except sqlite3.Error as error:
                raise StoreError(f"SQLite store error: {error}") from error

    return wrapper  # type: ignore[return-value]


class _Slot:
    """One thread's connection to the store in one process.

    ``lock`` is held around every sqlite3 call on ``conn`` (opening it included): by the
    thread for the length of a store method, by the fork hook from just before fork()
    until just after, and by close(). It is re-entrant so a store method may call another.
    """

    __slots__ = ("conn", "lock", "pid", "thread")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.conn: sqlite3.Connection | None = None
        self.pid = os.getpid()
        self.thread = weakref.ref(threading.current_thread())

    def orphaned(self) -> bool:
        """Whether the thread that made the slot has ended (its connection can never be used again)."""
        thread = self.thread()
        return thread is None or not thread.is_alive()


class _Immediate:
    """``with _Immediate(conn):`` runs the block in a BEGIN IMMEDIATE transaction (write lock first)."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class SQLiteStore(Store):
    """A :class:`~threaddispatch.stores.Store` in one SQLite file (see the module docstring).

    ``path`` is a file path (``":memory:"`` is refused: every thread needs the same
    database). ``busy_timeout`` is how long a statement waits for another writer before
    raising StoreUnavailableError. ``synchronous`` is SQLite's ``PRAGMA synchronous``
    (``"NORMAL"`` default; ``"FULL"`` to survive power loss at the cost of an fsync per
    commit). ``migrate=False`` skips creating/upgrading the schema at construction.
    Thread-safe and multi-process-safe; every method blocks for one short transaction
    (plus up to ``busy_timeout`` waiting for the write lock).
    """

    #: Numbered schema migrations: ``(version, description, statements)``, applied in order.
    MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = ((1, "initial schema", _SCHEMA_V1),)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
        migrate: bool = True,
    ) -> None:
        if sqlite3.sqlite_version_info < _MIN_VERSION:
            raise ConfigurationError(
                f"SQLiteStore needs SQLite >= 3.35 (UPDATE ... RETURNING); this Python has {sqlite3.sqlite_version}"
            )
        if not isinstance(path, (str, os.PathLike)) or str(path) in ("", ":memory:"):
            raise ConfigurationError(f"SQLiteStore path must be a file path, got {path!r}")
        if str(synchronous).upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = os.fspath(path)
        self.busy_timeout = check_seconds("busy_timeout", busy_timeout)
        self.synchronous = str(synchronous).upper()
        self._closed = False
        self._init_connections()
        _lifecycle.register(self)
        if migrate:
            self.migrate()

    def _init_connections(self) -> None:
        # _slots_lock guards _slots (every thread's slot in this process, for close() and the
        # fork hook). Lock order: _slots_lock, then slot locks; never the other way round.
        self._slots_lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._local = threading.local()
        self._pid = os.getpid()
        # Set by _prepare_for_fork under _slots_lock, read by _resume_after_fork before releasing it.
        self._fork_held: list[_Slot] = []
        self._fork_stuck = 0

    def _slot(self) -> _Slot:
        """This thread's slot in this process, made on first use."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is not None and slot.pid == os.getpid():
            return slot
        if os.getpid() != self._pid:
            # Forked without the lifecycle hook having run: never use the parent's connections.
            self._reset_after_fork()
        slot = _Slot()
        with self._slots_lock:
            self._close_orphans()
            self._slots.append(slot)
        self._local.slot = slot
        return slot

    def _close_orphans(self) -> None:
        """Close the connections of threads that have ended; the caller holds ``_slots_lock``.

        Done under that lock, which the fork hook takes first, so no fork happens while one
        of these connections is being closed.
        """
        kept: list[_Slot] = []
        for slot in self._slots:
            if slot.orphaned() and slot.lock.acquire(blocking=False):
                try:
                    self._close_slot(slot)
                finally:
                    slot.lock.release()
            else:
                kept.append(slot)
        self._slots = kept

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use; only with the slot's lock held (a ``@_translate`` method)."""
        slot = self._slot()
        if slot.conn is not None:
            return slot.conn
        if self._closed:
            raise StoreError(f"SQLiteStore {self.path!r} is closed")
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            self._set_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except BaseException:
            conn.close()
            raise
        slot.conn = conn
        return conn

    @staticmethod
    def _close_slot(slot: _Slot) -> None:
        """Close the slot's connection; the caller holds ``slot.lock``, in the process that opened it."""
        conn, slot.conn = slot.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):  # closing is best effort
                conn.close()

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL needs a moment of exclusive access; retry within busy_timeout.
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error).lower() or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    # -- lifecycle ------------------------------------------------------------------------------

    @_translate
    def migrate(self) -> int:
        """Apply the migrations newer than the file's version; returns the version. Idempotent, multi-process safe."""
        conn = self._conn()
        with _Immediate(conn):
            conn.execute(_sql.version_table(_TYPES))
            return _SQL.apply_migrations(conn, self.MIGRATIONS)

    def schema_version(self) -> int:
        """The schema version of the file (0 before :meth:`migrate`)."""
        with self._slot().lock:
            conn = self._conn()
            try:
                return int(conn.execute(_SQL.schema_version).fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    def close(self) -> None:
        """Close every connection this process opened. Idempotent; later use raises StoreError.

        Call it after the engines using the store have stopped. Waits for a thread still
        inside a store call, up to ``busy_timeout`` plus 10 seconds; such a thread's
        connection is left open if it does not finish by then.
        """
        self._closed = True
        with self._slots_lock:
            slots = list(self._slots)
        deadline = time.monotonic() + self.busy_timeout + _QUIESCE_GRACE
        for slot in slots:
            if not slot.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                continue  # still listed, so a fork never lets the child close it
            try:
                self._close_slot(slot)
            finally:
                slot.lock.release()
            with self._slots_lock:
                self._slots.remove(slot)
        _lifecycle.unregister(self)

    def _prepare_for_fork(self) -> None:
        """Just before fork(): wait until no thread is inside SQLite on this store, then close every connection.

        Called by the lifecycle's fork hook in the forking thread. Takes ``_slots_lock``
        (no new slot meanwhile) and every slot's lock, each wait bounded by one deadline
        (``busy_timeout`` plus 10 s); they stay held across the fork, released by
        :meth:`_resume_after_fork` in the parent and replaced in the child. The connections
        are closed here, in the parent that opened them, so the child inherits none of
        them nor SQLite's lock state for the file. Raises StoreError, preparing nothing, if
        ``_slots_lock`` stays taken (another thread's fork) past the deadline.
        """
        deadline = time.monotonic() + self.busy_timeout + _QUIESCE_GRACE
        if not self._slots_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise StoreError(f"SQLiteStore {self.path!r}: could not quiesce for fork (another fork in progress?)")
        held: list[_Slot] = []
        for slot in self._slots:
            if slot.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                held.append(slot)
                self._close_slot(slot)
        self._fork_held = held
        self._fork_stuck = len(self._slots) - len(held)

    def _resume_after_fork(self) -> None:
        """In the parent after fork(): release what :meth:`_prepare_for_fork` took; connections reopen on use."""
        held, self._fork_held = self._fork_held, []
        stuck = self._fork_stuck
        for slot in reversed(held):
            slot.lock.release()
        self._slots_lock.release()
        if stuck:
            self._log_stuck(stuck)

    def _reset_after_fork(self) -> None:
        """In the child: fresh locks and slots. A parent connection still open here (its thread was inside
        SQLite past the fork wait) is kept referenced, never closed, never used."""
        stuck = [slot.conn for slot in self._slots if slot.conn is not None]
        _ABANDONED.extend(stuck)
        self._init_connections()
        if stuck:
            self._log_stuck(len(stuck))

    def _log_stuck(self, count: int) -> None:
        _log.warning(
            "SQLiteStore %r: forked while %d thread(s) were inside a SQLite call for over %.3gs; "
            "the child may inherit SQLite's locks held",
            self.path,
            count,
            self.busy_timeout + _QUIESCE_GRACE,
        )

    def describe(self) -> Mapping[str, object]:
        """``{"kind": "SQLiteStore", "path": ...}``."""
        return {"kind": "SQLiteStore", "path": self.path}

    # -- producers --------------------------------------------------------------------------------

    @staticmethod
    def _insert(conn: sqlite3.Connection, job: JobRecord) -> str:
        """Insert a job in the caller's IMMEDIATE transaction; returns its id, or the id of its key's active holder."""
        if job.unique_key is not None:
            row = conn.execute(_SQL.active_holder, (job.unique_key,)).fetchone()
            if row is not None:
                return str(row[0])
        conn.execute(_INSERT, job_params(job))
        return job.id

    @_translate
    def enqueue(self, jobs: Sequence[JobRecord]) -> list[str]:
        """See :meth:`Store.enqueue`. One IMMEDIATE transaction; plain jobs go in one executemany."""
        if not jobs:
            return []
        conn = self._conn()
        try:
            if len(jobs) == 1 and jobs[0].unique_key is None:
                # One statement is its own atomic transaction: skip BEGIN/COMMIT round trips.
                conn.execute(_INSERT, job_params(jobs[0]))
                return [jobs[0].id]
            with _Immediate(conn):
                plain = [job for job in jobs if job.unique_key is None]
                if len(plain) == 1:
                    conn.execute(_INSERT, job_params(plain[0]))
                elif plain:
                    conn.executemany(_INSERT, [job_params(job) for job in plain])
                if len(plain) == len(jobs):
                    return [job.id for job in jobs]
                return [job.id if job.unique_key is None else self._insert(conn, job) for job in jobs]
        except sqlite3.IntegrityError as error:
            raise StoreError(f"could not insert jobs: {error} (a job id already exists?)") from error

    # -- workers -------------------------------------------------------------------------------------

    @_translate
    def claim(self, queues: Sequence[str], limit: int, *, worker_id: str, now: float) -> list[JobRecord]:
        """See :meth:`Store.claim`: one ``UPDATE ... RETURNING`` under BEGIN IMMEDIATE."""
        conn = self._conn()
        with _Immediate(conn):
            return self._claim_in(conn, queues, limit, worker_id, now)

    @staticmethod
    def _claim_in(
        conn: sqlite3.Connection, queues: Sequence[str], limit: int, worker_id: str, now: float
    ) -> list[JobRecord]:
        if limit <= 0 or not queues:
            return []
        sql = _CLAIM_SQL.get(len(queues))
        if sql is None:
            sql = _CLAIM_SQL.setdefault(len(queues), _claim_sql(len(queues)))
        rows = conn.execute(sql, (worker_id, now, now, now, *queues, now, limit)).fetchall()
        jobs = [job_from_row(row) for row in rows]
        if len(jobs) > 1:
            # RETURNING gives rows in no particular order; hand them out in claim order.
            jobs.sort(key=_claim_order)
        return jobs

    @_translate
    def complete_and_claim(
        self,
        outcomes: Sequence[Completion],
        queues: Sequence[str],
        limit: int,
        *,
        worker_id: str,
        now: float,
    ) -> tuple[set[str], list[JobRecord]]:
        """See :meth:`Store.complete_and_claim`: ONE IMMEDIATE transaction for both."""
        conn = self._conn()
        with _Immediate(conn):
            done = _complete_in(conn, outcomes, now)
            jobs = self._claim_in(conn, queues, limit, worker_id, now)
        return done, jobs

    @_translate
    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat`."""
        alive: set[str] = set()
        if not job_ids:
            return alive
        conn = self._conn()
        with _Immediate(conn):
            for chunk in _chunks(list(job_ids)):
                rows = conn.execute(
                    f"UPDATE dispatch_jobs SET heartbeat_at = ? WHERE id IN ({_marks(len(chunk))}) "
                    "AND state = 'running' AND worker_id = ? RETURNING id",
                    (now, *chunk, worker_id),
                ).fetchall()
                alive.update(row[0] for row in rows)
        return alive

    def _push_dead_letter(self, conn: sqlite3.Connection, job_id: str, error: str | None, now: float) -> DeadLetter:
        letter_id = uuid.uuid4().hex
        conn.execute(
            f"INSERT INTO dispatch_dead_letters ({_sql.LETTER_COLUMNS}) "
            "SELECT ?, id, name, queue, payload, priority, max_retries, attempts, ?, ? FROM dispatch_jobs WHERE id = ?",
            (letter_id, error, now, job_id),
        )
        return letter_from_row(conn.execute(_SQL.get_letter, (letter_id,)).fetchone())

    @_translate
    def reap_stale(self, *, older_than: float, now: float) -> list[str]:
        """See :meth:`Store.reap_stale`."""
        conn = self._conn()
        with _Immediate(conn):
            rows = conn.execute(
                "SELECT id, attempts, max_retries FROM dispatch_jobs WHERE state = 'running' "
                "AND (heartbeat_at IS NULL OR heartbeat_at < ?)",
                (older_than,),
            ).fetchall()
            for job_id, attempts, max_retries in rows:
                if attempts >= max_retries + 1:
                    conn.execute(
                        "UPDATE dispatch_jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ? "
                        "WHERE id = ?",
                        (WORKER_LOST_ERROR, now, now, job_id),
                    )
                    self._push_dead_letter(conn, job_id, WORKER_LOST_ERROR, now)
                else:
                    conn.execute(
                        "UPDATE dispatch_jobs SET state = 'pending', worker_id = NULL, run_at = ?, updated_at = ? "
                        "WHERE id = ?",
                        (now, now, job_id),
                    )
        return [row[0] for row in rows]

    @_translate
    def complete(
        self, job_id: str, *, worker_id: str, attempts: int, result: str | None, now: float, error: str | None = None
    ) -> bool:
        """See :meth:`Store.complete`: one statement (its own transaction)."""
        cursor = self._conn().execute(_COMPLETE, (result, error, now, now, job_id, worker_id, attempts))
        return cursor.rowcount == 1

    @_translate
    def complete_many(self, outcomes: Sequence[Completion], *, now: float) -> set[str]:
        """See :meth:`Store.complete_many`: one IMMEDIATE transaction, one statement per 100 jobs."""
        if not outcomes:
            return set()
        conn = self._conn()
        with _Immediate(conn):
            return _complete_in(conn, outcomes, now)

    @_translate
    def retry_later(
        self, job_id: str, *, worker_id: str, attempts: int, run_at: float, error: str | None, now: float
    ) -> bool:
        """See :meth:`Store.retry_later`."""
        cursor = self._conn().execute(_SQL.retry_later, (run_at, error, now, job_id, worker_id, attempts))
        return cursor.rowcount == 1

    @_translate
    def fail(
        self, job_id: str, *, worker_id: str | None, attempts: int | None, error: str | None, now: float
    ) -> DeadLetter | None:
        """See :meth:`Store.fail`."""
        conn = self._conn()
        with _Immediate(conn):
            if worker_id is None and attempts is None:
                cursor = conn.execute(
                    "UPDATE dispatch_jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ? "
                    "WHERE id = ?",
                    (error, now, now, job_id),
                )
                if cursor.rowcount != 1:
                    raise JobNotFoundError(f"no job with id {job_id!r}")
            else:
                cursor = conn.execute(
                    "UPDATE dispatch_jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ? "
                    "WHERE id = ? AND state = 'running' AND worker_id IS ? AND attempts IS ?",
                    (error, now, now, job_id, worker_id, attempts),
                )
                if cursor.rowcount != 1:
                    return None
            return self._push_dead_letter(conn, job_id, error, now)

    @_translate
    def release(self, job_ids: Sequence[str], *, worker_id: str, now: float, refund_attempt: bool = True) -> int:
        """See :meth:`Store.release`."""
        if not job_ids:
            return 0
        released = 0
        conn = self._conn()
        with _Immediate(conn):
            for chunk in _chunks(list(job_ids)):
                cursor = conn.execute(
                    "UPDATE dispatch_jobs SET state = 'pending', worker_id = NULL, run_at = ?, updated_at = ?, "
                    f"attempts = max(0, attempts - ?) WHERE id IN ({_marks(len(chunk))}) "
                    "AND state = 'running' AND worker_id = ?",
                    (now, now, 1 if refund_attempt else 0, *chunk, worker_id),
                )
                released += cursor.rowcount
        return released

    # -- management --------------------------------------------------------------------------------

    @_translate
    def get(self, job_id: str) -> JobRecord | None:
        """See :meth:`Store.get`."""
        row = self._conn().execute(_SQL.get_job, (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    @_translate
    def list_jobs(
        self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """See :meth:`Store.list_jobs`."""
        self._check_limit(limit, offset)
        rows = self._conn().execute(*_SQL.list_jobs(state, queue, limit, offset)).fetchall()
        return [job_from_row(row) for row in rows]

    @_translate
    def counts(self, *, queue: str | None = None) -> dict[JobState, int]:
        """See :meth:`Store.counts`."""
        if queue is None:
            rows = self._conn().execute(_SQL.count_all).fetchall()
        else:
            rows = self._conn().execute(_SQL.count_queue, (queue,)).fetchall()
        return _sql.counts_from_rows(rows)

    @_translate
    def counts_by_queue(self, queues: Sequence[str]) -> dict[str, dict[JobState, int]]:
        """See :meth:`Store.counts_by_queue`: one ``GROUP BY queue, state`` read over every queue."""
        rows = self._conn().execute("SELECT queue, state, count(*) FROM dispatch_jobs GROUP BY queue, state")
        by_queue: dict[str, list[tuple[str, int]]] = {queue: [] for queue in queues}
        for queue, state, count in rows.fetchall():
            if queue in by_queue:
                by_queue[queue].append((state, count))
        return {queue: _sql.counts_from_rows(found) for queue, found in by_queue.items()}

    @_translate
    def cancel(
        self,
        job_id: str,
        *,
        now: float,
        worker_id: str | None = None,
        attempts: int | None = None,
        error: str | None = None,
        include_running: bool = True,
    ) -> bool:
        """See :meth:`Store.cancel`: one conditional update (plus an existence check when it changes nothing)."""
        params: tuple[Any, ...] = (error, now, now, job_id)
        if worker_id is not None or attempts is not None:
            condition = "state = 'running' AND (? IS NULL OR worker_id = ?) AND (? IS NULL OR attempts = ?)"
            params += (worker_id, worker_id, attempts, attempts)
        else:
            condition = f"state IN {_sql.ACTIVE if include_running else _sql.READY}"
        conn = self._conn()
        cursor = conn.execute(
            "UPDATE dispatch_jobs SET state = 'cancelled', error = coalesce(?, error), finished_at = ?, "
            f"updated_at = ? WHERE id = ? AND {condition}",
            params,
        )
        if cursor.rowcount == 1:
            return True
        if conn.execute("SELECT 1 FROM dispatch_jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return False

    @_translate
    def requeue(self, job_id: str, *, now: float) -> None:
        """See :meth:`Store.requeue`."""
        conn = self._conn()
        with _Immediate(conn):
            row = conn.execute("SELECT state, unique_key FROM dispatch_jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            _SQL.check_requeue(conn, job_id, *row)
            conn.execute(_SQL.requeue, (now, now, job_id))
            conn.execute(_SQL.delete_job_letters, (job_id,))

    @_translate
    def purge_finished(self, *, older_than: float) -> int:
        """See :meth:`Store.purge_finished`: deletes in chunks of short transactions."""
        conn = self._conn()
        total = 0
        while True:
            with _Immediate(conn):
                cursor = conn.execute(
                    "DELETE FROM dispatch_jobs WHERE seq IN (SELECT seq FROM dispatch_jobs "
                    f"WHERE state IN {_sql.FINAL} AND finished_at < ? LIMIT 1000)",
                    (older_than,),
                )
            total += cursor.rowcount
            if cursor.rowcount < 1000:
                return total

    # -- dead letters ------------------------------------------------------------------------------

    @_translate
    def list_dead_letters(self, *, queue: str | None = None, limit: int = 50, offset: int = 0) -> list[DeadLetter]:
        """See :meth:`Store.list_dead_letters`."""
        self._check_limit(limit, offset)
        rows = self._conn().execute(*_SQL.list_dead_letters(queue, limit, offset)).fetchall()
        return [letter_from_row(row) for row in rows]

    @_translate
    def count_dead_letters(self, *, queue: str | None = None) -> int:
        """See :meth:`Store.count_dead_letters`: one ``COUNT``."""
        return int(self._conn().execute(*_SQL.count_dead_letters(queue)).fetchone()[0])

    @_translate
    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """See :meth:`Store.get_dead_letter`."""
        row = self._conn().execute(_SQL.get_letter, (dead_letter_id,)).fetchone()
        return None if row is None else letter_from_row(row)

    @_translate
    def replay_dead_letter(self, dead_letter_id: str, *, job: JobRecord) -> str:
        """See :meth:`Store.replay_dead_letter`."""
        conn = self._conn()
        with _Immediate(conn):
            cursor = conn.execute(_SQL.delete_letter, (dead_letter_id,))
            if cursor.rowcount != 1:
                raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
            return self._insert(conn, job)

    @_translate
    def purge_dead_letters(self, *, older_than: float | None = None) -> int:
        """See :meth:`Store.purge_dead_letters`."""
        if older_than is None:
            cursor = self._conn().execute(_SQL.purge_all_letters)
        else:
            cursor = self._conn().execute(_SQL.purge_letters_before, (older_than,))
        return cursor.rowcount

    # -- queues ------------------------------------------------------------------------------------

    @_translate
    def set_queue_paused(self, queue: str, paused: bool, *, now: float) -> None:
        """See :meth:`Store.set_queue_paused`."""
        self._conn().execute(_SQL.pause_queue, (queue, 1 if paused else 0, now))

    @_translate
    def paused_queues(self) -> set[str]:
        """See :meth:`Store.paused_queues`."""
        return {row[0] for row in self._conn().execute("SELECT queue FROM dispatch_queues WHERE paused = 1")}

    # -- cron and leases ---------------------------------------------------------------------------

    @_translate
    def acquire_lease(self, name: str, *, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`Store.acquire_lease`."""
        conn = self._conn()
        with _Immediate(conn):
            conn.execute(_SQL.acquire_lease, (name, holder, now + ttl, now))
            row = conn.execute("SELECT holder FROM dispatch_leases WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == holder

    @_translate
    def release_lease(self, name: str, *, holder: str) -> None:
        """See :meth:`Store.release_lease`."""
        self._conn().execute(_SQL.release_lease, (name, holder))

    @_translate
    def upsert_cron(self, entry: CronEntry, *, now: float) -> CronEntry:
        """See :meth:`Store.upsert_cron`."""
        conn = self._conn()
        with _Immediate(conn):
            conn.execute(_SQL.upsert_cron, _sql.cron_params(entry, now))
            row = conn.execute(_GET_CRON, (entry.name,)).fetchone()
        return cron_from_row(row)

    @_translate
    def list_crons(self) -> list[CronEntry]:
        """See :meth:`Store.list_crons`."""
        rows = self._conn().execute(_SQL.list_crons).fetchall()
        return [cron_from_row(row) for row in rows]

    @_translate
    def delete_cron(self, name: str) -> bool:
        """See :meth:`Store.delete_cron`."""
        return self._conn().execute(_SQL.delete_cron, (name,)).rowcount == 1

    @_translate
    def fire_cron(self, name: str, *, tick: float, job: JobRecord) -> bool:
        """See :meth:`Store.fire_cron`: compare-and-set of ``last_tick`` and the insert in one transaction."""
        conn = self._conn()
        with _Immediate(conn):
            if not _SQL.advance_cron(conn, name, tick, job.created_at):
                return False
            self._insert(conn, job)
            return True
