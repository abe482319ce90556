"""Storages for :class:`~threaddispatch.requests.RequestDispatcher`: where queued requests are kept.

A storage holds every request that is queued (waiting, running, retrying or stopped)
and forgets it once it is settled (answered, failed for good, cancelled or deleted).
A dispatcher created on a storage that still holds requests re-queues them, in the
order they were added, before it starts anything: with :class:`SQLiteRequestStorage`
that carries queued requests across a process restart.

Two storages ship here: :class:`MemoryRequestStorage` (a dict; survives a dispatcher,
not the process) and :class:`SQLiteRequestStorage` (one file, WAL, stdlib ``sqlite3``).
Any object with the members of :class:`RequestStorage` is a storage too. A SQLite
storage also keeps the dispatcher's response cache, in a table of the same file
(:meth:`SQLiteRequestStorage.response_cache`).
"""

from __future__ import annotations

import itertools
import json
import os
import reprlib
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from threaddispatch._request_cache import CachedResponse
from threaddispatch.errors import ConfigurationError, PayloadError, StoreError, StoreUnavailableError

__all__ = ["MemoryRequestStorage", "RequestStorage", "SQLiteRequestStorage", "SQLiteResponseCache", "StoredRequest"]

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60


@dataclass(frozen=True)
class StoredRequest:
    """One queued request as a storage keeps it: the request and the options it was added with.

    ``created_at`` is wall-clock time (``time.time()``) of the first ``add``; it is
    informative only. Attempts made so far are not kept: a re-queued request gets its
    full ``retry`` budget again.
    """

    request_id: str
    queue_key: str
    request: object
    mode: str = "concurrent"
    deduplicate: bool = False
    deduplicate_time: float | None = None
    retry: int = 0
    retry_time: float = 0.5
    offline: bool = True
    created_at: float = 0.0


@runtime_checkable
class RequestStorage(Protocol):
    """What a dispatcher needs from a storage. Every method must be thread-safe.

    The dispatcher calls these methods with none of its locks held, from the thread
    that caused the change (the caller of ``add``, a worker thread, ``close``).
    ``add`` for a request always returns before ``remove`` for it is called.
    """

    @property
    def persistent(self) -> bool:
        """Whether entries outlive the process: requests must then be JSON-serialisable."""

    def load(self) -> list[StoredRequest]:
        """Every stored request, in the order they were added. Called once, when a dispatcher starts."""

    def add(self, entry: StoredRequest) -> None:
        """Keep ``entry`` (the dispatcher adds each id once); raise PayloadError naming it if it cannot be stored."""

    def remove(self, request_ids: Sequence[str]) -> None:
        """Forget these requests; ids that are not stored are ignored."""

    def get_queue(self, queue_key: str) -> list[StoredRequest]:
        """The stored requests of one queue key, in the order they were added."""

    def close(self) -> None:
        """Release resources (connections); idempotent. A later call may reopen them."""


class MemoryRequestStorage:
    """Keeps queued requests in a dict: they outlive a dispatcher (hand the storage to the next one), not the process.

    Accepts any request (nothing is serialised). Thread-safe; no method blocks
    beyond a short internal lock. After ``fork()`` the child keeps a copy of the
    parent's entries.
    """

    persistent = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._entries: dict[str, StoredRequest] = {}

    def _guard(self) -> threading.Lock:
        # A lock copied by fork() may be held forever by a parent thread that does not exist here.
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._pid = os.getpid()
        return self._lock

    def load(self) -> list[StoredRequest]:
        """Every stored request, oldest first."""
        with self._guard():
            return list(self._entries.values())

    def add(self, entry: StoredRequest) -> None:
        """Keep ``entry``."""
        with self._guard():
            self._entries[entry.request_id] = entry

    def remove(self, request_ids: Sequence[str]) -> None:
        """Forget these requests; unknown ids are ignored."""
        with self._guard():
            for request_id in request_ids:
                self._entries.pop(request_id, None)

    def get_queue(self, queue_key: str) -> list[StoredRequest]:
        """The stored requests of ``queue_key``, oldest first."""
        with self._guard():
            return [entry for entry in self._entries.values() if entry.queue_key == queue_key]

    def close(self) -> None:
        """Nothing to release; entries are kept."""

    def __len__(self) -> int:
        with self._guard():
            return len(self._entries)

    def __repr__(self) -> str:
        return f"<MemoryRequestStorage entries={len(self)}>"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS threaddispatch_requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    queue_key TEXT NOT NULL,
    request TEXT NOT NULL,
    mode TEXT NOT NULL,
    deduplicate INTEGER NOT NULL,
    deduplicate_time REAL,
    retry INTEGER NOT NULL,
    retry_time REAL NOT NULL,
    offline INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS threaddispatch_requests_queue ON threaddispatch_requests (queue_key, seq);
CREATE TABLE IF NOT EXISTS threaddispatch_request_cache (
    key TEXT PRIMARY KEY,
    response TEXT NOT NULL,
    stored_at REAL NOT NULL,
    fresh_until REAL NOT NULL,
    stale_until REAL NOT NULL
);
"""

_COLUMNS = "request_id, queue_key, request, mode, deduplicate, deduplicate_time, retry, retry_time, offline, created_at"

_Row = tuple[str, str, str, str, int, "float | None", int, float, int, float]

# SQLite's default limit on host parameters in one statement is 999 on old builds.
_CHUNK = 500


def encode_request(entry: StoredRequest) -> str:
    """``entry.request`` as JSON, or PayloadError naming the request id and the request.

    The JSON must also be UTF-8 (what SQLite stores): a lone surrogate, as ``surrogateescape``
    makes of undecodable bytes, is refused here rather than by the bind, later, as a bare
    UnicodeEncodeError.
    """
    try:
        payload = json.dumps(entry.request, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        if not payload.isascii():
            payload.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:  # UnicodeEncodeError is a ValueError
        raise PayloadError(
            f"request {entry.request_id} ({_repr.repr(entry.request)}) cannot be stored: "
            f"it is not JSON-serialisable as UTF-8 ({error})"
        ) from error
    return payload


class SQLiteRequestStorage:
    """Keeps queued requests in one SQLite file (WAL) so they survive a process restart.

    Requests must be JSON-serialisable; ``add`` raises PayloadError for one that is
    not. JSON does not keep every type: tuples come back as lists, dict keys as str.
    One connection guarded by a lock, opened lazily and re-opened (never reused) in
    a forked child. Every method blocks for one short SQLite statement, up to
    ``timeout`` seconds if another process holds the file's write lock, then raises
    StoreUnavailableError. Thread-safe. Use one dispatcher per file at a time: two
    would both re-queue what the file holds.
    """

    persistent = True

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or not path or path == ":memory:" or path.startswith("file::memory:"):
            raise ConfigurationError(
                f"path must name a file (an in-memory database does not persist: use MemoryRequestStorage); "
                f"got {path!r}"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigurationError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        self.path = path
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        # Connections inherited through fork(): never used nor closed here (closing could
        # checkpoint or unlock the parent's file), only kept referenced.
        self._inherited: list[sqlite3.Connection] = []
        with self._lock:
            self._connection()  # fail at construction, not at the first add

    def _guard(self) -> threading.Lock:
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._pid = os.getpid()
            if self._conn is not None:
                self._inherited.append(self._conn)
                self._conn = None
        return self._lock

    def _connection(self) -> sqlite3.Connection:
        """The open connection, opened (with the schema) if needed; caller holds ``_lock``."""
        if self._conn is not None:
            return self._conn
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StoreUnavailableError(f"cannot open request storage {self.path!r}: {error}") from error
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as error:
            conn.close()
            raise _store_error(self.path, "open", error) from error
        self._conn = conn
        return conn

    def load(self) -> list[StoredRequest]:
        """Every stored request, oldest first."""
        with self._guard():
            try:
                rows = self._connection().execute(f"SELECT {_COLUMNS} FROM threaddispatch_requests ORDER BY seq")
                return [_entry(row) for row in rows.fetchall()]
            except sqlite3.Error as error:
                raise _store_error(self.path, "load", error) from error

    def add(self, entry: StoredRequest) -> None:
        """Store ``entry``; PayloadError, naming it, if its request is not JSON-serialisable."""
        payload = encode_request(entry)
        row = (
            entry.request_id,
            entry.queue_key,
            payload,
            entry.mode,
            int(entry.deduplicate),
            entry.deduplicate_time,
            entry.retry,
            entry.retry_time,
            int(entry.offline),
            entry.created_at,
        )
        with self._guard():
            try:
                self._connection().execute(
                    f"INSERT OR REPLACE INTO threaddispatch_requests ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", row
                )
            except sqlite3.Error as error:
                raise _store_error(self.path, "add", error) from error

    def remove(self, request_ids: Sequence[str]) -> None:
        """Delete these requests; unknown ids are ignored."""
        ids = list(request_ids)
        with self._guard():
            try:
                conn = self._connection()
                for start in range(0, len(ids), _CHUNK):
                    chunk = ids[start : start + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    conn.execute(f"DELETE FROM threaddispatch_requests WHERE request_id IN ({marks})", chunk)
            except sqlite3.Error as error:
                raise _store_error(self.path, "remove", error) from error

    def get_queue(self, queue_key: str) -> list[StoredRequest]:
        """The stored requests of ``queue_key``, oldest first."""
        with self._guard():
            try:
                rows = self._connection().execute(
                    f"SELECT {_COLUMNS} FROM threaddispatch_requests WHERE queue_key = ? ORDER BY seq", (queue_key,)
                )
                return [_entry(row) for row in rows.fetchall()]
            except sqlite3.Error as error:
                raise _store_error(self.path, "read", error) from error

    def close(self) -> None:
        """Close the connection; idempotent. A later call opens a new one."""
        with self._guard():
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __len__(self) -> int:
        with self._guard():
            try:
                (count,) = self._connection().execute("SELECT COUNT(*) FROM threaddispatch_requests").fetchone()
            except sqlite3.Error as error:
                raise _store_error(self.path, "count", error) from error
            return int(count)

    def response_cache(self) -> SQLiteResponseCache:
        """A response cache kept in this file (its own table), sharing this storage's connection and lock."""
        return SQLiteResponseCache(self)

    def _execute(self, action: str, sql: str, params: Sequence[object] = ()) -> tuple[list[Any], int]:
        """Run one statement under the lock: ``(rows, rowcount)``; errors become StoreError naming ``action``."""
        with self._guard():
            try:
                cursor = self._connection().execute(sql, params)
                return cursor.fetchall(), cursor.rowcount
            except sqlite3.Error as error:
                raise _store_error(self.path, action, error) from error

    def __repr__(self) -> str:
        return f"<SQLiteRequestStorage {self.path!r}>"


class SQLiteResponseCache:
    """RequestDispatcher's response cache in a SQLiteRequestStorage's file: survives a restart.

    Responses must be JSON-serialisable (``put`` raises PayloadError otherwise) and come
    back as JSON does (tuples as lists). Every method is one short statement on the
    storage's connection, under its lock. Thread-safe. ``close`` closes the storage's
    connection (it reopens on the next call).
    """

    SWEEP_EVERY = 256

    def __init__(self, storage: SQLiteRequestStorage) -> None:
        self.storage = storage
        self._puts = itertools.count(1)  # every SWEEP_EVERY puts, expired rows are deleted

    def get(self, key: str, now: float) -> CachedResponse | None:
        """The unexpired entry of ``key`` or None; an expired one is deleted."""
        rows, _count = self.storage._execute(
            "read cache",
            "SELECT response, stored_at, fresh_until, stale_until FROM threaddispatch_request_cache WHERE key = ?",
            (key,),
        )
        if not rows:
            return None
        payload, stored_at, fresh_until, stale_until = rows[0]
        if stale_until <= now:
            self.storage._execute("expire cache", "DELETE FROM threaddispatch_request_cache WHERE key = ?", (key,))
            return None
        return CachedResponse(key, json.loads(payload), stored_at, fresh_until, stale_until)

    def put(self, entry: CachedResponse) -> None:
        """Store ``entry``; PayloadError naming the key if its response is not JSON-serialisable."""
        try:
            payload = json.dumps(entry.response, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
            if not payload.isascii():
                payload.encode("utf-8")  # a lone surrogate: refused here, not by the bind
        except (TypeError, ValueError, RecursionError) as error:  # UnicodeEncodeError is a ValueError
            raise PayloadError(
                f"the response for {entry.key!r} ({_repr.repr(entry.response)}) is not JSON-serialisable: {error}"
            ) from error
        self.storage._execute(
            "write cache",
            "INSERT OR REPLACE INTO threaddispatch_request_cache (key, response, stored_at, fresh_until, stale_until) "
            "VALUES (?,?,?,?,?)",
            (entry.key, payload, entry.stored_at, entry.fresh_until, entry.stale_until),
        )
        if next(self._puts) % self.SWEEP_EVERY == 0:
            self.storage._execute(
                "sweep cache", "DELETE FROM threaddispatch_request_cache WHERE stale_until <= ?", (entry.stored_at,)
            )

    def invalidate(self, prefix: str) -> int:
        """Delete the entries whose key starts with ``prefix``; returns how many."""
        _rows, count = self.storage._execute(
            "invalidate cache",
            "DELETE FROM threaddispatch_request_cache WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return max(count, 0)

    def close(self) -> None:
        """Close the storage's connection; idempotent."""
        self.storage.close()

    def __repr__(self) -> str:
        return f"<SQLiteResponseCache {self.storage.path!r}>"


def _entry(row: _Row) -> StoredRequest:
    request_id, queue_key, payload, mode, deduplicate, deduplicate_time, retry, retry_time, offline, created = row
    return StoredRequest(
        request_id=request_id,
        queue_key=queue_key,
        request=json.loads(payload),
        mode=mode,
        deduplicate=bool(deduplicate),
        deduplicate_time=deduplicate_time,
        retry=retry,
        retry_time=retry_time,
        offline=bool(offline),
        created_at=created,
    )


def _store_error(path: str, action: str, error: sqlite3.Error) -> StoreError:
    message = f"request storage {path!r}: {action} failed: {error}"
    if isinstance(error, sqlite3.OperationalError) and "locked" in str(error).lower():
        return StoreUnavailableError(message)
    return StoreError(message)
