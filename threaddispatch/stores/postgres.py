"""PostgresStore: the job store for many worker processes and machines on one PostgreSQL.

This module is the connection handling and the :class:`~threaddispatch.stores.Store`
methods on jobs; the methods on dead letters, paused queues, leases and cron entries are
in :mod:`~threaddispatch.stores._pg_admin` (a mixin), the SQL text in
:mod:`~threaddispatch.stores._pg_sql`, the DSN and connection pool in
:mod:`~threaddispatch.stores._pg_pool`, the LISTEN thread in
:mod:`~threaddispatch.stores._pg_listen`. Each method is a short ``op(conn)`` handed to
:meth:`PostgresStore._run` with its docstring. It runs past 600 lines
because the Store interface on jobs is some thirty methods, each with its own transaction
shape and retry rule; they share the one ``_run`` and pool, so splitting them would only
spread one object over several files.

- psycopg 3 (extra ``postgres``). Connections are autocommit: a method that is one
  statement costs one round trip; a method that needs several runs them in one
  explicit transaction. Claiming is ONE statement,
  ``UPDATE ... WHERE seq IN (SELECT seq ... ORDER BY priority DESC, run_at, seq
  LIMIT n FOR UPDATE SKIP LOCKED) RETURNING ...`` (over several queues: that LIMIT once
  per queue, LATERAL, then the top n): concurrent claimers skip each other's rows
  instead of waiting, and no job is handed out twice. The engine's group commit
  (:meth:`PostgresStore.complete_and_claim`) writes the finished jobs and claims the next
  ones in that same single statement.
- Wake-ups: an ``AFTER INSERT`` statement trigger sends ``NOTIFY threaddispatch`` with the
  schema, queue and earliest ``run_at`` of the new ready jobs (one notification per queue per
  statement); row triggers announce the jobs an update makes claimable, in the transaction
  that does it, whichever method: a waiting job released and the next job of a serial lock
  whose holder finished (migration 9), a job retried (at its retry's ``run_at``), handed
  back, reaped or requeued (migration 10); a resumed queue is notified by the store. A listener
  thread per process (``threaddispatch-pg-listener``, running while an engine is
  subscribed through :meth:`PostgresStore.subscribe_wakeups`) passes them on. Engines keep
  polling as the fallback.
- Connections: a small pool per process, connecting on demand on the caller's thread,
  so a server that is down raises :class:`~threaddispatch.errors.StoreUnavailableError`
  at once, naming the DSN's host and port (never the password). A connection that
  breaks mid-call is discarded and the call is retried once on a new connection when
  that is safe (reads, and writes fenced so that running them twice changes nothing).
- Fork: a forked child starts with an empty pool and no listener (the huey pid guard),
  and never closes or uses the parent's connections.
- Versioned migrations (:attr:`PostgresStore.MIGRATIONS`, numbered 1, 2, ... like
  :attr:`SQLiteStore.MIGRATIONS` but each backend's own list, recorded in
  ``dispatch_schema_version``) run on first use or with :func:`migrate` (``threaddispatch
  migrate --store URL``), in one transaction under ``pg_advisory_xact_lock``: safe from many
  processes at once. Version 2 has autovacuum clean the jobs table after 1% of it changed,
  indexes included, so claims do not walk past the dead entries finished jobs leave.
- The claim, the group commit and ``complete_many`` are prepared on each connection at
  their first use (psycopg ``prepare=True``): planned once, not per call.

Needs PostgreSQL >= 13 (``gen_random_uuid()``, transition tables).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

try:
    import psycopg
    from psycopg import sql
except ImportError as _error:  # pragma: no cover - exercised only without the extra
    raise ImportError("PostgresStore needs psycopg 3: pip install 'threaddispatch[postgres]'") from _error

from threaddispatch import _lifecycle
from threaddispatch.backoff import check_seconds
from threaddispatch.errors import (
    ConfigurationError,
    InvalidStateError,
    JobNotFoundError,
    StoreError,
    StoreUnavailableError,
)
from threaddispatch.stores import _pg_sql as q
from threaddispatch.stores import _sql
from threaddispatch.stores._pg_admin import AdminMethods
from threaddispatch.stores._pg_listen import WakeupCallback, Wakeups
from threaddispatch.stores._pg_pool import LOCK_TIMEOUT_MAX, Conn, Dsn, Pool, broken, milliseconds, session_setup
from threaddispatch.stores._pg_sql import SQL, claimed, outcome_params, pg_job_params
from threaddispatch.stores._sql import job_from_row, letter_from_row
from threaddispatch.stores.base import (
    WORKER_LOST_ERROR,
    Completion,
    DeadLetter,
    JobRecord,
    JobState,
    LockHold,
    QueueLimits,
    Store,
)

__all__ = ["PostgresStore", "migrate"]

R = TypeVar("R")

_log = logging.getLogger("threaddispatch.stores.postgres")

_COPY_MIN = 16  # from this many plain jobs, enqueue uses COPY rather than a pipelined executemany
# SQLSTATEs that mean the server ended the session before running what we sent
# (admin_shutdown, crash_shutdown, cannot_connect_now): retrying cannot run it twice.
_NOT_EXECUTED = frozenset({"57P01", "57P02", "57P03"})
_SYNCHRONOUS_COMMIT = ("on", "off", "local", "remote_write", "remote_apply")
_LOCK_NOT_AVAILABLE = "55P03"  # a statement waited longer than lock_timeout for a lock
_MIGRATE_LOCK_TIMEOUT = 60.0  # the least a migration waits for its locks (another process migrating)


def _check_schema(schema: object) -> None:
    """Refuse a ``schema`` PostgreSQL cannot use as written: ConfigurationError naming it.

    The server ends a string at NUL (it would use the schema named by the text before it)
    and the wire is UTF-8 (a lone surrogate cannot be sent); 63 bytes is its identifier limit.
    """
    problem = None
    if not isinstance(schema, str) or not schema:
        problem = "is not a non-empty str"
    elif "\x00" in schema:
        problem = "contains NUL"
    else:
        try:
            size = len(schema.encode())
        except UnicodeEncodeError:
            problem = "is not valid UTF-8 text (a lone surrogate)"
        else:
            if size > 63:
                problem = f"is {size} bytes in UTF-8"
    if problem is not None:
        raise ConfigurationError(f"schema must be a PostgreSQL identifier of 1-63 bytes, got {schema!r}: it {problem}")


def _table_schema(conn: Conn) -> str | None:
    """The schema holding ``dispatch_jobs`` as this connection resolves it (None before migrating)."""
    row = conn.execute(q.TABLE_SCHEMA).fetchone()
    return None if row is None else str(row[0])


class PostgresStore(AdminMethods, Store):
    """A :class:`~threaddispatch.stores.Store` on PostgreSQL, shared by processes and machines.

    ``dsn`` is a libpq connection string or URL (``postgresql://user:pw@host:5432/db``);
    a URL may end in ``?schema=name`` to keep the tables in that schema (created if
    missing), as may the ``schema`` argument. The pool keeps ``min_size`` connections
    while idle (closing others idle for ``max_idle`` seconds) and opens at most
    ``max_size``; a call that finds all of them busy waits up to ``pool_timeout``
    seconds, then raises StoreUnavailableError. ``connect_timeout`` bounds opening a
    connection. ``synchronous_commit`` (e.g. ``"off"``) is set for this store's sessions:
    faster commits that a server crash may lose (never corrupt). ``listen_keepalive`` is
    how often the idle listener checks its connection; ``reconnect_max`` caps its
    reconnection backoff. ``migrate=False`` skips creating or upgrading the schema on
    first use. ``lock_timeout`` bounds each wait of a statement for a lock another session
    holds (a ``LOCK TABLE``, ``VACUUM FULL``, ``ALTER TABLE`` or a long transaction on the
    same rows): past it the statement is cancelled and the call raises
    StoreUnavailableError saying so (callers may retry; the statement's transaction is
    rolled back). The store's own transactions hold their locks for milliseconds, so the
    default of 5 s is only ever reached behind another session; migrations wait at least 60 s.

    Construction parses the DSN (ConfigurationError if invalid, never quoting it) and
    does no I/O. Thread-safe and multi-process-safe. Each method blocks for one short
    transaction, plus up to ``connect_timeout`` to connect or ``pool_timeout`` to get a
    connection and ``lock_timeout`` per lock wait; a server that cannot be reached raises
    StoreUnavailableError naming its host and port.
    """

    #: Numbered schema migrations ``(version, description, statements)``, as SQLiteStore's.
    MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
        (1, "initial schema", q.SCHEMA_V1),
        (2, "vacuum the jobs table often, with its indexes", q.SCHEMA_V2),
        (3, "worker registry", q.SCHEMA_V3),
        (4, "trace context", q.SCHEMA_V4),
        (5, "job dependencies", q.SCHEMA_V5),
        (6, "serial locks", q.SCHEMA_V6),
        (7, "cron overlap", q.SCHEMA_V7),
        (8, "cluster limits", q.SCHEMA_V8),
        (9, "wake-ups for jobs released or unlocked", q.SCHEMA_V9),
        (10, "wake-ups for jobs retried, handed back, reaped or requeued", q.SCHEMA_V10),
        (11, "dependents released by their dependency's completion trigger", q.SCHEMA_V11),
        (12, "wake-up payloads that fit NOTIFY's limit, whatever the queue name", q.SCHEMA_V12),
        (13, "lock holds", q.SCHEMA_V13),
        (14, "dead letters keep their job's lock, unique key, dependencies and timeout", q.SCHEMA_V14),
        (15, "dependency rows indexed by waiting job", q.SCHEMA_V15),
    )

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        max_idle: float = 600.0,
        pool_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        synchronous_commit: str | None = None,
        listen_keepalive: float = 30.0,
        reconnect_max: float = 5.0,
        lock_timeout: float = 5.0,
        migrate: bool = True,
    ) -> None:
        self._dsn = Dsn(dsn)
        schema = schema if schema is not None else self._dsn.schema
        if schema is not None:
            _check_schema(schema)
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "min_size" else 1):
                raise ConfigurationError(f"{name} must be an int >= {0 if name == 'min_size' else 1}, got {value!r}")
        if min_size > max_size:
            raise ConfigurationError(f"min_size ({min_size}) must be <= max_size ({max_size})")
        if synchronous_commit is not None and synchronous_commit not in _SYNCHRONOUS_COMMIT:
            raise ConfigurationError(
                f"synchronous_commit must be on, off, local, remote_write or remote_apply, got {synchronous_commit!r}"
            )
        self.schema = schema
        max_idle = check_seconds("max_idle", max_idle)
        pool_timeout = check_seconds("pool_timeout", pool_timeout)
        connect_timeout = check_seconds("connect_timeout", connect_timeout, allow_zero=False)
        listen_keepalive = check_seconds("listen_keepalive", listen_keepalive, allow_zero=False)
        reconnect_max = check_seconds("reconnect_max", reconnect_max, allow_zero=False)
        lock_timeout = check_seconds("lock_timeout", lock_timeout, allow_zero=False)
        if lock_timeout > LOCK_TIMEOUT_MAX:
            raise ConfigurationError(
                f"lock_timeout must be at most {LOCK_TIMEOUT_MAX:.0f} seconds, got {lock_timeout!r}"
            )
        self._lock_timeout = lock_timeout  # seconds; each session sets it at connecting (session_setup)
        self._pool = Pool(self._dsn, min_size=min_size, max_size=max_size, max_idle=max_idle,
                          pool_timeout=pool_timeout, connect_timeout=connect_timeout,
                          session_sql=session_setup(schema, synchronous_commit, lock_timeout))  # fmt: skip
        self._wakeups = Wakeups(self._pool, find_schema=lambda conn: self.schema or _table_schema(conn),
                                keepalive=listen_keepalive, reconnect_max=reconnect_max)  # fmt: skip
        self._migrated = not migrate
        # Whether the schema has dispatch_lock_holds (migration 13): False only once migrate() found
        # an older one (a store class whose MIGRATIONS stop before it); claims then skip holds.
        self._with_holds = True
        # Whether dispatch_dead_letters has the job's fields (migration 14): False as _with_holds is.
        self._letter_job = True
        self._migrate_lock = threading.Lock()
        self._schema_name: str | None = None  # _table_schema, once known (for _wake)
        # set_queue_limits's, by queue: replaced whole, never mutated (claims read it without a lock)
        self._limits: dict[str, QueueLimits] = {}
        _lifecycle.register(self)

    # -- connections -------------------------------------------------------------------------------

    def _check_pid(self) -> None:
        if os.getpid() != self._pool.pid:
            # Forked without the lifecycle hook having run: never touch the parent's connections.
            self._reset_after_fork()

    def _run(self, what: str, op: Callable[[Conn], R], *, idempotent: bool, setup: bool = True) -> R:
        """Run ``op(connection)`` and translate errors; retry once on a new connection if that is safe.

        A connection that breaks while ``op`` runs is discarded. The call is retried when
        ``idempotent`` (running it twice changes nothing more than once) or when the server
        said it never ran it (shutting down); otherwise StoreUnavailableError.
        """
        if setup and not self._migrated:
            self.migrate()
        for attempt in (1, 2):
            self._check_pid()
            conn, generation = self._pool.acquire()
            discard = False
            try:
                return op(conn)
            except psycopg.OperationalError as error:
                discard = broken(conn)
                if error.sqlstate == _LOCK_NOT_AVAILABLE and not discard:
                    self._dsn.raise_from(self._lock_timed_out(what, error), error)
                if discard and attempt == 1 and (idempotent or error.sqlstate in _NOT_EXECUTED):
                    _log.info("PostgresStore: connection lost during %s (%s); retrying on a new connection",
                              what, self._dsn.scrub(str(error).strip()))  # fmt: skip
                    continue
                self._dsn.raise_from(self._dsn.unavailable(what, error), error)
            except psycopg.Error as error:
                discard = broken(conn)
                self._dsn.raise_from(self._dsn.failed(what, error), error)
            except BaseException:
                discard = broken(conn)
                raise
            finally:
                self._pool.release(conn, generation, discard=discard)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lock_timed_out(self, what: str, error: BaseException) -> StoreUnavailableError:
        """The StoreUnavailableError for a statement cancelled by ``lock_timeout`` (its text scrubbed)."""
        text = self._dsn.scrub(str(error).strip()) or type(error).__name__
        return StoreUnavailableError(
            f"PostgreSQL store at {self._dsn.address} is unavailable ({what}): waited longer than "
            f"lock_timeout={self._lock_timeout}s for a lock another session holds on its tables or rows: {text}"
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema; returns its version. Idempotent; safe from many processes at once.

        One transaction under ``pg_advisory_xact_lock``, so concurrent callers wait for the
        first and then find nothing to do. Blocks for that transaction.
        """

        def op(conn: Conn) -> int:
            with conn.transaction():
                wait = milliseconds(max(self._lock_timeout, _MIGRATE_LOCK_TIMEOUT))
                conn.execute(sql.SQL("SET LOCAL lock_timeout TO {}").format(sql.Literal(wait)))
                conn.execute(q.MIGRATE_LOCK)
                if self.schema is not None:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                conn.execute(q.VERSION_TABLE)
                return SQL.apply_migrations(conn, self.MIGRATIONS)

        with self._migrate_lock:
            version = self._run("migrating the schema", op, idempotent=True, setup=False)
            self._with_holds = version >= 13
            self._letter_job = version >= 14
            self._migrated = True
        return version

    def schema_version(self) -> int:
        """The schema version in the database (0 before :meth:`migrate`). One read."""

        def op(conn: Conn) -> int:
            if conn.execute(q.VERSION_TABLE_EXISTS).fetchone() == (None,):
                return 0
            row = conn.execute(SQL.schema_version).fetchone()
            return int(row[0]) if row else 0

        return self._run("reading the schema version", op, idempotent=True, setup=False)

    def close(self) -> None:
        """Close this process's connections and stop its listener. Idempotent; later use raises StoreError.

        Connections in use are closed when their call returns. Non-blocking apart from
        closing sockets. Call it after the engines using the store have stopped.
        """
        self._pool.close()
        self._wakeups.close()
        _lifecycle.unregister(self)

    def _reset_after_fork(self) -> None:
        # The child abandons (never closes) the parent's connections; the listener thread
        # does not exist in the child.
        self._pool.reset_after_fork()
        self._wakeups.reset_after_fork()
        self._migrate_lock = threading.Lock()  # a thread migrating at the fork does not exist here

    def describe(self) -> Mapping[str, object]:
        """``{"kind": "PostgresStore", "host", "port", "dbname", "schema"}``: no user, no password."""
        return {
            "kind": "PostgresStore",
            "host": self._dsn.host,
            "port": self._dsn.port,
            "dbname": self._dsn.dbname,
            "schema": self.schema,
        }

    def __repr__(self) -> str:
        schema = f" schema={self.schema}" if self.schema else ""
        return f"<PostgresStore {self._dsn.where}{schema}{' closed' if self._pool.closed else ''}>"

    # -- wake-ups ----------------------------------------------------------------------------------------

    def subscribe_wakeups(self, callback: WakeupCallback) -> Callable[[], None]:
        """Have ``callback(queue, run_at)`` called when jobs arrive in the store, from any process.

        Runs on this process's listener thread (``threaddispatch-pg-listener``), started by
        the first subscriber and stopped with the last. ``(None, None)`` means "look now"
        (after a reconnection notifications may have been missed). Returns an idempotent
        unsubscribe function. Non-blocking: connecting happens on the listener thread.
        """
        if not callable(callback):
            raise ConfigurationError(f"wake-up callback must be callable, got {callback!r}")
        self._check_pid()
        return self._wakeups.subscribe(callback)

    def _wake(self, conn: Conn, queues: Sequence[str], run_at: float) -> None:
        """NOTIFY listeners that jobs of ``queues`` are ready from ``run_at`` (a queue resumed)."""
        if not queues:
            return
        if self._schema_name is None:
            self._schema_name = _table_schema(conn)
        conn.execute(q.WAKE, (self._schema_name, run_at, sorted(set(queues))))

    # -- producers -------------------------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[str]:
        """See :meth:`Store.enqueue`. One transaction: COPY for many plain jobs, ON CONFLICT for unique keys."""
        if not jobs:
            return []
        jobs = list(jobs)
        outside, inside = _dependencies(jobs)

        def op(conn: Conn) -> list[str]:
            if len(jobs) == 1 and jobs[0].unique_key is None and not jobs[0].depends_on:
                conn.execute(q.INSERT, pg_job_params(jobs[0]))  # one statement: its own transaction
                return [jobs[0].id]
            self._mark_depended_on(conn, outside)
            # In the call's order (seqs are the claim's and a serial lock's order; a job depends only on
            # jobs before it): each run of jobs without a unique key settled together (one lookup of
            # their dependencies' states), then one COPY or executemany and one insert of their waits;
            # a job with a unique key alone between the runs.
            ids: list[str] = []
            with conn.transaction(), conn.cursor() as cursor:
                run: list[JobRecord] = []
                for job in jobs:
                    if job.unique_key is None:
                        run.append(job)
                        ids.append(job.id)
                        continue
                    self._insert_run(conn, cursor, run)
                    run = []
                    ids.append(self._insert(conn, job))
                self._insert_run(conn, cursor, run)
                if inside:
                    conn.execute(q.MARK_NEW_DEPENDED_ON, (inside,))
            return ids

        try:
            ids = self._run("enqueueing jobs", op, idempotent=False)
        except StoreError as error:
            if isinstance(error.__cause__, psycopg.errors.UniqueViolation):
                raise StoreError(f"could not insert jobs: a job id already exists ({error})") from error.__cause__
            raise
        self._settle_missed(jobs)
        return ids

    @classmethod
    def _insert_run(cls, conn: Conn, cursor: psycopg.Cursor[Any], jobs: Sequence[JobRecord]) -> None:
        """Insert new jobs without a unique key, in order, in the caller's transaction: those with dependencies
        settled (``settle_run``: one lookup for all), all in one COPY or executemany, their waits in one
        INSERT. A JobNotFoundError is raised once the jobs before the one it names are inserted."""
        if not any(job.depends_on for job in jobs):
            cls._insert_plain(cursor, jobs)
            return
        settled, unknown = SQL.settle_run(conn, jobs)
        cls._insert_plain(cursor, [job for job, _waits in settled])
        SQL.record_all_waits(conn, [(job.id, waits) for job, waits in settled if waits])
        if unknown is not None:
            raise unknown

    @staticmethod
    def _insert_plain(cursor: psycopg.Cursor[Any], jobs: Sequence[JobRecord]) -> None:
        """Insert new jobs without a unique key (settled, if they have dependencies), in order: one COPY from
        ``_COPY_MIN`` on."""
        if len(jobs) >= _COPY_MIN:
            with cursor.copy(q.COPY) as copy:
                for job in jobs:
                    copy.write_row(pg_job_params(job))
        elif jobs:
            cursor.executemany(q.INSERT, [pg_job_params(job) for job in jobs])

    def _settle_missed(self, jobs: Sequence[JobRecord]) -> None:
        """Release the just stored dependents whose dependency's completion missed them (committed meanwhile).

        Every dependency was marked (``has_dependents``, committed) before the dependents were
        stored, so a completion that gets its row after the mark runs the release trigger,
        whose statements see every commit before they start. The trigger of a completion
        that ran before the dependents' commit misses them, but that completion got the row
        before it: waiting for each outside dependency's row lock (one at a time: no lock is
        held while waiting for another, so no deadlock with a completion of several) outlasts
        it, and after that every wait of a new dependent on a dependency already finished is
        one a release missed: taken and counted off here, as that release would have (each
        dependency by its own end state, so a dependent of several jobs, some missed and some
        still running, is left waiting only on the running ones). So whichever of the two
        commits second releases the dependent. Best effort: a failure is logged, the upkeep
        settles the rest.
        """
        outside, _ = _dependencies(jobs)
        if not outside:
            return
        waiting = [job.id for job in jobs if job.depends_on]
        now = max(job.created_at for job in jobs)

        def op(conn: Conn) -> None:
            # Autocommit: a share lock ends with its statement. The rows no one holds are locked (and let
            # go) in one statement that waits for none; each row held is then waited for alone.
            free = {row[0] for row in conn.execute(q.TRY_ROWS, (outside,)).fetchall()}
            for dependency in outside:
                if dependency not in free:
                    conn.execute(q.AWAIT_ROW, (dependency,))
            with conn.transaction():
                missed: dict[str, list[tuple[str, str]]] = {}
                for dependent, dependency, state in conn.execute(q.MISSED_WAITS, (waiting,)).fetchall():
                    missed.setdefault(state, []).append((dependent, dependency))
                for state, rows in missed.items():
                    SQL.release_dependents(conn, rows, state, now)

        try:
            self._run("settling new dependents", op, idempotent=True)
        except StoreError:
            _log.warning("PostgresStore: could not look again at new dependents; the upkeep settles them",
                         exc_info=True)  # fmt: skip

    @staticmethod
    def _mark_depended_on(conn: Conn, ids: Sequence[str]) -> None:
        """Mark the stored jobs ``ids`` as depended on (before the dependents' transaction), in autocommitted
        statements that never hold a row lock while waiting for another (so no deadlock with a completion
        of several): one for every row no one holds (SKIP LOCKED), then each row still unmarked alone."""
        if not ids:
            return
        conn.execute(q.TRY_MARK_DEPENDED_ON, (list(ids),))
        for (job_id,) in conn.execute(q.UNMARKED, (list(ids),)).fetchall():
            conn.execute(q.MARK_DEPENDED_ON, (job_id,))

    @classmethod
    def _insert(cls, conn: Conn, job: JobRecord) -> str:
        """Insert one job (in the caller's transaction); returns its id, or the id of the active job holding
        its unique_key. A job with dependencies goes in waiting (or pending, or cancelled: ``settle_new``)."""
        waits: list[str] = []
        if job.depends_on:
            job, waits = SQL.settle_new(conn, job)
        if job.unique_key is not None:
            job_id = cls._insert_unique(conn, job)
        else:
            conn.execute(q.INSERT, pg_job_params(job))
            job_id = job.id
        if job_id == job.id:
            SQL.record_waits(conn, job_id, waits)
        return job_id

    @staticmethod
    def _insert_unique(conn: Conn, job: JobRecord) -> str:
        """Insert a job with a unique_key unless an active job holds the key; returns the id that holds it."""
        for _ in range(10):
            row = conn.execute(q.INSERT_UNIQUE, pg_job_params(job)).fetchone()
            if row is not None:
                return job.id
            holder = conn.execute(SQL.active_holder, (job.unique_key,)).fetchone()
            if holder is not None:
                return str(holder[0])
            # The holder finished between the two statements: try the insert again.
        raise StoreError(f"could not insert job {job.id!r}: unique_key {job.unique_key!r} kept changing hands")

    # -- workers ---------------------------------------------------------------------------------------

    def claim(self, queues: Sequence[str], limit: int, *, worker_id: str, now: float) -> list[JobRecord]:
        """See :meth:`Store.claim`: ONE ``UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING`` statement."""
        if limit <= 0 or not queues:
            return []
        names = list(dict.fromkeys(queues))  # the claim over several takes distinct names
        if self._limits and any(queue in self._limits for queue in names):
            return self._claim_limited(names, limit, worker_id, now)
        one = len(names) == 1
        params = {"worker": worker_id, "now": now, "limit": limit, "queues": names[0] if one else names}

        def op(conn: Conn) -> list[JobRecord]:
            claims = q.CLAIMS[self._with_holds]
            return claimed(conn.execute(claims[0] if one else claims[1], params, prepare=True).fetchall())

        # Idempotent enough: a claim that committed but whose answer was lost leaves its jobs
        # running for nobody; their heartbeat goes stale and they are reaped (at-least-once).
        return self._run("claiming jobs", op, idempotent=True)

    def _claim_limited(self, names: list[str], limit: int, worker_id: str, now: float) -> list[JobRecord]:
        """:meth:`claim` over queues some of which are limited: ONE transaction, each limited queue
        claimed alone under its bucket's row lock (taken in name order: no deadlock), then the others."""
        limits = self._limits

        def claim(conn: Conn, queues: list[str], count: int) -> list[JobRecord]:
            one = len(queues) == 1
            params = {"worker": worker_id, "now": now, "limit": count, "queues": queues[0] if one else queues}
            claims = q.CLAIMS[self._with_holds]
            return claimed(conn.execute(claims[0] if one else claims[1], params, prepare=True).fetchall())

        def op(conn: Conn) -> list[JobRecord]:
            jobs: list[JobRecord] = []
            with conn.transaction():
                for queue in sorted(name for name in names if name in limits):
                    if len(jobs) < limit:
                        jobs.extend(
                            SQL.claim_limited(
                                conn,
                                limits[queue],
                                limit - len(jobs),
                                now,
                                functools.partial(claim, conn, [queue]),
                                bucket_sql=q.QUEUE_BUCKET_LOCKED,
                            )
                        )
                free = [name for name in names if name not in limits]
                if free and len(jobs) < limit:
                    jobs.extend(claim(conn, free, limit - len(jobs)))
            jobs.sort(key=lambda job: (-job.priority, job.run_at))
            return jobs

        return self._run("claiming jobs", op, idempotent=True)

    def set_queue_limits(self, limits: Sequence[QueueLimits], *, now: float) -> None:
        """See :meth:`Store.set_queue_limits`: the buckets are rows of the database, shared by every worker."""

        def op(conn: Conn) -> None:
            with conn.transaction():
                SQL.register_limits(conn, limits, now)

        self._run("setting queue limits", op, idempotent=True)
        self._limits = {**self._limits, **{queue_limits.queue: queue_limits for queue_limits in limits}}

    def complete_and_claim(
        self,
        outcomes: Sequence[Completion],
        queues: Sequence[str],
        limit: int,
        *,
        worker_id: str,
        now: float,
    ) -> tuple[set[str], list[JobRecord]]:
        """See :meth:`Store.complete_and_claim`: ONE statement (one round trip, one commit) for both."""
        if not outcomes:
            return set(), self.claim(queues, limit, worker_id=worker_id, now=now)
        if limit <= 0 or not queues:
            return self.complete_many(outcomes, now=now), []
        if self._limits and any(queue in self._limits for queue in queues):
            # The completions first, committed: the limited claim then counts them finished.
            return self.complete_many(outcomes, now=now), self.claim(queues, limit, worker_id=worker_id, now=now)
        names = list(dict.fromkeys(queues))
        one = len(names) == 1
        params = outcome_params(outcomes, now)
        params.update(worker=worker_id, limit=limit, queues=names[0] if one else names)

        def op(conn: Conn) -> tuple[set[str], list[JobRecord]]:
            claims = q.CLAIMS[self._with_holds]
            query = claims[2] if one else claims[3]
            rows = conn.execute(query, params, prepare=True).fetchall()
            done = set(rows[0][0] or ()) if rows else set()
            return done, claimed([row[1:] for row in rows if row[1] is not None])

        return self._run("completing and claiming jobs", op, idempotent=True)

    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat`: one statement."""
        if not job_ids:
            return set()

        def op(conn: Conn) -> set[str]:
            rows = conn.execute(q.HEARTBEAT, (now, list(job_ids), worker_id)).fetchall()
            return {str(row[0]) for row in rows}

        return self._run("heartbeating jobs", op, idempotent=True)

    def hold_locks(self, claims: Sequence[tuple[str, int]], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.hold_locks`: one transaction, a statement per claim."""
        if not claims or not self._with_holds:
            return set()

        def op(conn: Conn) -> set[str]:
            with conn.transaction():
                return SQL.hold_claims(conn, claims, worker_id, now)

        return self._run("holding serial locks", op, idempotent=True)

    def heartbeat_holds(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat_holds`: one statement."""
        if not job_ids or not self._with_holds:
            return set()

        def op(conn: Conn) -> set[str]:
            return {str(row[0]) for row in conn.execute(q.HEARTBEAT_HOLDS, (now, list(job_ids), worker_id)).fetchall()}

        return self._run("heartbeating serial lock holds", op, idempotent=True)

    def release_holds(self, claims: Sequence[tuple[str, int]], *, worker_id: str) -> int:
        """See :meth:`Store.release_holds`: one transaction; its trigger notifies each lock's next job."""
        if not claims or not self._with_holds:
            return 0

        def op(conn: Conn) -> int:
            with conn.transaction():
                return SQL.release_claims(conn, claims, worker_id)

        return self._run("releasing serial lock holds", op, idempotent=True)

    def list_holds(self, *, lock: str | None = None) -> list[LockHold]:
        """See :meth:`Store.list_holds`."""

        def op(conn: Conn) -> list[LockHold]:
            return SQL.holds_listed(conn, lock) if self._with_holds else []

        return self._run("listing serial lock holds", op, idempotent=True)

    def reap_stale(self, *, older_than: float, now: float) -> list[str]:
        """See :meth:`Store.reap_stale`: one statement; rows another reaper holds are skipped, not waited for."""

        def op(conn: Conn) -> list[str]:
            with conn.transaction():
                if self._with_holds:
                    conn.execute(SQL.reap_holds, (older_than,))
                params = {"older": older_than, "now": now, "lost": WORKER_LOST_ERROR}
                rows = conn.execute(q.REAP[self._letter_job], params).fetchall()
                for row in rows:
                    if row[1] == "failed":
                        SQL.release_one(conn, row[0], "failed", now)
            return [str(row[0]) for row in rows]

        return self._run("recovering stale jobs", op, idempotent=True)

    def complete(
        self, job_id: str, *, worker_id: str, attempts: int, result: str | None, now: float, error: str | None = None
    ) -> bool:
        """See :meth:`Store.complete`: one statement (the completion, and its dependents' release)."""
        return bool(self.complete_many([Completion(job_id, worker_id, attempts, result, error)], now=now))

    def complete_many(self, outcomes: Sequence[Completion], *, now: float) -> set[str]:
        """See :meth:`Store.complete_many`: one statement over arrays of the outcomes."""
        if not outcomes:
            return set()
        params = outcome_params(outcomes, now)

        def op(conn: Conn) -> set[str]:
            return {str(row[0]) for row in conn.execute(q.COMPLETE_MANY, params, prepare=True).fetchall()}

        return self._run("completing jobs", op, idempotent=True)

    def retry_later(
        self, job_id: str, *, worker_id: str, attempts: int, run_at: float, error: str | None, now: float
    ) -> bool:
        """See :meth:`Store.retry_later`: one statement."""

        def op(conn: Conn) -> bool:
            return conn.execute(SQL.retry_later, (run_at, error, now, job_id, worker_id, attempts)).rowcount == 1

        return self._run("scheduling a retry", op, idempotent=True)

    def fail(
        self, job_id: str, *, worker_id: str | None, attempts: int | None, error: str | None, now: float
    ) -> DeadLetter | None:
        """See :meth:`Store.fail`: one statement marks the job failed and inserts its dead letter."""
        fenced = worker_id is not None or attempts is not None
        params = {"id": job_id, "error": error, "now": now, "letter": uuid.uuid4().hex, "worker": worker_id,
                  "attempts": attempts}  # fmt: skip

        def op(conn: Conn) -> DeadLetter | None:
            with conn.transaction():
                row = conn.execute((q.FAIL_CLAIM if fenced else q.FAIL_ANY)[self._letter_job], params).fetchone()
                if row is None:
                    if fenced:
                        return None
                    raise JobNotFoundError(f"no job with id {job_id!r}")
                SQL.release_one(conn, job_id, "failed", now)
            return letter_from_row(row)

        # A fenced fail is safe to repeat (the second finds no claim); an unfenced one would
        # push a second dead letter.
        return self._run("failing a job", op, idempotent=fenced)

    def release(self, job_ids: Sequence[str], *, worker_id: str, now: float, refund_attempt: bool = True) -> int:
        """See :meth:`Store.release`: one statement (its trigger wakes the queues concerned)."""
        if not job_ids:
            return 0

        def op(conn: Conn) -> int:
            params = (now, now, 1 if refund_attempt else 0, list(job_ids), worker_id)
            return conn.execute(q.RELEASE, params).rowcount

        return self._run("releasing jobs", op, idempotent=True)

    # -- management ------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """See :meth:`Store.get`."""

        def op(conn: Conn) -> JobRecord | None:
            row = conn.execute(SQL.get_job, (job_id,)).fetchone()
            return None if row is None else job_from_row(row)

        return self._run("reading a job", op, idempotent=True)

    def get_within(self, job_id: str, *, timeout: float) -> JobRecord | None:
        """See :meth:`Store.get_within`: under ``lock_timeout``, :meth:`get`; below it, one read in a transaction
        whose ``SET LOCAL lock_timeout`` is ``timeout`` (at least 1 ms), so a lock another session holds on
        the table ends the wait then (StoreUnavailableError)."""
        if timeout >= self._lock_timeout:
            return self.get(job_id)
        bound = sql.SQL("SET LOCAL lock_timeout TO {}").format(sql.Literal(milliseconds(timeout)))

        def op(conn: Conn) -> JobRecord | None:
            with conn.transaction():
                conn.execute(bound)
                row = conn.execute(SQL.get_job, (job_id,)).fetchone()
            return None if row is None else job_from_row(row)

        return self._run(f"reading a job within {timeout:.3g}s", op, idempotent=True)

    def list_jobs(
        self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """See :meth:`Store.list_jobs`."""
        self._check_limit(limit, offset)
        query, params = SQL.list_jobs(state, queue, limit, offset)

        def op(conn: Conn) -> list[JobRecord]:
            return [job_from_row(row) for row in conn.execute(query, params).fetchall()]

        return self._run("listing jobs", op, idempotent=True)

    def counts(self, *, queue: str | None = None) -> dict[JobState, int]:
        """See :meth:`Store.counts`."""

        def op(conn: Conn) -> dict[JobState, int]:
            if queue is None:
                return _sql.counts_from_rows(conn.execute(SQL.count_all).fetchall())
            return _sql.counts_from_rows(conn.execute(SQL.count_queue, (queue,)).fetchall())

        return self._run("counting jobs", op, idempotent=True)

    def counts_by_queue(self, queues: Sequence[str]) -> dict[str, dict[JobState, int]]:
        """See :meth:`Store.counts_by_queue`: one ``GROUP BY queue, state`` read over the asked queues."""
        names = list(queues)

        def op(conn: Conn) -> dict[str, dict[JobState, int]]:
            by_queue: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
            for queue, state, count in conn.execute(q.COUNT_QUEUES, (names,)).fetchall():
                by_queue[queue].append((state, count))
            return {name: _sql.counts_from_rows(found) for name, found in by_queue.items()}

        return self._run("counting jobs by queue", op, idempotent=True) if names else {}

    def throughput(self, *, since: float, now: float, bucket: float = 60.0) -> list[tuple[int, JobState, int]]:
        """See :meth:`Store.throughput`: one ``GROUP BY`` over the finished-jobs index."""
        query = (
            "SELECT floor((finished_at - %(since)s) / %(bucket)s)::bigint, state, count(*) FROM dispatch_jobs "
            f"WHERE state IN {_sql.FINAL} AND finished_at >= %(since)s AND finished_at < %(now)s "
            "AND state <> 'cancelled' GROUP BY 1, 2"
        )
        params = {"since": since, "now": now, "bucket": bucket}

        def op(conn: Conn) -> list[tuple[int, JobState, int]]:
            return [(int(i), JobState(state), int(n)) for i, state, n in conn.execute(query, params).fetchall()]

        return self._run("counting finished jobs", op, idempotent=True)

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
        fenced = worker_id is not None or attempts is not None
        query = q.cancel_sql(fenced=fenced, include_running=include_running)
        params = {"id": job_id, "error": error, "now": now, "worker": worker_id, "attempts": attempts}

        def op(conn: Conn) -> bool:
            with conn.transaction():
                if include_running and not fenced and self._with_holds:
                    # A running job's lock stays held while its handler may still run: its row locked
                    # first, the hold reads the state the cancel then changes.
                    conn.execute(q.LOCK_JOB, (job_id,))
                    conn.execute(SQL.hold_running, (now, job_id))
                if conn.execute(query, params).fetchone() is not None:
                    SQL.release_one(conn, job_id, "cancelled", now)
                    return True
            if conn.execute(q.JOB_EXISTS, (job_id,)).fetchone() is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            return False

        return self._run("cancelling a job", op, idempotent=False)

    def release_waiting(self, *, now: float) -> int:
        """See :meth:`Store.release_waiting`: one transaction (two updates, and the cancellations' cascade)."""

        def op(conn: Conn) -> int:
            with conn.transaction():
                return SQL.sweep_waiting(conn, now)

        return self._run("settling waiting jobs", op, idempotent=True)

    def requeue(self, job_id: str, *, now: float) -> None:
        """See :meth:`Store.requeue`: one transaction holding the job's row lock."""

        def op(conn: Conn) -> None:
            with conn.transaction():
                row = conn.execute(q.LOCK_FOR_REQUEUE, (job_id,)).fetchone()
                if row is None:
                    raise JobNotFoundError(f"no job with id {job_id!r}")
                state, unique_key = row
                SQL.check_requeue(conn, job_id, state, unique_key)
                found = conn.execute(
                    "SELECT depends_on, on_dependency_failure FROM dispatch_jobs WHERE id = %s", (job_id,)
                ).fetchone()
                depends_on, policy = found if found is not None else (None, "cancel")  # the row is locked: found
                waits = SQL.rerun_waits(conn, job_id, json.loads(depends_on), policy) if depends_on else []
                try:
                    with conn.transaction():  # a savepoint: a racing holder fails only this statement
                        conn.execute(SQL.requeue, (now, now, job_id))
                except psycopg.errors.UniqueViolation:
                    raise InvalidStateError(
                        f"job {job_id!r}: unique_key {unique_key!r} is held by another active job"
                    ) from None
                conn.execute(SQL.delete_job_letters, (job_id,))
                if waits:
                    # Its rows of dependencies still unfinished when it was cancelled go: each is written
                    # once. A dependency finishing meanwhile is the upkeep's (release_waiting), as at enqueue.
                    conn.execute("DELETE FROM dispatch_job_deps WHERE job_id = %s", (job_id,))
                    conn.execute(
                        "UPDATE dispatch_jobs SET state = 'waiting', waiting_on = %s WHERE id = %s",
                        (len(waits), job_id),
                    )
                    SQL.record_waits(conn, job_id, waits)

        self._run("requeueing a job", op, idempotent=False)

    def purge_finished(self, *, older_than: float) -> int:
        """See :meth:`Store.purge_finished`: deletes in chunks, each its own short statement."""

        def op(conn: Conn) -> int:
            return conn.execute(q.PURGE_FINISHED, (older_than,)).rowcount

        total = 0
        while True:
            deleted = self._run("purging finished jobs", op, idempotent=True)
            total += deleted
            if deleted < q.PURGE_CHUNK:
                return total


def _dependencies(jobs: Sequence[JobRecord]) -> tuple[list[str], list[str]]:
    """The ids ``jobs`` depend on: those stored before (sorted), and those among ``jobs``."""
    stored = {job.id for job in jobs}
    named = {dependency for job in jobs for dependency in job.depends_on}
    return sorted(named - stored), sorted(named & stored)


def migrate(dsn: str, *, schema: str | None = None) -> int:
    """Create or upgrade the job tables at ``dsn``; returns the schema version (``threaddispatch migrate``).

    Safe to run from several processes at once and on an up-to-date database. Blocks for
    one transaction; raises StoreUnavailableError if the server cannot be reached.
    """
    store = PostgresStore(dsn, schema=schema, min_size=0, max_size=1, migrate=False)
    try:
        return store.migrate()
    finally:
        store.close()
