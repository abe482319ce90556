"""SQLiteStore: the embedded default job store, one file shared by threads and processes.

This module is the :class:`~threaddispatch.stores.Store` methods and the SQL only SQLite
needs; the per-thread connections, pragmas and fork safety are in
:mod:`~threaddispatch.stores._sqlite_conn`, the cross-process wake-ups and checkpoints in
:mod:`~threaddispatch.stores._sqlite_watch`, the group commit of concurrent enqueues in
:mod:`~threaddispatch.stores._sqlite_commit` and the shared WAL fdatasync of ``durability="full"`` in
:mod:`~threaddispatch.stores._sqlite_sync`.

- WAL journal, ``busy_timeout``, one connection per thread per process (a forked child
  opens its own); ``fork()`` is safe while threads use the store.
- Short transactions; every write that reads first runs under ``BEGIN IMMEDIATE`` so
  two processes never both decide from the same snapshot. Every write holds the file's
  writer lock (:mod:`~threaddispatch.stores._sqlite_lock`: a threading lock per file per
  process, then a record lock on ``<db>-writer.lock`` shared with other processes):
  writers of every store and process queue on it, never in SQLite's busy handler (only a
  writer that bypasses the lock, like the sqlite3 shell, meets it). A claim is ONE
  ``UPDATE ... RETURNING`` statement (SQLite >= 3.35). A commit checkpoints only past
  10,000 WAL pages (a backstop); while an engine is subscribed, a checkpoint thread does.
- Wake-ups (:meth:`SQLiteStore.subscribe_wakeups`): a watcher thread per store, running
  while an engine is subscribed, announces jobs other processes enqueue within 10 to 30 ms
  and delayed jobs when they fall due; and, from the ready log that row triggers fill
  (migration 8), the jobs any process makes ready by an update (a released dependent, a job
  handed back, reaped, requeued or retried, a serial lock's next job), and the queues any
  process resumes (migration 9: announced as ``(queue, when resumed)``). A claim, and a
  completion of a job without a lock, write no log row. Polling remains the fallback.
- Versioned migrations (:attr:`SQLiteStore.MIGRATIONS`, recorded in
  ``dispatch_schema_version``); each SQL backend numbers its own migrations.

SQLite serialises writers: throughput is bounded by one writer at a time, which is
ample for one machine. Use PostgreSQL for several machines.

This module holds the Store methods only (connections, the watcher, group commit and the
SQL text have their own modules); it runs past 600 lines because the Store interface has
that many methods, each one statement and its translation of errors.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from threaddispatch import _lifecycle
from threaddispatch._validate import show
from threaddispatch.backoff import check_seconds
from threaddispatch.errors import ConfigurationError, JobNotFoundError, StoreError
from threaddispatch.stores import _sql
from threaddispatch.stores._sql import cron_from_row, job_from_row, job_params, letter_from_row
from threaddispatch.stores._sqlite_commit import LINGER, GroupCommitter
from threaddispatch.stores._sqlite_conn import Connections, Write, synchronous_for, translate
from threaddispatch.stores._sqlite_sql import (
    INSERT_ROWS,
    SCHEMA_V1,
    SCHEMA_V2,
    SCHEMA_V3,
    SCHEMA_V4,
    SCHEMA_V5,
    SCHEMA_V6,
    SCHEMA_V7,
    SCHEMA_V8,
    SCHEMA_V9,
    SCHEMA_V10,
    SCHEMA_V11,
    SCHEMA_V12,
    STATEMENTS,
    TYPES,
    chunks,
    claim_in,
    claim_rows_in,
    complete_alone_in,
    complete_in,
    fresh_params,
    insert_fresh_in,
    jobs_from_claim,
    marks,
    release_in,
)
from threaddispatch.stores._sqlite_sync import AVAILABLE as SYNC_AVAILABLE
from threaddispatch.stores._sqlite_watch import WakeupCallback, Watcher
from threaddispatch.stores.base import (
    WORKER_LOST_ERROR,
    Completion,
    CronEntry,
    DeadLetter,
    JobRecord,
    JobState,
    LockHold,
    QueueLimits,
    Store,
    WorkerInfo,
)

__all__ = ["SQLiteStore"]

_MIN_VERSION = (3, 35, 0)  # UPDATE ... RETURNING
_SQL = STATEMENTS
_INSERT = _SQL.insert_job
#: A failed job's dead letter, copied from its row: (letter id, error, now, job id); by whether the
#: file has the letters' job fields (migration 11).
_PUSH_LETTER = tuple(
    f"INSERT INTO dispatch_dead_letters ({_sql.letter_columns(fields)}) SELECT ?, id, name, queue, payload, "
    f"priority, max_retries, attempts, ?, ?, {_sql.letter_copy(fields)} FROM dispatch_jobs WHERE id = ?"
    for fields in (False, True)
)
_COMPLETE = _SQL.complete
_GET_CRON = f"SELECT {_sql.CRON_COLUMNS} FROM dispatch_crons WHERE name = ?"
# The watcher's reads: the newest seq; ready jobs above a seq; ready jobs due after a time.
_HIGHEST_SEQ = "SELECT coalesce(max(seq), 0) FROM dispatch_jobs"
_NEW_READY = (
    f"SELECT seq, queue, run_at FROM dispatch_jobs WHERE seq > ? AND seq <= ? AND state IN {_sql.READY} "
    "ORDER BY seq LIMIT ?"
)
_LATER_READY = (
    f"SELECT run_at, queue FROM dispatch_jobs WHERE state IN {_sql.READY} AND run_at > ? ORDER BY run_at LIMIT ?"
)
# The ready log's bounds, and its rows above a seq (migration 8: jobs an update made ready).
_LOG_BOUNDS = "SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM dispatch_ready_log"
_LOG_ROWS = "SELECT seq, queue, run_at FROM dispatch_ready_log WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
_WATCH_JOIN = 2.0  # seconds close() waits for the watcher thread


class SQLiteStore(Store):
    """A :class:`~threaddispatch.stores.Store` in one SQLite file (see the module docstring).

    ``path`` is a file path (``":memory:"`` is refused: every thread needs the same
    database). ``busy_timeout`` is how long a statement waits for another writer before
    raising StoreUnavailableError. ``migrate=False`` skips creating/upgrading the schema at
    construction. Thread-safe and multi-process-safe; every method blocks for one short
    transaction (plus up to ``busy_timeout`` waiting for the write lock).

    ``durability`` says what a returned call has made safe (WAL mode; "lost" means the
    write is gone after the restart, never a corrupted file):

    - ``"normal"`` (default; ``PRAGMA synchronous = NORMAL``): a write that returned is in
      the WAL file, in the OS's page cache. A crash of any process (SIGKILL included) loses
      nothing that returned. A power cut or OS crash may lose the writes made since the
      WAL's last fsync, which SQLite runs before each checkpoint (every 0.1 s or so while
      an engine is subscribed, else every 10,000 WAL pages). No fsync on the commit path.
    - ``"full"``: every write (enqueues, claims, completions, everything that commits a
      change) returns only once its commit is on disk: a power cut loses nothing that
      returned, on a disk that honours fsync. The commit is made with ``synchronous =
      NORMAL`` and then covered by an ``fdatasync`` of the WAL that started after it,
      outside the write lock and shared by every commit before it
      (:mod:`~threaddispatch.stores._sqlite_sync` explains why that is as durable as
      ``synchronous = FULL``); concurrent enqueues of a process share that fsync. Where
      ``os.fdatasync`` is missing, ``synchronous = FULL``.
      If an fsync fails, that write and every later one of the process raise StoreError.

    At every durability, concurrent enqueues of a process are joined into one transaction
    (group commit): an enqueue returns once the transaction holding its jobs has committed.

    ``synchronous`` (OFF, NORMAL, FULL or EXTRA) sets the PRAGMA itself: with
    ``durability="full"`` it must be FULL or EXTRA (SQLite then fsyncs inside each
    commit); ``"OFF"`` never fsyncs (a process crash loses nothing, a power cut may
    corrupt the file).

    Writes of every thread, store and process on the file queue on its writer lock (never
    in SQLite's busy handler, which sleeps 1, 2, 5 ... ms), up to ``busy_timeout``; the
    lock's sidecar file ``<path>-writer.lock`` stays beside the database (like ``-wal`` and
    ``-shm``). A writer that bypasses it (the sqlite3 shell) meets SQLite's own locking.
    """

    #: Numbered schema migrations: ``(version, description, statements)``, applied in order.
    MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
        (1, "initial schema", SCHEMA_V1),
        (2, "worker registry", SCHEMA_V2),
        (3, "trace context", SCHEMA_V3),
        (4, "job dependencies", SCHEMA_V4),
        (5, "serial locks", SCHEMA_V5),
        (6, "cron overlap", SCHEMA_V6),
        (7, "cluster limits", SCHEMA_V7),
        (8, "ready log", SCHEMA_V8),
        (9, "queue resumes", SCHEMA_V9),
        (10, "lock holds", SCHEMA_V10),
        (11, "dead letters keep their job's lock, unique key, dependencies and timeout", SCHEMA_V11),
        (12, "dependency rows indexed by waiting job", SCHEMA_V12),
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        durability: str = "normal",
        synchronous: str | None = None,
        migrate: bool = True,
    ) -> None:
        if sqlite3.sqlite_version_info < _MIN_VERSION:
            raise ConfigurationError(
                f"SQLiteStore needs SQLite >= 3.35 (UPDATE ... RETURNING); this Python has {sqlite3.sqlite_version}"
            )
        if not isinstance(path, (str, os.PathLike)) or str(path) in ("", ":memory:"):
            raise ConfigurationError(f"SQLiteStore path must be a file path, got {path!r}")
        self.synchronous = synchronous_for(durability, synchronous)
        # durability="full" at the default synchronous: commits at NORMAL, each write then waits
        # for a shared WAL fdatasync outside the write lock (_sqlite_sync).
        sync_commits = durability == "full" and synchronous is None and SYNC_AVAILABLE
        if sync_commits:
            self.synchronous = "NORMAL"
        self.durability = durability
        self.path = os.fspath(path)
        self.busy_timeout = check_seconds("busy_timeout", busy_timeout)
        self._pid = os.getpid()
        self._connections = Connections(
            self.path,
            busy_timeout=self.busy_timeout,
            synchronous=self.synchronous,
            sync_commits=sync_commits,
            on_fork=self._reset_after_fork,
        )
        self._watcher = Watcher(self, where=self.path)
        self._limits: dict[str, QueueLimits] = {}  # set_queue_limits's, by queue
        # Whether the file has dispatch_lock_holds (migration 10): False only once migrate() found
        # an older schema (a store class whose MIGRATIONS stop before it); claims then skip holds.
        self._with_holds = True
        # Whether dispatch_dead_letters has the job's fields (migration 11): False as _with_holds is.
        self._letter_job = True
        # Every durability groups concurrent enqueues; only a shared fsync is worth lingering for.
        self._committer = GroupCommitter(
            timeout=2 * self.busy_timeout,
            where=self.path,
            syncer=self._connections.syncer,
            linger=LINGER if durability == "full" else 0.0,
        )
        _lifecycle.register(self)
        if migrate:
            self.migrate()

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use; only inside a ``@translate`` method."""
        return self._connections.conn()

    def _write(self, *, immediate: bool = True, defer_sync: bool = False) -> Write:
        """``with self._write() as conn:`` one write (see :class:`Write`); only inside a ``@translate`` method."""
        return Write(self._connections, immediate=immediate, defer_sync=defer_sync)

    # -- lifecycle ------------------------------------------------------------------------------

    @translate
    def migrate(self) -> int:
        """Apply the migrations newer than the file's version; returns the version. Idempotent, multi-process safe."""
        conn = self._conn()
        with self._write():
            conn.execute(_sql.version_table(TYPES))
            version = _SQL.apply_migrations(conn, self.MIGRATIONS)
        self._with_holds = version >= 10
        self._letter_job = version >= 11
        return version

    def schema_version(self) -> int:
        """The schema version of the file (0 before :meth:`migrate`)."""
        with self._connections.slot().lock:
            conn = self._conn()
            try:
                return int(conn.execute(_SQL.schema_version).fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    def close(self) -> None:
        """Stop the watcher threads and close every connection this process opened. Idempotent; later use
        raises StoreError.

        Call it after the engines using the store have stopped. Waits for a thread still
        inside a store call, up to ``busy_timeout`` plus 10 seconds; such a thread's
        connection is left open if it does not finish by then.
        """
        self._watcher.close(_WATCH_JOIN)
        self._connections.close()
        _lifecycle.unregister(self)

    def _prepare_for_fork(self) -> None:
        """Just before fork(): see :meth:`Connections.prepare_for_fork` (called by the lifecycle's fork hook)."""
        self._connections.prepare_for_fork()

    def _resume_after_fork(self) -> None:
        """In the parent after fork(): connections reopen on use."""
        self._connections.resume_after_fork()

    def _reset_after_fork(self) -> None:
        """In the child: fresh connections, no watcher, no group commit in progress."""
        self._pid = os.getpid()
        self._connections.reset_after_fork()
        self._watcher.reset_after_fork()
        self._committer.reset_after_fork()

    def describe(self) -> Mapping[str, object]:
        """``{"kind": "SQLiteStore", "path": ..., "durability": ...}``."""
        return {"kind": "SQLiteStore", "path": self.path, "durability": self.durability}

    # -- wake-ups ----------------------------------------------------------------------------------

    def subscribe_wakeups(self, callback: WakeupCallback) -> Callable[[], None]:
        """Have ``callback(queue, run_at)`` called when other processes' jobs arrive, when any process's update
        makes a job ready (the ready log), and when delayed jobs fall due.

        Runs on this store's watcher thread (``threaddispatch-sqlite-watch``, with
        ``threaddispatch-sqlite-checkpoint`` beside it; see
        :mod:`~threaddispatch.stores._sqlite_watch`), started by the first subscriber and
        stopped with the last and by :meth:`close`. ``(None, None)`` means "look now".
        Returns an idempotent unsubscribe function. Non-blocking.
        """
        if not callable(callback):
            raise ConfigurationError(f"wake-up callback must be callable, got {show(callback)}")
        if os.getpid() != self._pid:
            self._reset_after_fork()
        return self._watcher.subscribe(callback)

    @translate
    def _watch_version(self) -> int:
        """``PRAGMA data_version`` of the calling thread's connection: changes when another connection commits."""
        return int(self._conn().execute("PRAGMA data_version").fetchone()[0])

    @translate
    def _watch_rows(self, after_seq: int, limit: int) -> tuple[int, list[tuple[int, str, float]]]:
        """The highest seq, and up to ``limit`` ready jobs above ``after_seq`` up to it: (seq, queue, run_at)."""
        conn = self._conn()
        highest = int(conn.execute(_HIGHEST_SEQ).fetchone()[0])
        if limit <= 0 or highest <= after_seq:
            return highest, []
        return highest, conn.execute(_NEW_READY, (after_seq, highest, limit)).fetchall()

    @translate
    def _watch_released(self, after_seq: int, limit: int) -> tuple[int, int, list[tuple[int, str, float]]]:
        """The ready log's lowest and highest seq, and up to ``limit`` of its rows above ``after_seq``:
        (seq, queue, run_at) of the jobs updates made ready. A file without the log (not migrated) has none."""
        conn = self._conn()
        try:
            lowest, highest = conn.execute(_LOG_BOUNDS).fetchone()
        except sqlite3.OperationalError as error:
            if "no such table" not in str(error):
                raise
            return 0, 0, []
        if limit <= 0 or highest <= after_seq:
            return int(lowest), int(highest), []
        return int(lowest), int(highest), conn.execute(_LOG_ROWS, (after_seq, highest, limit)).fetchall()

    @translate
    def _watch_later(self, after: float, limit: int) -> list[tuple[float, str]]:
        """Up to ``limit`` ready jobs due after ``after`` (epoch), earliest first: (run_at, queue)."""
        return self._conn().execute(_LATER_READY, (after, limit)).fetchall()

    @translate
    def _watch_checkpoint(self) -> None:
        """A PASSIVE WAL checkpoint (copies what it can, waits for nobody)."""
        self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- producers --------------------------------------------------------------------------------

    @staticmethod
    def _insert(conn: sqlite3.Connection, job: JobRecord) -> str:
        """Insert a job in the caller's IMMEDIATE transaction; returns its id, or the id of its key's active holder.

        A job with dependencies goes in waiting (or pending, or cancelled: ``Statements.settle_new``).
        """
        if job.unique_key is not None:
            row = conn.execute(_SQL.active_holder, (job.unique_key,)).fetchone()
            if row is not None:
                return str(row[0])
        if not job.depends_on:
            conn.execute(_INSERT, job_params(job))
            return job.id
        settled, waits = _SQL.settle_new(conn, job)
        conn.execute(_INSERT, job_params(settled))
        _SQL.record_waits(conn, job.id, waits)
        return job.id

    @translate
    def enqueue(self, jobs: Sequence[JobRecord]) -> list[str]:
        """See :meth:`Store.enqueue`. One transaction (shared by concurrent callers: the group
        commit): up to 32 new plain jobs are ONE multi-row INSERT statement (see :meth:`_write_jobs`)."""
        if not jobs:
            return []
        try:
            return self._committer.enqueue(jobs, self._write_jobs)
        except sqlite3.IntegrityError as error:
            raise StoreError(f"could not insert jobs: {error} (a job id already exists?)") from error

    def _write_jobs(self, requests: Sequence[Sequence[JobRecord]]) -> list[list[str]]:
        """Insert every request's jobs in one transaction on this thread's connection; each request's ids.

        New plain jobs (:func:`fresh_params`: the usual case) go in as one multi-row INSERT per
        :data:`INSERT_ROWS` (up to that many, the statement is the whole transaction: no BEGIN/COMMIT);
        with any other job among them, all in one IMMEDIATE transaction (:meth:`_insert_many`)."""
        conn = self._conn()
        first = requests[0]
        params: Sequence[Any] | None
        if len(requests) == 1 and len(first) == 1:  # the usual enqueue: no list built
            params, count = fresh_params(first[0]), 1
        else:
            rows = [fresh_params(job) for jobs in requests for job in jobs]
            params = None if None in rows else [value for row in rows if row is not None for value in row]
            count = len(rows)
        if params is not None:  # built before the write lock: only the insert runs under it
            with self._write(immediate=count > INSERT_ROWS, defer_sync=True):
                last = insert_fresh_in(conn, params, count)
            if self._watcher.active and last is not None:
                # One writer inserting: the rows took consecutive seqs, in order.
                self._watcher.note_own(last - count + 1, last)
            return [[job.id for job in jobs] for jobs in requests]
        before = conn.total_changes
        with self._write(defer_sync=True):
            ids = [self._insert_many(conn, jobs) for jobs in requests]
            inserted = conn.total_changes - before
            last = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0]) if inserted else 0
        if inserted and self._watcher.active and not any(job.depends_on for jobs in requests for job in jobs):
            # One writer inserting: the transaction's rows took consecutive seqs. (With dependency
            # rows among them they are not all jobs: the watcher may then announce ours, harmlessly.)
            self._watcher.note_own(last - inserted + 1, last)
        return ids

    def _insert_many(self, conn: sqlite3.Connection, jobs: Sequence[JobRecord]) -> list[str]:
        """Insert ``jobs`` in the open transaction, in their order; their ids (a unique key's active
        holder for a duplicate).

        Order matters: seqs are the claim's and a serial lock's insertion order, and a job may depend
        only on jobs inserted before it in the call. Each run of consecutive new plain jobs is one
        multi-row INSERT; each run of jobs without a unique key among which some have dependencies is
        settled together (``settle_run``: one lookup of their dependencies' states), then one
        ``executemany`` and one insert of their waits, as PostgreSQLStore does; a job with a unique
        key goes alone between the runs (its holder is looked up first)."""
        ids: list[str] = []
        run: list[JobRecord] = []  # the current run of jobs without a unique key
        for job in jobs:
            if job.unique_key is None:
                run.append(job)
                ids.append(job.id)
                continue
            self._insert_run(conn, run)
            run = []
            ids.append(self._insert(conn, job))
        self._insert_run(conn, run)
        return ids

    @staticmethod
    def _insert_run(conn: sqlite3.Connection, jobs: Sequence[JobRecord]) -> None:
        """Insert ``jobs`` (none with a unique key) in order in the open transaction: the new plain ones as
        multi-row INSERTs; with dependencies among them, all settled with one lookup and inserted by one
        ``executemany``, their waits by one INSERT per 250. A JobNotFoundError (an unknown dependency) is
        raised once the jobs before the one it names are inserted, as one by one would have."""
        rows = [fresh_params(job) for job in jobs]
        if None not in rows:
            if rows:
                insert_fresh_in(conn, [value for row in rows if row is not None for value in row], len(rows))
            return
        settled, unknown = _SQL.settle_run(conn, jobs)
        conn.executemany(_INSERT, [job_params(job) for job, _waits in settled])
        _SQL.record_all_waits(conn, [(job.id, waits) for job, waits in settled if waits])
        if unknown is not None:
            raise unknown

    # -- workers -------------------------------------------------------------------------------------

    @translate
    def claim(self, queues: Sequence[str], limit: int, *, worker_id: str, now: float) -> list[JobRecord]:
        """See :meth:`Store.claim`: one ``UPDATE ... RETURNING`` (its own transaction; under BEGIN IMMEDIATE
        with cluster limits)."""
        if limit <= 0 or not queues:
            return []
        if self._limited(queues):
            conn = self._conn()
            with self._write():
                return claim_in(conn, queues, limit, worker_id, now, limits=self._limits, holds=self._with_holds)
        with self._write(immediate=False) as conn:
            rows = claim_rows_in(conn, queues, limit, worker_id, now, holds=self._with_holds)
        return jobs_from_claim(rows)

    def _limited(self, queues: Sequence[str]) -> bool:
        """Whether a claim of ``queues`` meets cluster limits (several statements in one transaction)."""
        limits = self._limits
        return bool(limits) and any(queue in limits for queue in queues)

    @translate
    def complete_and_claim(
        self,
        outcomes: Sequence[Completion],
        queues: Sequence[str],
        limit: int,
        *,
        worker_id: str,
        now: float,
    ) -> tuple[set[str], list[JobRecord]]:
        """See :meth:`Store.complete_and_claim`: ONE IMMEDIATE transaction for both (one commit: two cost
        ~50% more CPU per cycle), of two statements when the jobs have no dependents; the claimed rows
        become jobs after the commit. Without outcomes, :meth:`claim` (one statement)."""
        if not outcomes:
            return set(), self.claim(queues, limit, worker_id=worker_id, now=now)
        conn = self._conn()
        with self._write():
            done = self._complete_in(conn, outcomes, now)
            if self._limited(queues):
                return done, claim_in(conn, queues, limit, worker_id, now, limits=self._limits, holds=self._with_holds)
            rows = claim_rows_in(conn, queues, limit, worker_id, now, holds=self._with_holds)
        return done, jobs_from_claim(rows)

    @translate
    def set_queue_limits(self, limits: Sequence[QueueLimits], *, now: float) -> None:
        """See :meth:`Store.set_queue_limits`: the buckets are rows of the file, shared by its every process."""
        conn = self._conn()
        with self._write():
            _SQL.register_limits(conn, limits, now)
        # Replaced whole, never mutated: claims on other threads read it without a lock.
        self._limits = {**self._limits, **{queue_limits.queue: queue_limits for queue_limits in limits}}

    @translate
    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat`."""
        alive: set[str] = set()
        if not job_ids:
            return alive
        conn = self._conn()
        with self._write():
            for chunk in chunks(list(job_ids)):
                rows = conn.execute(
                    f"UPDATE dispatch_jobs SET heartbeat_at = ? WHERE id IN ({marks(len(chunk))}) "
                    "AND state = 'running' AND worker_id = ? RETURNING id",
                    (now, *chunk, worker_id),
                ).fetchall()
                alive.update(row[0] for row in rows)
        return alive

    def _push_dead_letter(self, conn: sqlite3.Connection, job_id: str, error: str | None, now: float) -> DeadLetter:
        letter_id = uuid.uuid4().hex
        conn.execute(_PUSH_LETTER[self._letter_job], (letter_id, error, now, job_id))
        return letter_from_row(conn.execute(_SQL.get_letter[self._letter_job], (letter_id,)).fetchone())

    @translate
    def reap_stale(self, *, older_than: float, now: float) -> list[str]:
        """See :meth:`Store.reap_stale`: the stale lock holds go in the same transaction."""
        conn = self._conn()
        with self._write():
            if self._with_holds:
                conn.execute(_SQL.reap_holds, (older_than,))
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
                    release_in(conn, [job_id], "failed", now)
                else:
                    conn.execute(
                        "UPDATE dispatch_jobs SET state = 'pending', worker_id = NULL, run_at = ?, updated_at = ? "
                        "WHERE id = ?",
                        (now, now, job_id),
                    )
        return [row[0] for row in rows]

    @translate
    def complete(
        self, job_id: str, *, worker_id: str, attempts: int, result: str | None, now: float, error: str | None = None
    ) -> bool:
        """See :meth:`Store.complete`: one statement, or with dependents to release one IMMEDIATE transaction."""
        return bool(self._complete([Completion(job_id, worker_id, attempts, result, error)], now))

    @translate
    def complete_many(self, outcomes: Sequence[Completion], *, now: float) -> set[str]:
        """See :meth:`Store.complete_many`: one statement per 100 jobs, or with dependents to release (or a sync
        per commit) one IMMEDIATE transaction."""
        return self._complete(outcomes, now)

    def _complete(self, outcomes: Sequence[Completion], now: float) -> set[str]:
        """Complete ``outcomes``; the ids applied. Without a sync per commit, the jobs without dependents
        first, each statement its own transaction, then the rest (dependents to release with them, or
        claims no longer running) in one IMMEDIATE transaction; with one, all in one. Only inside a
        ``@translate`` method."""
        if not outcomes:
            return set()
        conn = self._conn()
        if self._connections.fsyncs:
            with self._write():
                return self._complete_in(conn, outcomes, now)
        with self._write(immediate=False):
            done, rest = complete_alone_in(conn, outcomes, now)
        if not rest:
            return done
        with self._write():
            return done | complete_in(conn, rest, now)

    @staticmethod
    def _complete_in(conn: sqlite3.Connection, outcomes: Sequence[Completion], now: float) -> set[str]:
        """Complete ``outcomes`` in the open transaction: one statement for the jobs without dependents,
        then the rest with their dependents' release (:func:`complete_in`)."""
        done, rest = complete_alone_in(conn, outcomes, now)
        return done | complete_in(conn, rest, now) if rest else done

    @translate
    def retry_later(
        self, job_id: str, *, worker_id: str, attempts: int, run_at: float, error: str | None, now: float
    ) -> bool:
        """See :meth:`Store.retry_later`."""
        with self._write(immediate=False) as conn:
            cursor = conn.execute(_SQL.retry_later, (run_at, error, now, job_id, worker_id, attempts))
        return cursor.rowcount == 1

    @translate
    def fail(
        self, job_id: str, *, worker_id: str | None, attempts: int | None, error: str | None, now: float
    ) -> DeadLetter | None:
        """See :meth:`Store.fail`."""
        conn = self._conn()
        with self._write():
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
            letter = self._push_dead_letter(conn, job_id, error, now)
            release_in(conn, [job_id], "failed", now)
            return letter

    @translate
    def release(self, job_ids: Sequence[str], *, worker_id: str, now: float, refund_attempt: bool = True) -> int:
        """See :meth:`Store.release`."""
        if not job_ids:
            return 0
        released = 0
        conn = self._conn()
        with self._write():
            for chunk in chunks(list(job_ids)):
                cursor = conn.execute(
                    "UPDATE dispatch_jobs SET state = 'pending', worker_id = NULL, run_at = ?, updated_at = ?, "
                    f"attempts = max(0, attempts - ?) WHERE id IN ({marks(len(chunk))}) "
                    "AND state = 'running' AND worker_id = ?",
                    (now, now, 1 if refund_attempt else 0, *chunk, worker_id),
                )
                released += cursor.rowcount
        return released

    # -- management --------------------------------------------------------------------------------

    @translate
    def get(self, job_id: str) -> JobRecord | None:
        """See :meth:`Store.get`."""
        row = self._conn().execute(_SQL.get_job, (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    @translate
    def list_jobs(
        self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """See :meth:`Store.list_jobs`."""
        self._check_limit(limit, offset)
        rows = self._conn().execute(*_SQL.list_jobs(state, queue, limit, offset)).fetchall()
        return [job_from_row(row) for row in rows]

    @translate
    def counts(self, *, queue: str | None = None) -> dict[JobState, int]:
        """See :meth:`Store.counts`."""
        if queue is None:
            rows = self._conn().execute(_SQL.count_all).fetchall()
        else:
            rows = self._conn().execute(_SQL.count_queue, (queue,)).fetchall()
        return _sql.counts_from_rows(rows)

    @translate
    def counts_by_queue(self, queues: Sequence[str]) -> dict[str, dict[JobState, int]]:
        """See :meth:`Store.counts_by_queue`: one ``GROUP BY queue, state`` read over every queue."""
        rows = self._conn().execute("SELECT queue, state, count(*) FROM dispatch_jobs GROUP BY queue, state")
        by_queue: dict[str, list[tuple[str, int]]] = {queue: [] for queue in queues}
        for queue, state, count in rows.fetchall():
            if queue in by_queue:
                by_queue[queue].append((state, count))
        return {queue: _sql.counts_from_rows(found) for queue, found in by_queue.items()}

    @translate
    def throughput(self, *, since: float, now: float, bucket: float = 60.0) -> list[tuple[int, JobState, int]]:
        """See :meth:`Store.throughput`: one ``GROUP BY`` over the finished-jobs index."""
        rows = self._conn().execute(
            "SELECT CAST((finished_at - ?) / ? AS INTEGER), state, count(*) FROM dispatch_jobs "
            f"WHERE state IN {_sql.FINAL} AND finished_at >= ? AND finished_at < ? AND state <> 'cancelled' "
            "GROUP BY 1, 2",
            (since, bucket, since, now),
        )
        return [(int(index), JobState(state), int(count)) for index, state, count in rows.fetchall()]

    @translate
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
            condition = f"state IN {_sql.ACTIVE if include_running else _sql.UNCLAIMED}"
        conn = self._conn()
        with self._write():
            if include_running and worker_id is None and attempts is None and self._with_holds:
                # A running job's lock stays held while its handler may still run (before its state changes).
                conn.execute(_SQL.hold_running, (now, job_id))
            cursor = conn.execute(
                "UPDATE dispatch_jobs SET state = 'cancelled', waiting_on = 0, error = coalesce(?, error), "
                f"finished_at = ?, updated_at = ? WHERE id = ? AND {condition}",
                params,
            )
            if cursor.rowcount == 1:
                release_in(conn, [job_id], "cancelled", now)
                return True
        if conn.execute("SELECT 1 FROM dispatch_jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        return False

    @translate
    def release_waiting(self, *, now: float) -> int:
        """See :meth:`Store.release_waiting`: one IMMEDIATE transaction. (Writers are serialised here, so
        it finds work only after a write that bypassed the store, e.g. by hand.)"""
        conn = self._conn()
        with self._write():
            return _SQL.sweep_waiting(conn, now)

    @translate
    def requeue(self, job_id: str, *, now: float) -> None:
        """See :meth:`Store.requeue`."""
        conn = self._conn()
        with self._write():
            row = conn.execute(
                "SELECT state, unique_key, depends_on, on_dependency_failure FROM dispatch_jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            state, unique_key, depends_on, policy = row
            _SQL.check_requeue(conn, job_id, state, unique_key)
            waits = _SQL.rerun_waits(conn, job_id, json.loads(depends_on), policy) if depends_on else []
            conn.execute(_SQL.requeue, (now, now, job_id))
            conn.execute(_SQL.delete_job_letters, (job_id,))
            if waits:
                # Its rows of dependencies still unfinished when it was cancelled go: each is written once.
                conn.execute("DELETE FROM dispatch_job_deps WHERE job_id = ?", (job_id,))
                conn.execute(
                    "UPDATE dispatch_jobs SET state = 'waiting', waiting_on = ? WHERE id = ?", (len(waits), job_id)
                )
                _SQL.record_waits(conn, job_id, waits)

    @translate
    def purge_finished(self, *, older_than: float) -> int:
        """See :meth:`Store.purge_finished`: deletes in chunks of short transactions."""
        conn = self._conn()
        total = 0
        while True:
            with self._write():
                cursor = conn.execute(
                    "DELETE FROM dispatch_jobs WHERE seq IN (SELECT seq FROM dispatch_jobs "
                    f"WHERE state IN {_sql.FINAL} AND finished_at < ? LIMIT 1000)",
                    (older_than,),
                )
            total += cursor.rowcount
            if cursor.rowcount < 1000:
                return total

    # -- dead letters ------------------------------------------------------------------------------

    @translate
    def list_dead_letters(self, *, queue: str | None = None, limit: int = 50, offset: int = 0) -> list[DeadLetter]:
        """See :meth:`Store.list_dead_letters`."""
        self._check_limit(limit, offset)
        query, params = _SQL.list_dead_letters(queue, limit, offset, job_fields=self._letter_job)
        rows = self._conn().execute(query, params).fetchall()
        return [letter_from_row(row) for row in rows]

    @translate
    def count_dead_letters(self, *, queue: str | None = None) -> int:
        """See :meth:`Store.count_dead_letters`: one ``COUNT``."""
        return int(self._conn().execute(*_SQL.count_dead_letters(queue)).fetchone()[0])

    @translate
    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """See :meth:`Store.get_dead_letter`."""
        row = self._conn().execute(_SQL.get_letter[self._letter_job], (dead_letter_id,)).fetchone()
        return None if row is None else letter_from_row(row)

    @translate
    def replay_dead_letter(self, dead_letter_id: str, *, job: JobRecord) -> str:
        """See :meth:`Store.replay_dead_letter`: the delete, the requeue's checks and the insert in one
        IMMEDIATE transaction (a refusal rolls the delete back)."""
        conn = self._conn()
        with self._write():
            cursor = conn.execute(_SQL.delete_letter, (dead_letter_id,))
            if cursor.rowcount != 1:
                raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
            placed, waits = _SQL.place_replay(conn, dead_letter_id, job)
            conn.execute(_INSERT, job_params(placed))
            _SQL.record_waits(conn, job.id, waits)
            return job.id

    @translate
    def purge_dead_letters(self, *, older_than: float | None = None) -> int:
        """See :meth:`Store.purge_dead_letters`."""
        with self._write(immediate=False) as conn:
            if older_than is None:
                cursor = conn.execute(_SQL.purge_all_letters)
            else:
                cursor = conn.execute(_SQL.purge_letters_before, (older_than,))
        return cursor.rowcount

    # -- queues ------------------------------------------------------------------------------------

    @translate
    def set_queue_paused(self, queue: str, paused: bool, *, now: float) -> None:
        """See :meth:`Store.set_queue_paused`."""
        with self._write(immediate=False) as conn:
            conn.execute(_SQL.pause_queue, (queue, 1 if paused else 0, now))

    @translate
    def paused_queues(self) -> set[str]:
        """See :meth:`Store.paused_queues`."""
        return {row[0] for row in self._conn().execute("SELECT queue FROM dispatch_queues WHERE paused = 1")}

    # -- cron and leases ---------------------------------------------------------------------------

    @translate
    def acquire_lease(self, name: str, *, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`Store.acquire_lease`."""
        conn = self._conn()
        with self._write():
            conn.execute(_SQL.acquire_lease, (name, holder, now + ttl, now))
            row = conn.execute("SELECT holder FROM dispatch_leases WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] == holder

    @translate
    def release_lease(self, name: str, *, holder: str) -> None:
        """See :meth:`Store.release_lease`."""
        with self._write(immediate=False) as conn:
            conn.execute(_SQL.release_lease, (name, holder))

    @translate
    def register_worker(self, info: WorkerInfo) -> None:
        """See :meth:`Store.register_worker`."""
        with self._write(immediate=False) as conn:
            conn.execute(_SQL.register_worker, _sql.worker_params(info))

    @translate
    def heartbeat_worker(self, worker_id: str, *, running: int, now: float) -> bool:
        """See :meth:`Store.heartbeat_worker`."""
        with self._write(immediate=False) as conn:
            return bool(conn.execute(_SQL.heartbeat_worker, (running, now, worker_id)).rowcount == 1)

    @translate
    def remove_worker(self, worker_id: str) -> bool:
        """See :meth:`Store.remove_worker`."""
        with self._write(immediate=False) as conn:
            return bool(conn.execute(_SQL.remove_worker, (worker_id,)).rowcount == 1)

    @translate
    def list_workers(self, *, now: float, stale_after: float) -> list[WorkerInfo]:
        """See :meth:`Store.list_workers`."""
        rows = self._conn().execute(_SQL.list_workers, (now - stale_after,)).fetchall()
        return [_sql.worker_from_row(row) for row in rows]

    @translate
    def reap_workers(self, *, older_than: float) -> int:
        """See :meth:`Store.reap_workers`."""
        with self._write(immediate=False) as conn:
            return int(conn.execute(_SQL.reap_workers, (older_than,)).rowcount)

    @translate
    def upsert_cron(self, entry: CronEntry, *, now: float) -> CronEntry:
        """See :meth:`Store.upsert_cron`."""
        conn = self._conn()
        with self._write():
            conn.execute(_SQL.upsert_cron, _sql.cron_params(entry, now))
            row = conn.execute(_GET_CRON, (entry.name,)).fetchone()
        return cron_from_row(row)

    @translate
    def list_crons(self) -> list[CronEntry]:
        """See :meth:`Store.list_crons`."""
        rows = self._conn().execute(_SQL.list_crons).fetchall()
        return [cron_from_row(row) for row in rows]

    @translate
    def delete_cron(self, name: str) -> bool:
        """See :meth:`Store.delete_cron`."""
        with self._write(immediate=False) as conn:
            return conn.execute(_SQL.delete_cron, (name,)).rowcount == 1

    @translate
    def fire_cron(self, name: str, *, tick: float, job: JobRecord) -> bool:
        """See :meth:`Store.fire_cron`: compare-and-set of ``last_tick`` and the insert in one transaction."""
        conn = self._conn()
        with self._write():
            if not _SQL.advance_cron(conn, name, tick, job.created_at):
                return False
            if not _SQL.cron_skips(conn, name, job, holds=self._with_holds):
                self._insert(conn, job)
            return True

    # -- lock holds ------------------------------------------------------------------------------

    @translate
    def hold_locks(self, claims: Sequence[tuple[str, int]], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.hold_locks`: one IMMEDIATE transaction."""
        if not claims or not self._with_holds:
            return set()
        conn = self._conn()
        with self._write():
            return _SQL.hold_claims(conn, claims, worker_id, now)

    @translate
    def heartbeat_holds(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat_holds`: one statement per 500 ids, in one transaction."""
        beaten: set[str] = set()
        if not job_ids or not self._with_holds:
            return beaten
        conn = self._conn()
        with self._write():
            for chunk in chunks(list(job_ids)):
                rows = conn.execute(
                    f"UPDATE dispatch_lock_holds SET heartbeat_at = ? WHERE job_id IN ({marks(len(chunk))}) "
                    "AND worker_id = ? RETURNING job_id",
                    (now, *chunk, worker_id),
                ).fetchall()
                beaten.update(row[0] for row in rows)
        return beaten

    @translate
    def release_holds(self, claims: Sequence[tuple[str, int]], *, worker_id: str) -> int:
        """See :meth:`Store.release_holds`: one transaction; its trigger logs each lock's next job (the wake-up)."""
        if not claims or not self._with_holds:
            return 0
        conn = self._conn()
        with self._write():
            return _SQL.release_claims(conn, claims, worker_id)

    @translate
    def list_holds(self, *, lock: str | None = None) -> list[LockHold]:
        """See :meth:`Store.list_holds`."""
        if not self._with_holds:
            return []
        return _SQL.holds_listed(self._conn(), lock)
