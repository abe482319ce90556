"""SQLiteStore's writer lock: the writers of every process on one file queue on a lock, not in SQLite's busy handler.

SQLite lets one writer at a time in; a writer that finds another waits in SQLite's busy
handler, which sleeps 1, 2, 5, 10, 15 ... ms between looks, whatever the other's
transaction takes (~0.2 ms). So a write meeting another waits ~9 ms at the p99. Here every
write of a store first takes this module's :class:`WriterLock` for its file:

- a ``threading.Lock`` per file per process (not per store: two stores on one file in one
  process queue on it too), so this process's threads wake as soon as the holder releases;
- then a POSIX record lock (``fcntl.lockf``) on a sidecar file, ``<db>-writer.lock``, so
  other processes' writers wait for this one outside SQLite. A POSIX lock belongs to the
  process (its threads are already ordered by the threading lock), is dropped by the kernel
  when the process dies (SIGKILL included: no stale lock) and is not inherited by a fork
  child. It is also dropped when the process closes ANY descriptor of the file, so each
  process keeps exactly one descriptor per sidecar, in this module's registry shared by
  every store on the path (closed when the last of them closes).

The record lock is taken with non-blocking attempts (``F_SETLK``), :data:`POLL` apart for
the first :data:`FINE_FOR` seconds of a wait, then doubling up to :data:`POLL_MAX`, until
the caller's deadline (``busy_timeout``): a blocking ``F_SETLKW`` has no timeout, and a
helper thread blocked in it could neither honour the deadline nor be stopped. The lock
only orders our writers: SQLite's own locking stays the correctness mechanism, so a
process writing without it (an older version, the sqlite3 shell) is still safe, its
writes meeting ours in SQLite's busy handler as before. Readers take no lock. Where
``fcntl`` is missing, or the sidecar cannot be opened or locked (a read-only directory, a
file system without POSIX locks), only the threading lock is taken.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time

from threaddispatch import _lifecycle

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["AVAILABLE", "FINE_FOR", "POLL", "POLL_MAX", "WriterLock", "release_writer_lock", "writer_lock"]

#: Whether this platform has POSIX record locks (else the threading lock alone orders writers).
AVAILABLE = fcntl is not None
_log = logging.getLogger("threaddispatch.stores.sqlite")

#: Seconds between attempts at another process's record lock, for the first :data:`FINE_FOR` seconds.
POLL = 0.0001
#: Seconds of a wait polled every :data:`POLL`; then the gap doubles up to :data:`POLL_MAX`.
FINE_FOR = 0.02
#: The longest gap between two attempts (seconds).
POLL_MAX = 0.005
_BUSY = (errno.EACCES, errno.EAGAIN)  # another process holds the record lock


class WriterLock:
    """One SQLite file's writer lock in this process (see the module docstring).

    ``thread`` orders this process's writers; the holder of ``thread`` alone touches
    ``fd``'s record lock and ``held``. The registry's lock guards ``users`` and ``fd``'s
    opening and closing.
    """

    __slots__ = ("disabled", "fd", "held", "path", "sidecar", "thread", "users")

    def __init__(self, path: str) -> None:
        self.path = path
        self.sidecar = f"{path}-writer.lock"
        self.thread = threading.Lock()
        self.held = False  # this process holds the record lock (only under ``thread``)
        self.users = 0
        self.fd = -1  # the process's one descriptor of the sidecar (-1: no record lock)
        self.disabled = False  # record locks failed on this file: never reopened

    def open(self) -> None:
        """Open the sidecar (once per process and path); on failure, go on with the threading lock alone."""
        if fcntl is None or self.fd >= 0 or self.disabled:
            return
        try:
            self.fd = os.open(self.sidecar, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as error:
            _log.debug("SQLiteStore %r: no cross-process writer lock (%s)", self.path, error)

    def renew(self) -> None:
        """In a forked child: a fresh threading lock (a parent thread may hold it); the child holds no record lock."""
        self.thread = threading.Lock()
        self.held = False

    def acquire(self, deadline: float) -> str | None:
        """Take the lock by ``deadline`` (monotonic); None, or who held it past the deadline."""
        if not self.thread.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return "another thread of this process"
        if self.fd < 0 or self._lock_file(deadline):
            return None
        self.thread.release()
        return "another process"

    def release(self) -> None:
        """Release both locks; only by the thread that acquired them."""
        try:
            if self.held:
                self.held = False
                self._unlock_file()
        finally:
            self.thread.release()

    def _lock_file(self, deadline: float) -> bool:
        """Take the record lock, polling until ``deadline``; whether taken (True also when locking is impossible)."""
        assert fcntl is not None
        started = time.monotonic()
        delay = POLL
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in _BUSY:
                    self._give_up(error)
                    return True
            else:
                self.held = True
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now - started >= FINE_FOR:
                delay = min(delay * 2, POLL_MAX)
            time.sleep(min(delay, deadline - now))

    def _unlock_file(self) -> None:
        assert fcntl is not None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        except OSError as error:
            self._give_up(error)

    def _give_up(self, error: OSError) -> None:
        """Record locks fail here for good (no POSIX locks on this file system): the threading lock alone."""
        _log.warning(
            "SQLiteStore %r: cross-process writer lock unavailable (%s); using SQLite's alone", self.path, error
        )
        self.disabled = True
        fd, self.fd = self.fd, -1
        with contextlib.suppress(OSError):
            os.close(fd)


# _registry_lock guards _registry (every writer lock of this process, by the database's real
# path) and each lock's ``users`` and ``fd``. Lock order: a WriterLock's ``thread``, then this.
_registry_lock = threading.Lock()
_registry: dict[str, WriterLock] = {}


def writer_lock(path: str) -> WriterLock:
    """The writer lock of the SQLite file ``path`` in this process, shared by every store on it; pair with
    :func:`release_writer_lock`."""
    key = os.path.realpath(path)
    with _registry_lock:
        lock = _registry.get(key)
        if lock is None:
            lock = _registry[key] = WriterLock(key)
        lock.users += 1
        lock.open()
        return lock


def release_writer_lock(lock: WriterLock, timeout: float) -> None:
    """A store of ``lock`` closed. The last one closes the sidecar's descriptor once no write holds the lock
    (waiting up to ``timeout``; a lock still held then stays registered, open, for the next store)."""
    with _registry_lock:
        lock.users -= 1
        if lock.users > 0:
            return
    if not lock.thread.acquire(timeout=timeout):
        return
    try:
        with _registry_lock:
            # Closed and unregistered together, so the process never has two descriptors of a sidecar
            # (closing one would drop the record lock taken through the other).
            if lock.users == 0 and _registry.get(lock.path) is lock:
                del _registry[lock.path]
                fd, lock.fd = lock.fd, -1
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
    finally:
        lock.thread.release()


def _renew_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for lock in _registry.values():
        lock.renew()


_lifecycle.at_fork_child(_renew_after_fork)
