"""PostgresStore's connections: the DSN, opening a session, and the per-process pool: its one job.

The pool keeps ``min_size`` connections while idle and opens at most ``max_size``. It is
not ``psycopg_pool``: that pool waits its whole timeout while its background threads
reconnect, hiding why ("couldn't get a connection"), and its threads do not survive
``fork()``. This one connects on demand on the caller's thread, so a server that is down
raises :class:`~threaddispatch.errors.StoreUnavailableError` at once, naming the DSN's host
and port (never the password). A pooled connection is checked for a message from the
server before reuse (one non-blocking ``poll``, no round trip): after a server restart the
dead ones are dropped and new ones opened. Connections carry the pool generation (and pid)
that opened them: after a fork the child starts a new generation and never closes or uses
the parent's.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import threading
import time
from typing import Any, NoReturn
from urllib.parse import unquote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from threaddispatch._dsn import check_port, host_port, split_url
from threaddispatch._redact import MASK, passwords, redact, scrub
from threaddispatch.errors import ConfigurationError, StoreError, StoreUnavailableError

__all__ = ["LOCK_TIMEOUT_MAX", "Conn", "Dsn", "Pool", "broken", "close_quietly", "milliseconds", "session_setup"]

Conn = psycopg.Connection[tuple[Any, ...]]

#: A URL DSN (as libpq tells one from ``key=value`` pairs, but any scheme: a wrong one is named).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def broken(conn: Conn) -> bool:
    """Whether ``conn`` is closed or known to be broken (no I/O)."""
    return bool(conn.closed or conn.broken)


def has_input(conn: Conn) -> bool:
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


def close_quietly(conn: Conn) -> None:
    """Close ``conn``, ignoring errors (closing a dead connection is best effort)."""
    with contextlib.suppress(Exception):
        conn.close()


class Dsn:
    """A DSN split into what we connect with and what we may show (never the password)."""

    def __init__(self, dsn: str) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigurationError("PostgresStore needs a DSN, e.g. 'postgresql://user@host:5432/dbname'")
        self._dsn = dsn
        self.secrets = passwords(dsn)  # as _redact reads the text; completed once libpq has read it
        conninfo, schema, password = self._take_schema(dsn)
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
        # The secrets as libpq read them and as _redact reads the text (a raw '@', '/' or ':'
        # in a URL password makes the two differ); everything shown passes through scrub().
        secrets = {str(params.get("password") or ""), os.environ.get("PGPASSWORD", ""), password, *self.secrets}
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)
        self._check_ports()
        host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "localhost")
        self.host = self.scrub(host)
        self.port = self.scrub(str(params.get("port") or os.environ.get("PGPORT") or "5432"))
        self.dbname = self.scrub(str(params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or ""))
        # host:port for messages, an IPv6 host in brackets ([::1]:5432); host and port are scrubbed.
        self.address = host_port(self.host, self.port)

    def _take_schema(self, dsn: str) -> tuple[str, str | None, str]:
        """(what libpq connects with, our own ``schema=`` query parameter, the URL's password or '') of ``dsn``.

        A URL is split by the one store-URL parser (:func:`~threaddispatch._dsn.split_url`:
        a raw ``@ : [ ]`` in its password, bracketed IPv6 hosts, ports 1..65535) and rebuilt
        with its user and password percent-encoded, so libpq reads them as we did; libpq does
        not know ``schema=``, so it is taken out. A ``host=... dbname=...`` DSN goes to libpq as given.
        """
        if not _URL.match(dsn.strip()):
            return dsn, None, ""
        parts = split_url(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(
                f"PostgresStore needs a postgresql:// or postgres:// URL or a 'host=... dbname=...' DSN, "
                f"got {self.scrub(redact(dsn))!r}"
            )
        # libpq's query is everything after the first '?' ('#' is not special to it).
        path, question, query = parts.tail.partition("?")
        pairs = [pair for pair in query.split("&") if pair] if question else []
        schemas = [unquote(pair.partition("=")[2]) for pair in pairs if unquote(pair.partition("=")[0]) == "schema"]
        rest = [pair for pair in pairs if unquote(pair.partition("=")[0]) != "schema"]
        tail = path + ("?" + "&".join(rest) if rest else "") if schemas else parts.tail
        return parts.with_userinfo_encoded(tail), schemas[-1] if schemas else None, parts.password or ""

    def _check_ports(self) -> None:
        """Refuse a port libpq would refuse at every connection (``port=abc``, ``?port=99999``, PGPORT)."""
        given = self.params.get("port")
        text, where = (str(given), f"PostgreSQL DSN {redact(self._dsn)!r}") if given else (
            os.environ.get("PGPORT", ""), "the PGPORT environment variable")  # fmt: skip
        for port in text.split(","):
            if port.strip():  # an empty one is libpq's default port
                try:
                    check_port(port, where)
                except ConfigurationError as error:
                    # ``where`` is redacted already; scrub()'s second pass would mask to the next space.
                    message = str(error)
                    for secret in self.secrets:
                        message = message.replace(secret, MASK)
                    raise ConfigurationError(message) from None

    def scrub(self, text: str) -> str:
        """``text`` with every password occurrence masked (the one redaction of ``_redact``)."""
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return scrub(text, self._dsn)

    @property
    def where(self) -> str:
        """``host:port/dbname`` for messages (no user, no password; ``[::1]:5432/app`` for an IPv6 host)."""
        return f"{self.address}/{self.dbname}" if self.dbname else self.address

    def unavailable(self, what: str, error: BaseException) -> StoreUnavailableError:
        """The StoreUnavailableError for ``error`` while doing ``what`` (its text scrubbed)."""
        text = self.scrub(str(error).strip()) or type(error).__name__
        return StoreUnavailableError(f"PostgreSQL store at {self.address} is unavailable ({what}): {text}")

    def failed(self, what: str, error: BaseException) -> StoreError:
        """The StoreError for ``error`` while doing ``what`` (its text scrubbed)."""
        text = self.scrub(str(error).strip()) or type(error).__name__
        return StoreError(f"PostgreSQL store at {self.address}: {what} failed: {text}")

    def raise_from(self, new: StoreError, error: BaseException) -> NoReturn:
        """Raise ``new`` from ``error``, with ``error``'s own text scrubbed first.

        Called inside the ``except`` that caught ``error``, so ``error`` stays reachable as
        ``new.__context__`` whatever ``from`` says: its args are rewritten rather than hidden.
        """
        text = str(error)
        clean = self.scrub(text)
        if clean != text:
            with contextlib.suppress(Exception):  # an exception type whose args cannot be set
                error.args = (clean,)
            if str(error) != clean:
                error.args = ()
        raise new from error


#: PostgreSQL's largest lock_timeout, in seconds (an int of milliseconds).
LOCK_TIMEOUT_MAX = 2_147_483.0


def milliseconds(seconds: float) -> int:
    """``seconds`` as a positive whole number of milliseconds, as lock_timeout takes them (0 would mean none)."""
    return max(1, min(round(seconds * 1000), 2_147_483_647))


def session_setup(
    schema: str | None, synchronous_commit: str | None, lock_timeout: float | None = None
) -> sql.Composed | None:
    """The statement a new session runs first (search_path, synchronous_commit, lock_timeout), or None."""
    statements: list[sql.Composable] = []
    if lock_timeout is not None:
        statements.append(sql.SQL("SET lock_timeout TO {}").format(sql.Literal(milliseconds(lock_timeout))))
    if schema is not None:
        statements.append(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    if synchronous_commit is not None:
        statements.append(sql.SQL("SET synchronous_commit TO {}").format(sql.Identifier(synchronous_commit)))
    return sql.SQL("; ").join(statements) if statements else None


class Pool:
    """This process's connections to one server: ``min_size`` kept while idle, at most ``max_size``.

    Idle connections unused for ``max_idle`` seconds are closed (down to ``min_size``); a
    caller that finds every connection busy waits up to ``pool_timeout`` seconds, then gets
    StoreUnavailableError. Thread-safe. :meth:`reset_after_fork` starts a new generation in a
    forked child.
    """

    def __init__(
        self,
        dsn: Dsn,
        *,
        min_size: int,
        max_size: int,
        max_idle: float,
        pool_timeout: float,
        connect_timeout: float,
        session_sql: sql.Composed | None,
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.max_idle = max_idle
        self.pool_timeout = pool_timeout
        self._session_sql = session_sql
        self._connect_kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in dsn.params:
            self._connect_kwargs["connect_timeout"] = max(1, math.ceil(connect_timeout))
        if "application_name" not in dsn.params:
            self._connect_kwargs["fallback_application_name"] = "threaddispatch"
        self.closed = False
        self._init_process_state()

    def _init_process_state(self) -> None:
        # _lock guards _idle, _size and closed; _available is a condition on it (a connection
        # came back or a slot freed). Connect, close and queries never run with it held.
        # Invariant: _size = len(_idle) + connections checked out of this generation <= max_size.
        self._lock = threading.Lock()
        self._available = threading.Condition(self._lock)
        self.pid = os.getpid()
        self._generation = getattr(self, "_generation", 0) + 1
        self._idle: list[tuple[Conn, float]] = []  # (connection, idle since), most recent last
        self._size = 0

    def reset_after_fork(self) -> None:
        """In a forked child: abandon (never close) the parent's connections and start empty.

        Closing one would end the parent's session on the shared socket; psycopg also only
        closes a connection in the process that opened it.
        """
        self._init_process_state()

    def connect(self) -> Conn:
        """A new autocommit connection with the session settings; StoreUnavailableError if it fails."""
        try:
            conn: Conn = psycopg.connect(self.dsn.conninfo, **self._connect_kwargs)
        except psycopg.Error as error:
            self.dsn.raise_from(self.dsn.unavailable("connecting", error), error)
        if self._session_sql is not None:
            try:
                conn.execute(self._session_sql)
            except psycopg.Error as error:
                close_quietly(conn)
                self.dsn.raise_from(self.dsn.unavailable("setting up the session", error), error)
        return conn

    def acquire(self) -> tuple[Conn, int]:
        """A connection for this thread's call and the pool generation it belongs to (for :meth:`release`)."""
        deadline = time.monotonic() + self.pool_timeout
        dead: list[Conn] = []
        try:
            with self._lock:
                while True:
                    if self.closed:
                        raise StoreError(f"PostgresStore {self.dsn.where} is closed")
                    while self._idle:
                        conn, _since = self._idle.pop()
                        if broken(conn) or has_input(conn):
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
                            f"PostgreSQL store at {self.dsn.address}: all {self.max_size} pooled "
                            f"connections stayed busy for {self.pool_timeout}s (raise max_size?)"
                        )
                    self._available.wait(remaining)
        finally:
            for conn in dead:
                close_quietly(conn)
        try:
            return self.connect(), generation
        except BaseException:
            with self._lock:
                if generation == self._generation:
                    self._size -= 1
                    self._available.notify()
            raise

    def _prune_idle(self, dead: list[Conn]) -> None:
        """Close (via ``dead``) the oldest idle connections past ``max_idle``, keeping ``min_size``. Lock held."""
        now = time.monotonic()
        while self._idle and self._size > self.min_size and now - self._idle[0][1] > self.max_idle:
            dead.append(self._idle.pop(0)[0])
            self._size -= 1

    def release(self, conn: Conn, generation: int, *, discard: bool) -> None:
        """Give back a connection from :meth:`acquire`; ``discard`` (or a bad state) closes it instead."""
        if not discard and not broken(conn):
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
            if discard or broken(conn) or self.closed:
                self._size -= 1
                self._available.notify()
            else:
                self._idle.append((conn, time.monotonic()))
                self._available.notify()
                return
        close_quietly(conn)

    def close(self) -> None:
        """Close the idle connections (in the process that opened them); later :meth:`acquire` raises.

        Connections in use are closed when released. Idempotent.
        """
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            self._size -= len(idle)
            same_process = os.getpid() == self.pid
            self._available.notify_all()
        if same_process:
            for conn, _since in idle:
                close_quietly(conn)
