"""A crash-durable buffer file (a SQLite WAL "spool"): its one job is keeping accepted entries across a crash.

A batching face given a spool appends every entry it accepts here before its ``enqueue``
returns, acknowledges the entries of each batch it delivered (they leave the file), and at
its next start replays what a previous owner left, in order, before new entries. Delivery
is therefore at-least-once across a crash: only a batch in flight at the moment of the
crash is delivered twice.

**Group commit.** Appends from many threads are joined into one transaction: the first
appender to find no commit under way becomes the *leader*, takes every entry queued so
far, writes and commits them in one transaction, publishes the highest durable sequence
number and hands leadership on; the others wait for their sequence number to become
durable (or for leadership, if the leader left before their entry was taken). One leader
writes one batch, so no appender waits behind an endless stream of others' entries. A
leader whose predecessor woke waiters first yields the GIL once, so that those appenders'
next entries join its commit (4 producers: ~3.5 entries per commit instead of ~1.5).

It is not SQLiteStore's :class:`~threaddispatch.stores._sqlite_commit.GroupCommitter`, on
purpose: the spool's appends measured slower through it (4 producers, ``sync="normal"``, 7
alternating rounds: 0.83x the appends per second and 1.2x the CPU per append at the same
~3.5 entries per commit; equal with one producer and with ``"full"``). The spool numbers
entries as they are queued and one durable mark answers every waiter; the store's callers
each need their own ids and error, so it wakes each one on its own lock.

**Durability** is ``sync="normal"`` (``PRAGMA synchronous=NORMAL`` in WAL mode: survives a
process crash, the default) or ``"full"`` (``synchronous=FULL``: an fsync per commit, also
survives power loss).

**Ownership.** One process owns a spool at a time: an exclusive ``flock`` on ``PATH.lock``,
held until :meth:`Spool.close`. A second owner, in this process or another, gets
:class:`~threaddispatch.errors.SpoolOwnedError` naming the path and the owner's pid; the
kernel drops the lock when the owner dies, even by SIGKILL.

Entries are stored as JSON text: an entry JSON cannot encode is refused with PayloadError
at :meth:`Spool.append`, on the caller's thread.

Locks: ``_lock`` guards the append queue, the leader flag and the durable mark (never held
across SQL); ``_db`` serialises use of the one connection (taken without ``_lock`` held).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

from threaddispatch._show import show
from threaddispatch._validate import check_int, check_positive_int, check_seconds
from threaddispatch.errors import ConfigurationError, PayloadError, SpoolOwnedError, StoreError

__all__ = ["Spool", "SpoolDeadLetter"]

_log = logging.getLogger("threaddispatch")

SpoolSync = Literal["normal", "full"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spool_entries (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS spool_dead_letters ("
    " seq INTEGER PRIMARY KEY, body TEXT NOT NULL, error TEXT NOT NULL, failed_at REAL NOT NULL)",
)
# One encoder for every entry: json.dumps with options builds a new JSONEncoder per call (~5 µs).
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_CHUNK = 500  # rows per executemany/IN list: well under SQLite's variable limit


class SpoolDeadLetter(NamedTuple):
    """An entry whose batch exhausted its retries: its sequence number, the entry, the error, when (epoch s)."""

    seq: int
    entry: Any
    error: str
    failed_at: float


class Spool:
    """A crash-durable, single-owner buffer file of JSON entries with group-committed appends.

    Opening blocks for the file's schema check and the count of what a previous owner left;
    raises SpoolOwnedError if another owner holds it, ConfigurationError for bad arguments.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: SpoolSync = "normal", timeout: float = 30.0) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigurationError(f"spool must be a file path, got {show(path)}")
        if sync not in ("normal", "full"):
            raise ConfigurationError(f"spool_sync must be 'normal' or 'full', got {show(sync)}")
        self.path = os.fspath(path)
        self.sync: SpoolSync = sync
        self._timeout = check_seconds("spool timeout", timeout, allow_zero=False)
        self._lock_file = _own(self.path)
        import sqlite3  # here, not at module top: a face without a spool never loads sqlite3

        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={sync.upper()}")
            for statement in _SCHEMA:
                self._conn.execute(statement)
            last = self._conn.execute(
                "SELECT max(seq) FROM (SELECT max(seq) AS seq FROM spool_entries"
                " UNION ALL SELECT max(seq) FROM spool_dead_letters)"
            ).fetchone()[0]
        except sqlite3.Error as error:
            self._lock_file.close()
            raise StoreError(f"spool {self.path!r} cannot be opened: {error}") from error
        self._db = threading.Lock()  # serialises the connection
        self._lock = threading.Lock()  # guards _queue, _leading, _durable, _next, _failed, _waiters, _closed
        self._changed = threading.Condition(self._lock)
        self._queue: list[tuple[int, str]] = []  # appended, not yet taken by a leader; seq order
        self._leading = False  # a leader is writing a batch
        self._next = (last or 0) + 1  # the next sequence number to hand out
        self._durable = self._next  # every seq below it is committed (or failed: see _failed)
        self._failed: dict[int, BaseException] = {}  # seq -> the error its commit raised
        self._waiters = 0  # threads waiting on _changed
        self._woke = False  # the last commit notified waiters (read without the lock: a hint)
        self._closed = False

    # -- appending ------------------------------------------------------------------------------

    def append(self, entry: object) -> int:
        """Make ``entry`` durable; returns its sequence number. Blocks until its group commit is done (<= timeout)."""
        return self.append_many((entry,))[0]

    def append_many(self, entries: Sequence[object]) -> list[int]:
        """Make ``entries`` durable, in order; returns their sequence numbers. Blocks like :meth:`append`."""
        bodies = [_encode(entry) for entry in entries]
        if not bodies:
            return []
        deadline = time.monotonic() + self._timeout
        with self._lock:
            if self._closed:
                raise StoreError(f"spool {self.path!r} is closed")
            first = self._next
            self._next += len(bodies)
            self._queue.extend(zip(range(first, self._next), bodies, strict=True))
            last = self._next - 1
            while last >= self._durable:
                if not self._leading:
                    self._leading = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError(f"spool {self.path!r}: no commit within {self._timeout:g} s")
                self._waiters += 1
                try:
                    self._changed.wait(remaining)
                finally:
                    self._waiters -= 1
            else:
                return self._settled(first, last)
        self._lead()
        with self._lock:
            return self._settled(first, last)

    def _lead(self) -> None:
        """Write every queued entry in one transaction, publish the durable mark, hand leadership on."""
        if self._woke:
            # The last commit woke appenders that are about to append again: let them queue
            # first (one GIL hand-off), so that this commit takes their entries too.
            time.sleep(0)
        with self._lock:
            batch, self._queue = self._queue, []
        error: BaseException | None = None
        try:
            with self._db:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany("INSERT INTO spool_entries (seq, body) VALUES (?, ?)", batch)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
        except Exception as caught:  # noqa: BLE001 - handed to every appender of the batch
            error = caught
        with self._lock:
            if batch:
                if error is not None:
                    self._failed.update((seq, error) for seq, _ in batch)
                self._durable = batch[-1][0] + 1
            self._leading = False
            self._woke = self._waiters > 0
            if self._woke:  # a lone appender (the common case with one producer) skips the notify
                self._changed.notify_all()

    def _settled(self, first: int, last: int) -> list[int]:
        """The sequence numbers first..last, or the StoreError their commit raised; caller holds _lock."""
        errors = [self._failed.pop(seq) for seq in range(first, last + 1) if seq in self._failed]
        if errors:
            raise StoreError(f"spool {self.path!r}: the append was not committed: {errors[0]}") from errors[0]
        return list(range(first, last + 1))

    # -- acknowledging, dead letters, replay --------------------------------------------------------

    def ack(self, seqs: Iterable[int]) -> None:
        """Remove delivered entries (unknown numbers are ignored). One transaction; blocks for its commit."""
        rows = [(seq,) for seq in seqs]
        if rows:
            with self._db:
                self._transaction(lambda: self._conn.executemany("DELETE FROM spool_entries WHERE seq = ?", rows))

    def dead_letter(self, seqs: Iterable[int], error: str) -> None:
        """Move entries whose batch exhausted its retries to the dead-letter table, with ``error``. One transaction."""
        numbers = list(seqs)
        now = time.time()

        def move() -> None:
            for start in range(0, len(numbers), _CHUNK):
                chunk = numbers[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                self._conn.execute(
                    "INSERT OR REPLACE INTO spool_dead_letters (seq, body, error, failed_at)"
                    f" SELECT seq, body, ?, ? FROM spool_entries WHERE seq IN ({marks})",
                    (error, now, *chunk),
                )
                self._conn.execute(f"DELETE FROM spool_entries WHERE seq IN ({marks})", chunk)

        if numbers:
            with self._db:
                self._transaction(move)

    def settle(self, seqs: Sequence[int], error: BaseException | str | None, owner: str) -> None:
        """Acknowledge delivered entries (``error`` None) or dead-letter failed ones with ``error``; never raises.

        What every face does once its deliveries are settled. A failure is logged naming
        ``owner``; those entries then stay pending and the next owner replays them. A spool
        closed meanwhile (a stop whose drain ran past its timeout) gets one WARNING line
        without a traceback: the documented outcome, the next owner delivers them again.
        """
        if not seqs:
            return
        try:
            if error is None:
                self.ack(seqs)
            else:
                self.dead_letter(seqs, error if isinstance(error, str) else f"{type(error).__qualname__}: {error}")
        except Exception:  # noqa: BLE001 - the face's worker lives; the entries stay in the spool
            if self._closed:
                _log.warning(
                    "%s: the spool could not record %d settled entries: it was closed (a stop past its"
                    " timeout); its next owner delivers them again",
                    owner,
                    len(seqs),
                )
            else:
                _log.exception("%s: the spool could not record %d settled entries", owner, len(seqs))

    def pending(self) -> list[tuple[int, Any]]:
        """Every entry still in the spool (not acknowledged, not dead), oldest first, as (seq, entry). One read."""
        rows = self._read("SELECT seq, body FROM spool_entries ORDER BY seq", ())
        return [(seq, json.loads(body)) for seq, body in rows]

    def dead_letters(self, limit: int = 100) -> list[SpoolDeadLetter]:
        """Dead-lettered entries, oldest first (at most ``limit``). One read."""
        check_positive_int("limit", limit)
        rows = self._read("SELECT seq, body, error, failed_at FROM spool_dead_letters ORDER BY seq LIMIT ?", (limit,))
        return [SpoolDeadLetter(seq, json.loads(body), error, failed_at) for seq, body, error, failed_at in rows]

    def take_dead_letters(
        self, seqs: Iterable[int] | None = None, *, limit: int | None = None
    ) -> list[tuple[int, Any]]:
        """Move dead letters (all, or those numbered) back among the pending entries; returns them, oldest first.

        They keep their sequence numbers, so the caller re-delivers them and acknowledges them
        like any entry. With ``limit`` (a buffer's room: an int >= 0), at most that many: the
        oldest, or the first ``limit`` of ``seqs``. One transaction.
        """
        wanted = None if seqs is None else list(seqs)
        if limit is not None:
            check_int("limit", limit, minimum=0)
            if wanted is None:
                wanted = [dead.seq for dead in self.dead_letters(limit)] if limit else []
            else:
                wanted = wanted[:limit]
            if not wanted:
                return []
        moved: list[tuple[int, str]] = []

        def move() -> None:
            if wanted is None:
                rows = self._conn.execute("SELECT seq, body FROM spool_dead_letters ORDER BY seq").fetchall()
            else:
                rows = []
                for start in range(0, len(wanted), _CHUNK):
                    chunk = wanted[start : start + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows += self._conn.execute(
                        f"SELECT seq, body FROM spool_dead_letters WHERE seq IN ({marks})", chunk
                    ).fetchall()
                rows.sort()
            self._conn.executemany("INSERT OR REPLACE INTO spool_entries (seq, body) VALUES (?, ?)", rows)
            self._conn.executemany("DELETE FROM spool_dead_letters WHERE seq = ?", [(seq,) for seq, _ in rows])
            moved.extend(rows)

        with self._db:
            self._transaction(move)
        return [(seq, json.loads(body)) for seq, body in moved]

    def __len__(self) -> int:
        """The number of pending entries (one read)."""
        return int(self._read("SELECT count(*) FROM spool_entries", ())[0][0])

    def _read(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        """The rows of one read; StoreError (not sqlite3's) on a closed spool or a SQLite failure."""
        import sqlite3  # loaded by __init__

        with self._db:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as error:
                state = "is closed" if self._closed else f"cannot be read: {error}"
                raise StoreError(f"spool {self.path!r} {state}") from error

    def _transaction(self, work: Any) -> None:
        """Run ``work`` in one write transaction; caller holds _db. StoreError on a SQLite failure."""
        import sqlite3  # loaded by __init__

        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                work()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise StoreError(f"spool {self.path!r}: {error}") from error

    # -- closing --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close the file and give up ownership. Idempotent; waits for a commit under way (bounded by the timeout)."""
        deadline = time.monotonic() + self._timeout
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._leading and time.monotonic() < deadline:
                self._waiters += 1
                try:
                    self._changed.wait(deadline - time.monotonic())
                finally:
                    self._waiters -= 1
        with self._db:
            self._conn.close()
        self._lock_file.close()  # releases the flock

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Spool({self.path!r}, sync={self.sync!r}{', closed' if self._closed else ''})"


def _encode(entry: object) -> str:
    try:
        return _dumps(entry)
    except (TypeError, ValueError) as error:
        raise PayloadError(f"a spooled entry must be JSON-encodable: {error} (entry {show(entry)})") from error


def _own(path: str) -> Any:
    """Open and exclusively flock ``PATH.lock``, writing our pid in it; SpoolOwnedError if another owner holds it."""
    lock_path = path + ".lock"
    try:
        handle = open(lock_path, "a+", encoding="ascii")  # noqa: SIM115 - held open until close()
    except OSError as error:
        raise ConfigurationError(f"spool {path!r}: cannot open its lock file: {error}") from error
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise SpoolOwnedError(f"spool {path!r} is owned by another dispatcher (pid {owner})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
