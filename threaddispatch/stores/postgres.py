"""PostgresStore: the job store for many worker processes and machines on one PostgreSQL.

- psycopg 3 (extra ``postgres``). Connections are autocommit: a method that is one
  statement costs one round trip; a method that needs several runs them in one
  explicit transaction. Claiming is ONE statement,
  ``UPDATE ... WHERE seq IN (SELECT seq ... ORDER BY priority DESC, run_at, seq
  FOR UPDATE SKIP LOCKED LIMIT n) RETURNING ...``: concurrent claimers skip each other's
  rows instead of waiting, and no job is handed out twice. The engine's group commit
  (:meth:`PostgresStore.complete_and_claim`) writes the finished jobs and claims the next
  ones in that same single statement.
- Wake-ups: an ``AFTER INSERT`` statement trigger sends ``NOTIFY threaddispatch`` with the
  schema, queue and earliest ``run_at`` of the new jobs (one notification per queue per
  statement); jobs released, reaped or requeued are notified by the store. A listener
  thread per process (``threaddispatch-pg-listener``, running while an engine is
  subscribed through :meth:`PostgresStore.subscribe_wakeups`) passes them on, so an
  enqueue on one machine starts work on another within milliseconds. Engines keep
  polling as the fallback.
- Connections: a small pool per process (``min_size`` kept while idle, up to
  ``max_size``). It is not ``psycopg_pool``: that pool waits its whole timeout while its
  background threads reconnect, hiding why ("couldn't get a connection"), and its threads
  do not survive ``fork()``. This one connects on demand on the caller's thread, so a
  server that is down raises :class:`~threaddispatch.errors.StoreUnavailableError` at once,
  naming the DSN's host and port (never the password). A pooled connection is checked for
  a message from the server before reuse (one non-blocking ``poll``, no round trip): after
  a server restart the dead ones are dropped and new ones opened. A connection that
  breaks mid-call is discarded and the call is retried once on a new connection when
  that is safe (reads, and writes fenced so that running them twice changes nothing).
- Fork: connections carry the pid that opened them; a forked child starts with an empty
  pool and no listener (the huey pid guard), and never closes or uses the parent's.
- Versioned migrations (:attr:`PostgresStore.MIGRATIONS`, the same numbers as
  :attr:`SQLiteStore.MIGRATIONS`, recorded in ``dispatch_schema_version``) run on first use
  or with :func:`migrate` (``threaddispatch migrate --store URL``), in one transaction under
  ``pg_advisory_xact_lock``: safe from many processes at once.

Needs PostgreSQL >= 13 (``gen_random_uuid()``, transition tables).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import select
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
except ImportError as _error:  # pragma: no cover - exercised only without the extra
    raise ImportError("PostgresStore needs psycopg 3: pip install 'threaddispatch[postgres]'") from _error

from threaddispatch import _lifecycle
from threaddispatch.backoff import ExponentialJitter, check_seconds
from threaddispatch.errors import (
    ConfigurationError,
    InvalidStateError,
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

__all__ = ["PostgresStore", "migrate"]

R = TypeVar("R")
_Conn = psycopg.Connection[tuple[Any, ...]]
WakeupCallback = Callable[[str | None, float | None], None]

_log = logging.getLogger("threaddispatch.stores.postgres")

#: The NOTIFY channel; payloads are JSON ``{"schema", "queue", "run_at"}``.
CHANNEL = "threaddispatch"

_COPY_MIN = 16  # from this many plain jobs, enqueue uses COPY rather than a pipelined executemany
_PURGE_CHUNK = 1000
# SQLSTATEs that mean the server ended the session before running what we sent
# (admin_shutdown, crash_shutdown, cannot_connect_now): retrying cannot run it twice.
_NOT_EXECUTED = frozenset({"57P01", "57P02", "57P03"})

_SCHEMA_V1 = (
    """CREATE TABLE IF NOT EXISTS dispatch_jobs (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        payload TEXT NOT NULL,
        queue TEXT NOT NULL,
        state TEXT NOT NULL,
        priority BIGINT NOT NULL DEFAULT 0,
        attempts BIGINT NOT NULL DEFAULT 0,
        max_retries BIGINT NOT NULL,
        timeout DOUBLE PRECISION,
        run_at DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        heartbeat_at DOUBLE PRECISION,
        worker_id TEXT,
        unique_key TEXT,
        result TEXT,
        error TEXT)""",
    # The claim index: ready jobs of a queue in claim order.
    """CREATE INDEX IF NOT EXISTS dispatch_jobs_ready ON dispatch_jobs (queue, priority DESC, run_at, seq)
        WHERE state IN ('pending', 'retrying')""",
    "CREATE INDEX IF NOT EXISTS dispatch_jobs_running ON dispatch_jobs (heartbeat_at) WHERE state = 'running'",
    f"CREATE INDEX IF NOT EXISTS dispatch_jobs_finished ON dispatch_jobs (finished_at) WHERE state IN {_sql.FINAL}",
    f"""CREATE UNIQUE INDEX IF NOT EXISTS dispatch_jobs_unique ON dispatch_jobs (unique_key)
        WHERE unique_key IS NOT NULL AND state IN {_sql.ACTIVE}""",
    """CREATE TABLE IF NOT EXISTS dispatch_dead_letters (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        name TEXT NOT NULL,
        queue TEXT NOT NULL,
        payload TEXT NOT NULL,
        priority BIGINT NOT NULL,
        max_retries BIGINT NOT NULL,
        attempts BIGINT NOT NULL,
        error TEXT,
        failed_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS dispatch_dead_letters_job ON dispatch_dead_letters (job_id)",
    """CREATE TABLE IF NOT EXISTS dispatch_crons (
        name TEXT PRIMARY KEY,
        expression TEXT NOT NULL,
        job_name TEXT NOT NULL,
        payload TEXT NOT NULL,
        queue TEXT NOT NULL,
        priority BIGINT NOT NULL,
        last_tick DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dispatch_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dispatch_queues (
        queue TEXT PRIMARY KEY,
        paused BOOLEAN NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    # Wake-ups: one NOTIFY per queue per inserting statement (enqueue, COPY, cron, replay).
    f"""CREATE OR REPLACE FUNCTION dispatch_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', json_build_object(
                'schema', TG_TABLE_SCHEMA, 'queue', queue, 'run_at', min_run_at)::text)
            FROM (SELECT queue, min(run_at) AS min_run_at FROM dispatch_new_jobs GROUP BY queue) AS queues;
            RETURN NULL;
        END $$""",
    "DROP TRIGGER IF EXISTS dispatch_jobs_notify ON dispatch_jobs",
    """CREATE TRIGGER dispatch_jobs_notify AFTER INSERT ON dispatch_jobs
        REFERENCING NEW TABLE AS dispatch_new_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION dispatch_jobs_notify()""",
)

# -- SQL -------------------------------------------------------------------------------------------

_SQL = Statements("%s")
_INSERT = _SQL.insert_job
_INSERT_UNIQUE = (
    f"{_INSERT} ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN {_sql.ACTIVE} "
    "DO NOTHING RETURNING id"
)
_COPY = f"COPY dispatch_jobs ({_sql.JOB_COLUMNS}) FROM STDIN"
_ACQUIRE_LEASE = f"{_SQL.acquire_lease} RETURNING holder"
_UPSERT_CRON = f"{_SQL.upsert_cron} RETURNING {_sql.CRON_COLUMNS}"


def _claim_cte(queue_match: str) -> str:
    """The claim, as an UPDATE usable alone or inside WITH. Named parameters: worker, now, queues, limit."""
    return (
        "UPDATE dispatch_jobs SET state = 'running', worker_id = %(worker)s, attempts = attempts + 1, "
        "started_at = %(now)s, heartbeat_at = %(now)s, updated_at = %(now)s "
        "WHERE seq IN (SELECT seq FROM dispatch_jobs WHERE state IN ('pending', 'retrying') "
        f"AND {queue_match} AND run_at <= %(now)s "
        "ORDER BY priority DESC, run_at, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
        f"RETURNING seq, {_sql.JOB_COLUMNS}"
    )


# One queue: an equality, so the ready index yields rows in claim order (no sort), also in
# a generic prepared plan. Several: = ANY(array).
_CLAIM_ONE = _claim_cte("queue = %(queues)s")
_CLAIM_ANY = _claim_cte("queue = ANY(%(queues)s)")

_COMPLETE = _SQL.complete
_COMPLETE_MANY_CTE = (
    "UPDATE dispatch_jobs AS j SET state = 'completed', result = v.result, error = v.error, "
    "finished_at = %(now)s, updated_at = %(now)s "
    "FROM unnest(%(ids)s::text[], %(workers)s::text[], %(attempts)s::bigint[], %(results)s::text[], "
    "%(errors)s::text[]) AS v(id, worker_id, attempts, result, error) "
    "WHERE j.id = v.id AND j.state = 'running' AND j.worker_id = v.worker_id AND j.attempts = v.attempts "
    "RETURNING j.id"
)


def _complete_and_claim_sql(claim: str) -> str:
    # Both UPDATEs see one snapshot and touch disjoint rows (running vs ready); the LEFT JOIN
    # keeps the completed ids when nothing was claimed.
    return (
        f"WITH done AS ({_COMPLETE_MANY_CTE}), claimed AS ({claim}) "
        "SELECT d.ids, c.* FROM (SELECT array_agg(id) AS ids FROM done) AS d LEFT JOIN claimed AS c ON true"
    )


_COMPLETE_AND_CLAIM_ONE = _complete_and_claim_sql(_CLAIM_ONE)
_COMPLETE_AND_CLAIM_ANY = _complete_and_claim_sql(_CLAIM_ANY)

_REAP = f"""
WITH stale AS (
    SELECT seq FROM dispatch_jobs
    WHERE state = 'running' AND (heartbeat_at IS NULL OR heartbeat_at < %(older)s)
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE dispatch_jobs AS j SET
        state = CASE WHEN j.attempts >= j.max_retries + 1 THEN 'failed' ELSE 'pending' END,
        error = CASE WHEN j.attempts >= j.max_retries + 1 THEN %(lost)s ELSE j.error END,
        finished_at = CASE WHEN j.attempts >= j.max_retries + 1 THEN %(now)s ELSE j.finished_at END,
        worker_id = CASE WHEN j.attempts >= j.max_retries + 1 THEN j.worker_id ELSE NULL END,
        run_at = CASE WHEN j.attempts >= j.max_retries + 1 THEN j.run_at ELSE %(now)s END,
        updated_at = %(now)s
    FROM stale WHERE j.seq = stale.seq
    RETURNING j.id, j.name, j.queue, j.payload, j.priority, j.max_retries, j.attempts, j.state
), letters AS (
    INSERT INTO dispatch_dead_letters ({_sql.LETTER_COLUMNS})
    SELECT replace(gen_random_uuid()::text, '-', ''), id, name, queue, payload, priority, max_retries, attempts,
           %(lost)s, %(now)s
    FROM moved WHERE state = 'failed'
)
SELECT id, queue, state FROM moved
"""

_FAIL = f"""
WITH failed AS (
    UPDATE dispatch_jobs SET state = 'failed', error = %(error)s, finished_at = %(now)s, updated_at = %(now)s
    WHERE id = %(id)s {{fence}}
    RETURNING id, name, queue, payload, priority, max_retries, attempts
)
INSERT INTO dispatch_dead_letters ({_sql.LETTER_COLUMNS})
SELECT %(letter)s, id, name, queue, payload, priority, max_retries, attempts, %(error)s, %(now)s FROM failed
RETURNING {_sql.LETTER_COLUMNS}
"""
_CLAIM_FENCE = (
    "AND state = 'running' AND (%(worker)s::text IS NULL OR worker_id = %(worker)s) "
    "AND (%(attempts)s::bigint IS NULL OR attempts = %(attempts)s)"
)
_FAIL_ANY = _FAIL.format(fence="")
_FAIL_CLAIM = _FAIL.format(fence=_CLAIM_FENCE)

_WAKE = (
    f"SELECT pg_notify('{CHANNEL}', json_build_object('schema', %s::text, 'queue', q, 'run_at', %s::float8)::text) "
    "FROM unnest(%s::text[]) AS q"
)


def _job_params(job: JobRecord) -> tuple[Any, ...]:
    """:func:`~threaddispatch.stores._sql.job_params`; this store also takes a ``state`` given as its str value."""
    if type(job.state) is not JobState:
        job = dataclasses.replace(job, state=JobState(job.state))
    return job_params(job)


def _claimed(rows: Sequence[Sequence[Any]]) -> list[JobRecord]:
    """Claimed rows ``(seq, *job columns)`` as records in claim order (RETURNING has no order)."""
    ordered = sorted(rows, key=lambda row: (-row[6], row[10], row[0]))  # priority, run_at, seq
    return [job_from_row(row[1:]) for row in ordered]


def _broken(conn: _Conn) -> bool:
    return bool(conn.closed or conn.broken)


def _has_input(conn: _Conn) -> bool:
    """Whether the server sent anything to this idle connection (a termination notice, EOF): dead.

    An idle autocommit connection that does not LISTEN receives nothing, so readable means
    the server ended the session (shutdown, restart, idle timeout). One non-blocking poll.
    """
    try:
        fd = conn.fileno()
    except psycopg.Error:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)  # pragma: no cover - platforms without poll()
    return bool(readable)


def _close_quietly(conn: _Conn) -> None:
    with contextlib.suppress(Exception):  # closing a dead connection is best effort
        conn.close()


class _Dsn:
    """A DSN split into what we connect with and what we may show (never the password)."""

    def __init__(self, dsn: str) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigurationError("PostgresStore needs a DSN, e.g. 'postgresql://user@host:5432/dbname'")
        conninfo, schema = self._take_schema(dsn)
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error:
            # libpq's parse errors can quote the DSN (and its password): never repeat them.
            raise ConfigurationError(
                "invalid PostgreSQL DSN (not shown: it may hold a password); expected "
                "'postgresql://user:password@host:port/dbname' or 'host=... dbname=...'"
            ) from None
        self.conninfo = conninfo
        self.schema = schema
        self.params = params
        self.host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "localhost")
        self.port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
        self.dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or "")
        secrets = {str(params.get("password") or ""), os.environ.get("PGPASSWORD", "")}
        secrets |= {urlsplit(dsn).password or ""} if "://" in dsn else set()
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)

    @staticmethod
    def _take_schema(dsn: str) -> tuple[str, str | None]:
        """Strip our own ``schema=`` query parameter from a URL DSN (libpq does not know it)."""
        if "://" not in dsn:
            return dsn, None
        parts = urlsplit(dsn)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [value for key, value in pairs if key == "schema"]
        if not schemas:
            return dsn, None
        rest = [(key, value) for key, value in pairs if key != "schema"]
        return urlunsplit(parts._replace(query=urlencode(rest))), schemas[-1]

    def scrub(self, text: str) -> str:
        """``text`` with every password occurrence masked."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    @property
    def where(self) -> str:
        """``host:port/dbname`` for messages (no user, no password)."""
        return f"{self.host}:{self.port}/{self.dbname}" if self.dbname else f"{self.host}:{self.port}"


class _Listener:
    """One LISTEN connection and its thread, passing NOTIFYs on to the store's subscribers.

    Stops when asked (:meth:`stop`, from any thread: a byte on a socket pair wakes its
    select) or when no subscriber is left. Reconnects with backoff when the connection is
    lost and then tells every subscriber to look (``(None, None)``): notifications may have
    been missed meanwhile.
    """

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._stopping = False
        self._schema: str | None = None
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self.thread = threading.Thread(target=self._run, name="threaddispatch-pg-listener", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to leave (non-blocking, idempotent)."""
        self._stopping = True
        with contextlib.suppress(OSError):  # full (already woken) or closed (already gone)
            self._writer.send(b"x")

    def _should_stop(self) -> bool:
        return self._stopping or not self.store._has_subscribers(self)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._reader, selectors.EVENT_READ)
        conn: _Conn | None = None
        fd = -1  # conn's socket, as registered (a lost connection no longer tells it)
        failures = 0
        backoff = ExponentialJitter(initial=0.05, max=self.store.reconnect_max)
        try:
            while not self._should_stop():
                if conn is None:
                    try:
                        conn = self._connect()
                    except Exception as error:  # noqa: BLE001 - keep trying until the server is back or we stop
                        failures += 1
                        delay = backoff(failures)
                        _log.warning("PostgresStore listener: cannot connect (%s); retrying in %.2gs",
                                     self.store._dsn.scrub(str(error)), delay)  # fmt: skip
                        self._sleep(selector, delay)
                        continue
                    fd = conn.fileno()
                    selector.register(fd, selectors.EVENT_READ)
                    if failures:
                        _log.info("PostgresStore listener: reconnected to %s", self.store._dsn.where)
                    failures = 0
                    self.store._wake_subscribers([(None, None)])  # anything may have arrived meanwhile
                events = selector.select(self.store.listen_keepalive)
                try:
                    if any(key.fileobj is self._reader for key, _ in events):
                        self._drain_wakeups()
                        continue
                    if not events:
                        conn.execute("SELECT 1")  # keepalive: find a dead server even when nothing happens
                    self._deliver(conn)
                except psycopg.Error as error:
                    _log.warning("PostgresStore listener: connection lost (%s); reconnecting",
                                 self.store._dsn.scrub(str(error)))  # fmt: skip
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        selector.unregister(fd)
                    _close_quietly(conn)
                    conn = None
                    failures = 1
                    self._sleep(selector, backoff(1))
        finally:
            if conn is not None:
                _close_quietly(conn)
            selector.close()
            self._reader.close()
            self._writer.close()
            self.store._listener_exited(self)

    def _connect(self) -> _Conn:
        conn = self.store._connect()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            _close_quietly(conn)
            raise
        return conn

    def _sleep(self, selector: selectors.BaseSelector, delay: float) -> None:
        """Wait ``delay`` seconds, or less if stop() is called."""
        deadline = time.monotonic() + delay
        while not self._should_stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for key, _ in selector.select(remaining):
                if key.fileobj is self._reader:
                    self._drain_wakeups()

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._reader.recv(512):
                pass

    def _deliver(self, conn: _Conn) -> None:
        if self._schema is None:
            # Our tables' schema, to ignore other schemas' jobs in the same database. Until the
            # tables exist (first use migrates them) every notification counts: a spare wake-up.
            self._schema = self.store.schema or self.store._table_schema(conn)
        schema = self._schema
        due: dict[str | None, float | None] = {}
        for note in conn.notifies(timeout=0):
            try:
                data = json.loads(note.payload)
                queue = data["queue"]
                run_at = data.get("run_at")
                if schema is not None and data.get("schema") != schema:
                    continue  # another schema's jobs, same database
            except (ValueError, KeyError, TypeError):
                queue, run_at = None, None
            if queue not in due or run_at is None:
                due[queue] = run_at
            else:
                earlier = due[queue]
                due[queue] = None if earlier is None else min(earlier, float(run_at))
        if due:
            self.store._wake_subscribers(list(due.items()))


class PostgresStore(Store):
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
    first use.

    Construction parses the DSN (ConfigurationError if invalid, never quoting it) and
    does no I/O. Thread-safe and multi-process-safe. Each method blocks for one short
    transaction, plus up to ``connect_timeout`` to connect or ``pool_timeout`` to get a
    connection; a server that cannot be reached raises StoreUnavailableError naming its
    host and port.
    """

    #: Numbered schema migrations ``(version, description, statements)``, as SQLiteStore's.
    MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = ((1, "initial schema", _SCHEMA_V1),)

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
        migrate: bool = True,
    ) -> None:
        self._dsn = _Dsn(dsn)
        schema = schema if schema is not None else self._dsn.schema
        if schema is not None and (not isinstance(schema, str) or not schema or len(schema.encode()) > 63):
            raise ConfigurationError(f"schema must be a PostgreSQL identifier of 1-63 bytes, got {schema!r}")
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "min_size" else 1):
                raise ConfigurationError(f"{name} must be an int >= {0 if name == 'min_size' else 1}, got {value!r}")
        if min_size > max_size:
            raise ConfigurationError(f"min_size ({min_size}) must be <= max_size ({max_size})")
        if synchronous_commit is not None and synchronous_commit not in ("on", "off", "local", "remote_write",
                                                                         "remote_apply"):  # fmt: skip
            raise ConfigurationError(
                f"synchronous_commit must be on, off, local, remote_write or remote_apply, got {synchronous_commit!r}"
            )
        self.schema = schema
        self.min_size = min_size
        self.max_size = max_size
        self.max_idle = check_seconds("max_idle", max_idle)
        self.pool_timeout = check_seconds("pool_timeout", pool_timeout)
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout, allow_zero=False)
        self.listen_keepalive = check_seconds("listen_keepalive", listen_keepalive, allow_zero=False)
        self.reconnect_max = check_seconds("reconnect_max", reconnect_max, allow_zero=False)
        self.synchronous_commit = synchronous_commit
        self._session_sql = self._session_setup()
        self._connect_kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self._dsn.params:
            self._connect_kwargs["connect_timeout"] = max(1, math.ceil(self.connect_timeout))
        if "application_name" not in self._dsn.params:
            self._connect_kwargs["fallback_application_name"] = "threaddispatch"
        self._closed = False
        self._migrated = not migrate
        self._schema_name: str | None = None
        self._init_process_state()
        _lifecycle.register(self)

    def _session_setup(self) -> sql.Composed | None:
        statements: list[sql.Composable] = []
        if self.schema is not None:
            statements.append(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        if self.synchronous_commit is not None:
            statements.append(sql.SQL("SET synchronous_commit TO {}").format(sql.Identifier(self.synchronous_commit)))
        return sql.SQL("; ").join(statements) if statements else None

    def _init_process_state(self) -> None:
        # _lock guards the pool fields and the subscription fields below; _available is a
        # condition on it (a connection came back or a slot freed). Connect, close and
        # queries never run with it held. Invariant: _size = len(_idle) + connections
        # checked out of this generation; _size <= max_size.
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self._pid = os.getpid()
        self._generation = getattr(self, "_generation", 0) + 1
        self._idle: list[tuple[_Conn, float]] = []  # (connection, idle since), most recent last
        self._size = 0
        self._migrate_lock = threading.Lock()
        self._subscribers: dict[int, WakeupCallback] = {}
        self._next_token = 0
        self._listener: _Listener | None = None

    # -- connections -------------------------------------------------------------------------------

    def _unavailable(self, what: str, error: BaseException) -> StoreUnavailableError:
        text = self._dsn.scrub(str(error).strip()) or type(error).__name__
        return StoreUnavailableError(
            f"PostgreSQL store at {self._dsn.host}:{self._dsn.port} is unavailable ({what}): {text}"
        )

    def _failed(self, what: str, error: BaseException) -> StoreError:
        text = self._dsn.scrub(str(error).strip()) or type(error).__name__
        return StoreError(f"PostgreSQL store at {self._dsn.host}:{self._dsn.port}: {what} failed: {text}")

    def _raise(self, new: StoreError, error: BaseException) -> NoReturn:
        """Raise ``new`` from ``error``, unless ``error``'s text would show a password (then from None)."""
        if self._dsn.scrub(str(error)) == str(error):
            raise new from error
        raise new from None

    def _connect(self) -> _Conn:
        """A new autocommit connection with the session settings; StoreUnavailableError if it fails."""
        try:
            conn: _Conn = psycopg.connect(self._dsn.conninfo, **self._connect_kwargs)
        except psycopg.Error as error:
            self._raise(self._unavailable("connecting", error), error)
        if self._session_sql is not None:
            try:
                conn.execute(self._session_sql)
            except psycopg.Error as error:
                _close_quietly(conn)
                self._raise(self._unavailable("setting up the session", error), error)
        return conn

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            # Forked without the lifecycle hook having run: never touch the parent's connections.
            self._reset_after_fork()

    def _acquire(self) -> tuple[_Conn, int]:
        """A connection for this thread's call and the pool generation it belongs to."""
        self._check_pid()
        deadline = time.monotonic() + self.pool_timeout
        dead: list[_Conn] = []
        try:
            with self._lock:
                while True:
                    if self._closed:
                        raise StoreError(f"PostgresStore {self._dsn.where} is closed")
                    while self._idle:
                        conn, _since = self._idle.pop()
                        if _broken(conn) or _has_input(conn):
                            dead.append(conn)
                            self._size -= 1
                            continue
                        self._prune_idle(dead)
                        return conn, self._generation
                    if self._size < self.max_size:
                        self._size += 1
                        generation = self._generation
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreUnavailableError(
                            f"PostgreSQL store at {self._dsn.host}:{self._dsn.port}: all {self.max_size} pooled "
                            f"connections stayed busy for {self.pool_timeout}s (raise max_size?)"
                        )
                    self._available.wait(remaining)
        finally:
            for conn in dead:
                _close_quietly(conn)
        try:
            return self._connect(), generation
        except BaseException:
            with self._lock:
                if generation == self._generation:
                    self._size -= 1
                    self._available.notify()
            raise

    def _prune_idle(self, dead: list[_Conn]) -> None:
        """Close (via ``dead``) the oldest idle connections past ``max_idle``, keeping ``min_size``. Lock held."""
        now = time.monotonic()
        while self._idle and self._size > self.min_size and now - self._idle[0][1] > self.max_idle:
            dead.append(self._idle.pop(0)[0])
            self._size -= 1

    def _release(self, conn: _Conn, generation: int, *, discard: bool) -> None:
        if not discard and not _broken(conn):
            status = conn.info.transaction_status
            if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                try:
                    conn.rollback()
                except psycopg.Error:
                    discard = True
            elif status != TransactionStatus.IDLE:
                discard = True  # interrupted mid-query: its state is unknown
        with self._lock:
            if generation != self._generation:
                return  # the parent's, in a forked child: neither reuse nor close it
            if discard or _broken(conn) or self._closed:
                self._size -= 1
                self._available.notify()
            else:
                self._idle.append((conn, time.monotonic()))
                self._available.notify()
                return
        _close_quietly(conn)

    def _run(self, what: str, op: Callable[[_Conn], R], *, idempotent: bool, setup: bool = True) -> R:
        """Run ``op(connection)`` and translate errors; retry once on a new connection if that is safe.

        A connection that breaks while ``op`` runs is discarded. The call is retried when
        ``idempotent`` (running it twice changes nothing more than once) or when the server
        said it never ran it (shutting down); otherwise StoreUnavailableError.
        """
        if setup and not self._migrated:
            self.migrate()
        for attempt in (1, 2):
            conn, generation = self._acquire()
            discard = False
            try:
                return op(conn)
            except psycopg.OperationalError as error:
                discard = _broken(conn)
                if discard and attempt == 1 and (idempotent or error.sqlstate in _NOT_EXECUTED):
                    _log.info("PostgresStore: connection lost during %s (%s); retrying on a new connection",
                              what, self._dsn.scrub(str(error).strip()))  # fmt: skip
                    continue
                self._raise(self._unavailable(what, error), error)
            except psycopg.Error as error:
                discard = _broken(conn)
                self._raise(self._failed(what, error), error)
            except BaseException:
                discard = _broken(conn)
                raise
            finally:
                self._release(conn, generation, discard=discard)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- lifecycle ------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema; returns its version. Idempotent; safe from many processes at once.

        One transaction under ``pg_advisory_xact_lock``, so concurrent callers wait for the
        first and then find nothing to do. Blocks for that transaction.
        """

        def op(conn: _Conn) -> int:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('threaddispatch.migrate'))")
                if self.schema is not None:
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS dispatch_schema_version ("
                    "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
                )
                return _SQL.apply_migrations(conn, self.MIGRATIONS)

        with self._migrate_lock:
            version = self._run("migrating the schema", op, idempotent=True, setup=False)
            self._migrated = True
        return version

    def schema_version(self) -> int:
        """The schema version in the database (0 before :meth:`migrate`). One read."""

        def op(conn: _Conn) -> int:
            if conn.execute("SELECT to_regclass('dispatch_schema_version')").fetchone() == (None,):
                return 0
            row = conn.execute(_SQL.schema_version).fetchone()
            return int(row[0]) if row else 0

        return self._run("reading the schema version", op, idempotent=True, setup=False)

    def close(self) -> None:
        """Close this process's connections and stop its listener. Idempotent; later use raises StoreError.

        Connections in use are closed when their call returns. Non-blocking apart from
        closing sockets. Call it after the engines using the store have stopped.
        """
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._size -= len(idle)
            listener, self._listener = self._listener, None
            self._subscribers.clear()
            same_process = os.getpid() == self._pid
            self._available.notify_all()
        if listener is not None:
            listener.stop()
        if same_process:
            for conn, _since in idle:
                _close_quietly(conn)
        _lifecycle.unregister(self)

    def _reset_after_fork(self) -> None:
        # The child abandons (never closes) the parent's connections: closing one would end
        # the parent's session on the shared socket. psycopg also only closes a connection
        # in the process that opened it. The listener thread does not exist in the child.
        self._init_process_state()

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
        return f"<PostgresStore {self._dsn.where}{schema}{' closed' if self._closed else ''}>"

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
        with self._lock:
            if self._closed:
                raise StoreError(f"PostgresStore {self._dsn.where} is closed")
            token = self._next_token
            self._next_token += 1
            self._subscribers[token] = callback
            generation = self._generation
            listener = None
            if self._listener is None:
                listener = self._listener = _Listener(self)
        if listener is not None:
            listener.start()

        def unsubscribe() -> None:
            with self._lock:
                if generation != self._generation:
                    return
                self._subscribers.pop(token, None)
                stop = self._listener if not self._subscribers else None
                if stop is not None:
                    self._listener = None
            if stop is not None:
                stop.stop()

        return unsubscribe

    def _has_subscribers(self, listener: _Listener) -> bool:
        with self._lock:
            return self._listener is listener and bool(self._subscribers)

    def _listener_exited(self, listener: _Listener) -> None:
        with self._lock:
            if self._listener is listener:
                self._listener = None

    def _wake_subscribers(self, due: Sequence[tuple[str | None, float | None]]) -> None:
        with self._lock:
            callbacks = list(self._subscribers.values())
        for callback in callbacks:  # no lock held: callbacks take their own
            for queue, run_at in due:
                try:
                    callback(queue, run_at)
                except Exception:  # noqa: BLE001 - one broken subscriber must not stop the others
                    _log.exception("PostgresStore: wake-up callback %r failed", callback)

    def _table_schema(self, conn: _Conn) -> str | None:
        """The schema holding ``dispatch_jobs`` as this connection resolves it (None before migrating)."""
        row = conn.execute(
            "SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass('dispatch_jobs')"
        ).fetchone()
        return None if row is None else str(row[0])

    def _wake(self, conn: _Conn, queues: Sequence[str], run_at: float) -> None:
        """NOTIFY listeners that jobs of ``queues`` are ready from ``run_at`` (after a release, reap, requeue)."""
        if not queues:
            return
        if self._schema_name is None:
            self._schema_name = self._table_schema(conn)
        conn.execute(_WAKE, (self._schema_name, run_at, sorted(set(queues))))

    # -- producers -------------------------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[str]:
        """See :meth:`Store.enqueue`. One transaction: COPY for many plain jobs, ON CONFLICT for unique keys."""
        if not jobs:
            return []
        jobs = list(jobs)

        def op(conn: _Conn) -> list[str]:
            if len(jobs) == 1 and jobs[0].unique_key is None:
                conn.execute(_INSERT, _job_params(jobs[0]))  # one statement: its own transaction
                return [jobs[0].id]
            with conn.transaction():
                plain = [job for job in jobs if job.unique_key is None]
                with conn.cursor() as cursor:
                    if len(plain) >= _COPY_MIN:
                        with cursor.copy(_COPY) as copy:
                            for job in plain:
                                copy.write_row(_job_params(job))
                    elif plain:
                        cursor.executemany(_INSERT, [_job_params(job) for job in plain])
                if len(plain) == len(jobs):
                    return [job.id for job in jobs]
                return [job.id if job.unique_key is None else self._insert_unique(conn, job) for job in jobs]

        try:
            return self._run("enqueueing jobs", op, idempotent=False)
        except StoreError as error:
            if isinstance(error.__cause__, psycopg.errors.UniqueViolation):
                raise StoreError(f"could not insert jobs: a job id already exists ({error})") from error.__cause__
            raise

    @classmethod
    def _insert(cls, conn: _Conn, job: JobRecord) -> str:
        """Insert one job; returns its id, or the id of the active job holding its unique_key."""
        if job.unique_key is not None:
            return cls._insert_unique(conn, job)
        conn.execute(_INSERT, _job_params(job))
        return job.id

    @staticmethod
    def _insert_unique(conn: _Conn, job: JobRecord) -> str:
        """Insert a job with a unique_key unless an active job holds the key; returns the id that holds it."""
        for _ in range(10):
            row = conn.execute(_INSERT_UNIQUE, _job_params(job)).fetchone()
            if row is not None:
                return job.id
            holder = conn.execute(_SQL.active_holder, (job.unique_key,)).fetchone()
            if holder is not None:
                return str(holder[0])
            # The holder finished between the two statements: try the insert again.
        raise StoreError(f"could not insert job {job.id!r}: unique_key {job.unique_key!r} kept changing hands")

    # -- workers ---------------------------------------------------------------------------------------

    def claim(self, queues: Sequence[str], limit: int, *, worker_id: str, now: float) -> list[JobRecord]:
        """See :meth:`Store.claim`: ONE ``UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING`` statement."""
        if limit <= 0 or not queues:
            return []
        one = len(set(queues)) == 1
        params = {"worker": worker_id, "now": now, "limit": limit, "queues": queues[0] if one else list(queues)}

        def op(conn: _Conn) -> list[JobRecord]:
            return _claimed(conn.execute(_CLAIM_ONE if one else _CLAIM_ANY, params).fetchall())

        # Idempotent enough: a claim that committed but whose answer was lost leaves its jobs
        # running for nobody; their heartbeat goes stale and they are reaped (at-least-once).
        return self._run("claiming jobs", op, idempotent=True)

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
        one = len(set(queues)) == 1
        params = self._outcome_params(outcomes, now)
        params.update(worker=worker_id, limit=limit, queues=queues[0] if one else list(queues))

        def op(conn: _Conn) -> tuple[set[str], list[JobRecord]]:
            rows = conn.execute(_COMPLETE_AND_CLAIM_ONE if one else _COMPLETE_AND_CLAIM_ANY, params).fetchall()
            done = set(rows[0][0] or ()) if rows else set()
            return done, _claimed([row[1:] for row in rows if row[1] is not None])

        return self._run("completing and claiming jobs", op, idempotent=True)

    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat`: one statement."""
        if not job_ids:
            return set()

        def op(conn: _Conn) -> set[str]:
            rows = conn.execute(
                "UPDATE dispatch_jobs SET heartbeat_at = %s WHERE id = ANY(%s) AND state = 'running' "
                "AND worker_id = %s RETURNING id",
                (now, list(job_ids), worker_id),
            ).fetchall()
            return {str(row[0]) for row in rows}

        return self._run("heartbeating jobs", op, idempotent=True)

    def reap_stale(self, *, older_than: float, now: float) -> list[str]:
        """See :meth:`Store.reap_stale`: one statement; rows another reaper holds are skipped, not waited for."""

        def op(conn: _Conn) -> list[str]:
            rows = conn.execute(_REAP, {"older": older_than, "now": now, "lost": WORKER_LOST_ERROR}).fetchall()
            self._wake(conn, [row[1] for row in rows if row[2] == "pending"], now)
            return [str(row[0]) for row in rows]

        return self._run("recovering stale jobs", op, idempotent=True)

    def complete(
        self, job_id: str, *, worker_id: str, attempts: int, result: str | None, now: float, error: str | None = None
    ) -> bool:
        """See :meth:`Store.complete`: one statement."""

        def op(conn: _Conn) -> bool:
            return conn.execute(_COMPLETE, (result, error, now, now, job_id, worker_id, attempts)).rowcount == 1

        return self._run("completing a job", op, idempotent=True)

    @staticmethod
    def _outcome_params(outcomes: Sequence[Completion], now: float) -> dict[str, Any]:
        return {
            "now": now,
            "ids": [o[0] for o in outcomes],
            "workers": [o[1] for o in outcomes],
            "attempts": [o[2] for o in outcomes],
            "results": [o[3] for o in outcomes],
            "errors": [o[4] for o in outcomes],
        }

    def complete_many(self, outcomes: Sequence[Completion], *, now: float) -> set[str]:
        """See :meth:`Store.complete_many`: one statement over arrays of the outcomes."""
        if not outcomes:
            return set()
        params = self._outcome_params(outcomes, now)

        def op(conn: _Conn) -> set[str]:
            return {str(row[0]) for row in conn.execute(_COMPLETE_MANY_CTE, params).fetchall()}

        return self._run("completing jobs", op, idempotent=True)

    def retry_later(
        self, job_id: str, *, worker_id: str, attempts: int, run_at: float, error: str | None, now: float
    ) -> bool:
        """See :meth:`Store.retry_later`: one statement."""

        def op(conn: _Conn) -> bool:
            return conn.execute(_SQL.retry_later, (run_at, error, now, job_id, worker_id, attempts)).rowcount == 1

        return self._run("scheduling a retry", op, idempotent=True)

    def fail(
        self, job_id: str, *, worker_id: str | None, attempts: int | None, error: str | None, now: float
    ) -> DeadLetter | None:
        """See :meth:`Store.fail`: one statement marks the job failed and inserts its dead letter."""
        fenced = worker_id is not None or attempts is not None
        params = {"id": job_id, "error": error, "now": now, "letter": uuid.uuid4().hex, "worker": worker_id,
                  "attempts": attempts}  # fmt: skip

        def op(conn: _Conn) -> DeadLetter | None:
            row = conn.execute(_FAIL_CLAIM if fenced else _FAIL_ANY, params).fetchone()
            if row is None:
                if fenced:
                    return None
                raise JobNotFoundError(f"no job with id {job_id!r}")
            return letter_from_row(row)

        # A fenced fail is safe to repeat (the second finds no claim); an unfenced one would
        # push a second dead letter.
        return self._run("failing a job", op, idempotent=fenced)

    def release(self, job_ids: Sequence[str], *, worker_id: str, now: float, refund_attempt: bool = True) -> int:
        """See :meth:`Store.release`: one statement, then a wake-up for the queues concerned."""
        if not job_ids:
            return 0

        def op(conn: _Conn) -> int:
            rows = conn.execute(
                "UPDATE dispatch_jobs SET state = 'pending', worker_id = NULL, run_at = %s, updated_at = %s, "
                "attempts = greatest(0, attempts - %s) WHERE id = ANY(%s) AND state = 'running' AND worker_id = %s "
                "RETURNING queue",
                (now, now, 1 if refund_attempt else 0, list(job_ids), worker_id),
            ).fetchall()
            self._wake(conn, [row[0] for row in rows], now)
            return len(rows)

        return self._run("releasing jobs", op, idempotent=True)

    # -- management ------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """See :meth:`Store.get`."""

        def op(conn: _Conn) -> JobRecord | None:
            row = conn.execute(_SQL.get_job, (job_id,)).fetchone()
            return None if row is None else job_from_row(row)

        return self._run("reading a job", op, idempotent=True)

    def list_jobs(
        self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """See :meth:`Store.list_jobs`."""
        self._check_limit(limit, offset)
        query, params = _SQL.list_jobs(state, queue, limit, offset)

        def op(conn: _Conn) -> list[JobRecord]:
            return [job_from_row(row) for row in conn.execute(query, params).fetchall()]

        return self._run("listing jobs", op, idempotent=True)

    def counts(self, *, queue: str | None = None) -> dict[JobState, int]:
        """See :meth:`Store.counts`."""

        def op(conn: _Conn) -> dict[JobState, int]:
            if queue is None:
                return _sql.counts_from_rows(conn.execute(_SQL.count_all).fetchall())
            return _sql.counts_from_rows(conn.execute(_SQL.count_queue, (queue,)).fetchall())

        return self._run("counting jobs", op, idempotent=True)

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
        states = _sql.ACTIVE if include_running else _sql.READY
        condition = _CLAIM_FENCE if fenced else f"AND state IN {states}"
        query = (
            "UPDATE dispatch_jobs SET state = 'cancelled', error = coalesce(%(error)s, error), "
            f"finished_at = %(now)s, updated_at = %(now)s WHERE id = %(id)s {condition} RETURNING id"
        )
        params = {"id": job_id, "error": error, "now": now, "worker": worker_id, "attempts": attempts}

        def op(conn: _Conn) -> bool:
            if conn.execute(query, params).fetchone() is not None:
                return True
            if conn.execute("SELECT 1 FROM dispatch_jobs WHERE id = %s", (job_id,)).fetchone() is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            return False

        return self._run("cancelling a job", op, idempotent=False)

    def requeue(self, job_id: str, *, now: float) -> None:
        """See :meth:`Store.requeue`: one transaction holding the job's row lock."""

        def op(conn: _Conn) -> None:
            with conn.transaction():
                row = conn.execute(
                    "SELECT state, unique_key, queue FROM dispatch_jobs WHERE id = %s FOR UPDATE", (job_id,)
                ).fetchone()
                if row is None:
                    raise JobNotFoundError(f"no job with id {job_id!r}")
                state, unique_key, queue = row
                _SQL.check_requeue(conn, job_id, state, unique_key)
                try:
                    with conn.transaction():  # a savepoint: a racing holder fails only this statement
                        conn.execute(_SQL.requeue, (now, now, job_id))
                except psycopg.errors.UniqueViolation:
                    raise InvalidStateError(
                        f"job {job_id!r}: unique_key {unique_key!r} is held by another active job"
                    ) from None
                conn.execute(_SQL.delete_job_letters, (job_id,))
                self._wake(conn, [queue], now)

        self._run("requeueing a job", op, idempotent=False)

    def purge_finished(self, *, older_than: float) -> int:
        """See :meth:`Store.purge_finished`: deletes in chunks, each its own short statement."""

        def op(conn: _Conn) -> int:
            return conn.execute(
                "DELETE FROM dispatch_jobs WHERE seq IN (SELECT seq FROM dispatch_jobs "
                f"WHERE state IN {_sql.FINAL} AND finished_at < %s LIMIT {_PURGE_CHUNK} FOR UPDATE SKIP LOCKED)",
                (older_than,),
            ).rowcount

        total = 0
        while True:
            deleted = self._run("purging finished jobs", op, idempotent=True)
            total += deleted
            if deleted < _PURGE_CHUNK:
                return total

    # -- dead letters ------------------------------------------------------------------------------------

    def list_dead_letters(self, *, queue: str | None = None, limit: int = 50, offset: int = 0) -> list[DeadLetter]:
        """See :meth:`Store.list_dead_letters`."""
        self._check_limit(limit, offset)
        query, params = _SQL.list_dead_letters(queue, limit, offset)

        def op(conn: _Conn) -> list[DeadLetter]:
            return [letter_from_row(row) for row in conn.execute(query, params).fetchall()]

        return self._run("listing dead letters", op, idempotent=True)

    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """See :meth:`Store.get_dead_letter`."""

        def op(conn: _Conn) -> DeadLetter | None:
            row = conn.execute(_SQL.get_letter, (dead_letter_id,)).fetchone()
            return None if row is None else letter_from_row(row)

        return self._run("reading a dead letter", op, idempotent=True)

    def replay_dead_letter(self, dead_letter_id: str, *, job: JobRecord) -> str:
        """See :meth:`Store.replay_dead_letter`: delete and insert in one transaction."""

        def op(conn: _Conn) -> str:
            with conn.transaction():
                if conn.execute(_SQL.delete_letter, (dead_letter_id,)).rowcount != 1:
                    raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
                return self._insert(conn, job)

        return self._run("replaying a dead letter", op, idempotent=False)

    def purge_dead_letters(self, *, older_than: float | None = None) -> int:
        """See :meth:`Store.purge_dead_letters`: one statement."""

        def op(conn: _Conn) -> int:
            if older_than is None:
                return conn.execute(_SQL.purge_all_letters).rowcount
            return conn.execute(_SQL.purge_letters_before, (older_than,)).rowcount

        return self._run("purging dead letters", op, idempotent=True)

    # -- queues --------------------------------------------------------------------------------------------

    def set_queue_paused(self, queue: str, paused: bool, *, now: float) -> None:
        """See :meth:`Store.set_queue_paused`: one upsert."""

        def op(conn: _Conn) -> None:
            conn.execute(_SQL.pause_queue, (queue, bool(paused), now))
            if not paused:
                self._wake(conn, [queue], now)

        self._run("pausing a queue", op, idempotent=True)

    def paused_queues(self) -> set[str]:
        """See :meth:`Store.paused_queues`."""

        def op(conn: _Conn) -> set[str]:
            return {str(row[0]) for row in conn.execute("SELECT queue FROM dispatch_queues WHERE paused").fetchall()}

        return self._run("reading paused queues", op, idempotent=True)

    # -- cron and leases -----------------------------------------------------------------------------------

    def acquire_lease(self, name: str, *, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`Store.acquire_lease`: one upsert whose row lock makes it atomic across processes."""

        def op(conn: _Conn) -> bool:
            row = conn.execute(_ACQUIRE_LEASE, (name, holder, now + ttl, now)).fetchone()
            return row is not None and row[0] == holder

        return self._run("taking a lease", op, idempotent=True)

    def release_lease(self, name: str, *, holder: str) -> None:
        """See :meth:`Store.release_lease`."""

        def op(conn: _Conn) -> None:
            conn.execute(_SQL.release_lease, (name, holder))

        self._run("releasing a lease", op, idempotent=True)

    def upsert_cron(self, entry: CronEntry, *, now: float) -> CronEntry:
        """See :meth:`Store.upsert_cron`: one upsert."""

        def op(conn: _Conn) -> CronEntry:
            row = conn.execute(_UPSERT_CRON, _sql.cron_params(entry, now)).fetchone()
            assert row is not None  # an upsert always returns its row
            return cron_from_row(row)

        return self._run("storing a cron entry", op, idempotent=True)

    def list_crons(self) -> list[CronEntry]:
        """See :meth:`Store.list_crons`."""

        def op(conn: _Conn) -> list[CronEntry]:
            return [cron_from_row(row) for row in conn.execute(_SQL.list_crons)]

        return self._run("listing cron entries", op, idempotent=True)

    def delete_cron(self, name: str) -> bool:
        """See :meth:`Store.delete_cron`."""

        def op(conn: _Conn) -> bool:
            return conn.execute(_SQL.delete_cron, (name,)).rowcount == 1

        return self._run("deleting a cron entry", op, idempotent=False)

    def set_cron_enabled(self, name: str, enabled: bool, *, now: float) -> CronEntry:
        """See :meth:`Store.set_cron_enabled`: one statement (disabled: ``last_tick = Infinity``)."""
        if enabled:
            change = "last_tick = %(now)s WHERE name = %(name)s AND last_tick = 'Infinity'"
        else:
            change = "last_tick = 'Infinity' WHERE name = %(name)s AND last_tick IS DISTINCT FROM 'Infinity'"
        # The second SELECT sees the row as it was before the update: used only when nothing changed.
        query = (
            f"WITH changed AS (UPDATE dispatch_crons SET updated_at = %(now)s, {change} RETURNING {_sql.CRON_COLUMNS}) "
            f"SELECT {_sql.CRON_COLUMNS} FROM changed UNION ALL SELECT {_sql.CRON_COLUMNS} FROM dispatch_crons "
            "WHERE name = %(name)s AND NOT EXISTS (SELECT 1 FROM changed)"
        )

        def op(conn: _Conn) -> CronEntry:
            row = conn.execute(query, {"now": now, "name": name}).fetchone()
            if row is None:
                raise JobNotFoundError(f"no cron entry named {name!r}")
            return cron_from_row(row)

        return self._run("enabling a cron entry" if enabled else "disabling a cron entry", op, idempotent=True)

    def fire_cron(self, name: str, *, tick: float, job: JobRecord) -> bool:
        """See :meth:`Store.fire_cron`: a compare-and-set of ``last_tick`` (its row lock serialises
        the processes) and the insert, in one transaction."""

        def op(conn: _Conn) -> bool:
            with conn.transaction():
                if not _SQL.advance_cron(conn, name, tick, job.created_at):
                    return False
                self._insert(conn, job)
                return True

        # Safe to repeat: the second run finds last_tick == tick and fires nothing.
        return self._run("firing a cron entry", op, idempotent=True)


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
