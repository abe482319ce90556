"""SQLiteStore's connections: one per thread per process, their pragmas, and fork safety: its one job.

- Connections live in a ``threading.local`` tagged with the pid (:class:`Slot`), so a forked
  child opens its own and never touches the parent's (the huey pid guard).
- Safe to ``fork()`` while threads use the store: just before the fork
  :meth:`Connections.prepare_for_fork` takes every thread's slot lock, which each thread
  holds around all its sqlite3 calls, so no thread is inside SQLite (whose own mutexes a
  child would inherit held); it then closes every connection in the parent, so the child
  inherits none, nor SQLite's per-file lock state. Both processes reopen connections on
  next use; the child never touches a parent's connection, not even to close it.
- Checkpoints stay off the commit path: connections checkpoint on their own only past
  :data:`AUTOCHECKPOINT_PAGES` (a backstop); the store's checkpoint thread runs PASSIVE
  checkpoints while an engine is subscribed. With a sync per commit (``durability="full"``,
  ``synchronous`` FULL or EXTRA) a commit checkpoints past :data:`FSYNC_AUTOCHECKPOINT_PAGES`
  instead: see there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar

from threaddispatch._validate import show
from threaddispatch.errors import ConfigurationError, StoreError, StoreUnavailableError
from threaddispatch.stores._sqlite_lock import WriterLock, release_writer_lock, writer_lock
from threaddispatch.stores._sqlite_sync import Syncer

__all__ = [
    "AUTOCHECKPOINT_PAGES",
    "DURABILITY",
    "FSYNC_AUTOCHECKPOINT_PAGES",
    "Connections",
    "Slot",
    "Write",
    "synchronous_for",
    "translate",
]

F = TypeVar("F", bound=Callable[..., Any])

_log = logging.getLogger("threaddispatch.stores.sqlite")
# How long, past busy_timeout, fork preparation and close() wait for a thread to leave its SQLite call.
_QUIESCE_GRACE = 10.0
# Connections a forked child found still open (their thread was inside SQLite past the wait):
# referenced for the life of the child so that deallocating them never closes them there.
_ABANDONED: list[sqlite3.Connection] = []
#: WAL pages after which a committing connection checkpoints itself (SQLite's default is 1000,
#: a checkpoint every ~50 ms under load, each one stalling the commit that triggers it).
AUTOCHECKPOINT_PAGES = 10_000
#: The same with an fsync per commit (SQLite's default). A checkpoint that has copied everything
#: lets the next commit restart the WAL from its start, overwriting blocks the file already has;
#: a WAL left to grow to 10,000 pages makes every commit's fsync also journal the file's new size,
#: measured 1.5-3x slower per commit (ext4), far more than the checkpoints cost.
FSYNC_AUTOCHECKPOINT_PAGES = 1_000


#: ``durability`` -> its PRAGMA synchronous when ``synchronous`` is not given. What a crash can
#: take is in SQLiteStore's docstring; ``full`` commits at NORMAL where the store's Syncer makes
#: each write durable after its commit (see :mod:`~threaddispatch.stores._sqlite_sync`), at FULL
#: where os.fdatasync is missing.
DURABILITY = {"normal": "NORMAL", "full": "FULL"}
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def synchronous_for(durability: object, synchronous: object) -> str:
    """The PRAGMA synchronous for ``durability`` and an explicit ``synchronous`` (None: the durability's)."""
    if not isinstance(durability, str) or durability not in DURABILITY:
        raise ConfigurationError(f"durability must be 'normal' or 'full', got {show(durability)}")
    if synchronous is None:
        return DURABILITY[durability]
    level = str(synchronous).upper()
    if level not in _SYNCHRONOUS:
        raise ConfigurationError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {show(synchronous)}")
    if durability == "full" and level not in ("FULL", "EXTRA"):
        raise ConfigurationError(f"durability='full' needs synchronous FULL or EXTRA, got {show(synchronous)}")
    return level


class Slot:
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


class Write:
    """``with Write(connections) as conn:`` runs the block as one write of this process to the file.

    Holds the file's writer lock (:class:`~threaddispatch.stores._sqlite_lock.WriterLock`:
    a threading lock shared by every store of this process on the file, then a record lock
    on a sidecar file shared with the other processes) for the block, so writers queue on
    it and never meet SQLite's busy handler (which sleeps 1, 2, 5, 10 ... ms) for each
    other: only a writer that bypasses the lock (the sqlite3 shell, an older version) makes
    SQLite wait. With ``immediate`` (the default) the block is a BEGIN IMMEDIATE
    transaction; without it, the block's statements commit each on its own (a
    single-statement write). With a :class:`~threaddispatch.stores._sqlite_sync.Syncer`
    (``durability="full"``), a block that changed rows returns only once its commit is on
    disk (the wait outside the lock). The writer lock is waited for up to ``busy_timeout``
    in all, the sync until that deadline plus ``busy_timeout`` again. ``defer_sync``:
    return without the sync; the caller then waits with
    :meth:`Syncer.wait_written <threaddispatch.stores._sqlite_sync.Syncer.wait_written>`
    before reporting the write done (the group commit's leader, once for its whole group).
    """

    __slots__ = ("before", "conn", "connections", "deadline", "defer_sync", "immediate")

    def __init__(self, connections: Connections, *, immediate: bool = True, defer_sync: bool = False) -> None:
        self.connections = connections
        self.immediate = immediate
        self.defer_sync = defer_sync

    def __enter__(self) -> sqlite3.Connection:
        connections = self.connections
        self.deadline = time.monotonic() + connections.busy_timeout
        lock = connections.writer_lock
        holder = lock.acquire(self.deadline)
        if holder is not None:
            raise StoreUnavailableError(
                f"SQLite store unavailable: {connections.path!r}: {holder} held the write lock for over "
                f"{connections.busy_timeout:.3g}s"
            )
        try:
            conn = self.conn = connections.conn()
            self.before = conn.total_changes
            if self.immediate:
                conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            lock.release()
            raise
        return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connections, conn = self.connections, self.conn
        commit = 0
        try:
            if exc_type is None:
                if conn.in_transaction:
                    self._commit(conn)
                syncer = connections.syncer
                if syncer is not None and conn.total_changes != self.before:
                    commit = syncer.committed()
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
        finally:
            connections.writer_lock.release()
        if commit and not self.defer_sync:
            assert connections.syncer is not None
            connections.syncer.wait_durable(commit, self.deadline + connections.busy_timeout)

    @staticmethod
    def _commit(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _set_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    # Switching a new file to WAL needs a moment of exclusive access; retry within busy_timeout.
    deadline = time.monotonic() + busy_timeout
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


class Connections:
    """Every thread's connection to the SQLite file ``path`` in this process (see the module docstring)."""

    def __init__(
        self, path: str, *, busy_timeout: float, synchronous: str, sync_commits: bool, on_fork: Callable[[], None]
    ) -> None:
        self.path = path
        self.on_fork = on_fork  # resets the owner (this object included) in a forked child
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        #: Makes each write durable after its commit (``durability="full"`` with synchronous NORMAL), or None.
        self.syncer = Syncer(path) if sync_commits else None
        #: Every commit is synced (``durability="full"``, or synchronous FULL/EXTRA): fewer, bigger transactions pay.
        self.fsyncs = sync_commits or synchronous in ("FULL", "EXTRA")
        self.autocheckpoint = FSYNC_AUTOCHECKPOINT_PAGES if self.fsyncs else AUTOCHECKPOINT_PAGES
        self.closed = False
        #: This file's writer lock in this process, shared with its other stores (renewed in a fork child).
        self.writer_lock: WriterLock = writer_lock(path)
        self._released_lock = False  # close() has handed writer_lock back (idempotent close)
        self._init_process_state()

    def _init_process_state(self) -> None:
        # _slots_lock guards _slots (every thread's slot in this process, for close() and the
        # fork hook). Lock order: _slots_lock, then slot locks; never the other way round.
        self._slots_lock = threading.Lock()
        self._slots: list[Slot] = []
        self._local = threading.local()
        self._pid = os.getpid()
        # Set by prepare_for_fork under _slots_lock, read by resume_after_fork before releasing it.
        self._fork_held: list[Slot] = []
        self._fork_stuck = 0

    @property
    def writer(self) -> threading.Lock:
        """The threading part of :attr:`writer_lock`. Lock order: a slot lock, then this one."""
        return self.writer_lock.thread

    def slot(self) -> Slot:
        """This thread's slot in this process, made on first use."""
        slot: Slot | None = getattr(self._local, "slot", None)
        if slot is not None and slot.pid == os.getpid():
            return slot
        if os.getpid() != self._pid:
            # Forked without the lifecycle hook having run: never use the parent's connections.
            self.on_fork()
        slot = Slot()
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
        kept: list[Slot] = []
        for slot in self._slots:
            if slot.orphaned() and slot.lock.acquire(blocking=False):
                try:
                    self._close_slot(slot)
                finally:
                    slot.lock.release()
            else:
                kept.append(slot)
        self._slots = kept

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use; only with the slot's lock held (see :func:`translate`)."""
        slot = self.slot()
        if slot.conn is not None:
            return slot.conn
        if self.closed:
            raise StoreError(f"SQLiteStore {self.path!r} is closed")
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            _set_wal(conn, self.busy_timeout)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {self.autocheckpoint}")
        except BaseException:
            conn.close()
            raise
        slot.conn = conn
        return conn

    @staticmethod
    def _close_slot(slot: Slot) -> None:
        """Close the slot's connection; the caller holds ``slot.lock``, in the process that opened it."""
        conn, slot.conn = slot.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):  # closing is best effort
                conn.close()

    def close(self) -> None:
        """Close every connection; waits for a thread inside a call up to ``busy_timeout`` plus 10 s."""
        self.closed = True
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
        if self.syncer is not None:
            self.syncer.close()
        if not self._released_lock:
            self._released_lock = True
            release_writer_lock(self.writer_lock, max(0.0, deadline - time.monotonic()))

    def prepare_for_fork(self) -> None:
        """Just before fork(): wait until no thread is inside SQLite on this file, then close every connection.

        Takes ``_slots_lock`` (no new slot meanwhile) and every slot's lock, each wait bounded
        by one deadline (``busy_timeout`` plus 10 s); they stay held across the fork, released
        by :meth:`resume_after_fork` in the parent and replaced in the child. Raises
        StoreError, preparing nothing, if ``_slots_lock`` stays taken past the deadline.
        """
        deadline = time.monotonic() + self.busy_timeout + _QUIESCE_GRACE
        if not self._slots_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise StoreError(f"SQLiteStore {self.path!r}: could not quiesce for fork (another fork in progress?)")
        held: list[Slot] = []
        for slot in self._slots:
            if slot.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                held.append(slot)
                self._close_slot(slot)
        self._fork_held = held
        self._fork_stuck = len(self._slots) - len(held)

    def resume_after_fork(self) -> None:
        """In the parent after fork(): release what :meth:`prepare_for_fork` took; connections reopen on use."""
        held, self._fork_held = self._fork_held, []
        stuck = self._fork_stuck
        for slot in reversed(held):
            slot.lock.release()
        self._slots_lock.release()
        if stuck:
            self._log_stuck(stuck)

    def reset_after_fork(self) -> None:
        """In the child: fresh locks and slots. A parent connection still open here (its thread was inside
        SQLite past the fork wait) is kept referenced, never closed, never used."""
        stuck = [slot.conn for slot in self._slots if slot.conn is not None]
        _ABANDONED.extend(stuck)
        self._init_process_state()
        if self.syncer is not None:
            self.syncer.reset_after_fork()
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


class _HasConnections(Protocol):
    _connections: Connections


def translate(fn: F) -> F:
    """A store method: run it holding this thread's slot lock (see :class:`Slot`) and turn sqlite3
    errors into StoreUnavailableError (locked/busy) or StoreError."""

    @functools.wraps(fn)
    def wrapper(self: _HasConnections, *args: Any, **kwargs: Any) -> Any:
        with self._connections.slot().lock:
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
