"""PostgresStore's wake-ups: a process's subscribers and the LISTEN thread serving them: its one job.

Jobs inserted anywhere NOTIFY ``threaddispatch`` (the insert trigger of
:mod:`threaddispatch.stores._pg_sql`; released dependents, the next job of a finished lock,
jobs retried, handed back, reaped or requeued by its update triggers; a resumed queue by the
store). A notification's ``run_at`` may be later (a retry): the engines keep it as a due time.
:class:`Wakeups` keeps the process's subscribers; while it has any, a listener thread
(``threaddispatch-pg-listener``) holds one LISTEN connection from the pool's DSN and
passes each notification on, so an enqueue on one machine starts work on another
within milliseconds. Engines keep polling as the fallback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

import psycopg

from threaddispatch.backoff import ExponentialJitter
from threaddispatch.stores._pg_pool import Conn, Pool, close_quietly
from threaddispatch.stores._pg_sql import CHANNEL
from threaddispatch.stores._wakeups import Subscribers, WakeupCallback

__all__ = ["WakeupCallback", "Wakeups"]

_log = logging.getLogger("threaddispatch.stores.postgres")


class Wakeups(Subscribers["_Listener"]):
    """This process's wake-up subscribers, and the listener thread that runs while there are any.

    ``find_schema(conn)`` names the schema whose jobs count (None: every schema's);
    ``keepalive`` is how often the idle listener checks its connection, ``reconnect_max``
    caps its reconnection backoff. Thread-safe.
    """

    kind = "PostgresStore"

    def __init__(
        self,
        pool: Pool,
        *,
        find_schema: Callable[[Conn], str | None],
        keepalive: float,
        reconnect_max: float,
    ) -> None:
        self.pool = pool
        self.find_schema = find_schema
        self.keepalive = keepalive
        self.reconnect_max = reconnect_max
        super().__init__(where=pool.dsn.where, log=_log)

    def _new_worker(self) -> _Listener:
        return _Listener(self)


class _Listener:
    """One LISTEN connection and its thread, passing NOTIFYs on to the subscribers of ``wakeups``.

    Stops when asked (:meth:`stop`, from any thread: a byte on a socket pair wakes its
    select) or when no subscriber is left. Reconnects with backoff when the connection is
    lost and then tells every subscriber to look (``(None, None)``): notifications may have
    been missed meanwhile.
    """

    def __init__(self, wakeups: Wakeups) -> None:
        self.wakeups = wakeups
        self._stopping = False
        self._schema: str | None = None
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self.thread = threading.Thread(target=self._run, name="threaddispatch-pg-listener", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 0.0) -> None:
        """Ask the thread to leave (non-blocking, whatever ``timeout``; idempotent)."""
        self._stopping = True
        with contextlib.suppress(OSError):  # full (already woken) or closed (already gone)
            self._writer.send(b"x")

    def _should_stop(self) -> bool:
        return self._stopping or not self.wakeups.has_subscribers(self)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._reader, selectors.EVENT_READ)
        conn: Conn | None = None
        fd = -1  # conn's socket, as registered (a lost connection no longer tells it)
        failures = 0
        backoff = ExponentialJitter(initial=0.05, max=self.wakeups.reconnect_max)
        dsn = self.wakeups.pool.dsn
        try:
            while not self._should_stop():
                if conn is None:
                    try:
                        conn = self._connect()
                    except Exception as error:  # noqa: BLE001 - keep trying until the server is back or we stop
                        failures += 1
                        delay = backoff(failures)
                        _log.warning("PostgresStore listener: cannot connect (%s); retrying in %.2gs",
                                     dsn.scrub(str(error)), delay)  # fmt: skip
                        self._sleep(selector, delay)
                        continue
                    fd = conn.fileno()
                    selector.register(fd, selectors.EVENT_READ)
                    if failures:
                        _log.info("PostgresStore listener: reconnected to %s", dsn.where)
                    failures = 0
                    self.wakeups.wake([(None, None)])  # anything may have arrived meanwhile
                events = selector.select(self.wakeups.keepalive)
                try:
                    if any(key.fileobj is self._reader for key, _ in events):
                        self._drain_wakeups()
                        continue
                    if not events:
                        conn.execute("SELECT 1")  # keepalive: find a dead server even when nothing happens
                    self._deliver(conn)
                except psycopg.Error as error:
                    _log.warning("PostgresStore listener: connection lost (%s); reconnecting",
                                 dsn.scrub(str(error)))  # fmt: skip
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        selector.unregister(fd)
                    close_quietly(conn)
                    conn = None
                    failures = 1
                    self._sleep(selector, backoff(1))
        finally:
            if conn is not None:
                close_quietly(conn)
            selector.close()
            self._reader.close()
            self._writer.close()
            self.wakeups.worker_exited(self)

    def _connect(self) -> Conn:
        conn = self.wakeups.pool.connect()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            close_quietly(conn)
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

    def _deliver(self, conn: Conn) -> None:
        if self._schema is None:
            # Our tables' schema, to ignore other schemas' jobs in the same database. Until the
            # tables exist (first use migrates them) every notification counts: a spare wake-up.
            self._schema = self.wakeups.find_schema(conn)
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
            self.wakeups.wake(list(due.items()))
