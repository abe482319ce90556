"""SQLiteStore's durable commits for ``durability="full"``: one WAL fdatasync shared by the commits before it.

``durability="full"`` promises that a write which returned survives a power cut. SQLite's
own way (``synchronous=FULL``) fsyncs the WAL inside each COMMIT, holding the write lock
across the disk wait: writers queue behind each other's fsyncs. Here the connections commit
with ``synchronous=NORMAL`` (the write lock is held only for the write), and the committing
thread then, outside the write lock, waits in :meth:`Syncer.wait_durable` for an
``fdatasync`` of the ``-wal`` file that STARTED after its commit returned. One sync covers
every commit written before it started, so concurrent writers share syncs: one thread
syncs at a time; the others wait for a sync that covers their commit, or run the next one.

Why this is as durable as ``synchronous=FULL`` in WAL mode:

- A WAL commit is durable once its frames are on disk: recovery replays every frame up to
  the last commit frame whose checksums and salts match the WAL header. FULL differs from
  NORMAL only by an fsync of the WAL at each commit; NORMAL still syncs the WAL before
  every checkpoint, the database file after it, and the WAL header when a writer starts
  reusing the WAL from its beginning (so new frames never follow a stale header).
- Our commit wrote its frames with ``write()`` before COMMIT returned; Linux's fsync and
  fdatasync flush every dirty page of the file, whichever descriptor wrote it, and
  fdatasync includes a size change (a growing WAL). So an fdatasync that started after
  the commit returned, on any descriptor of the same file, makes the commit durable: the
  counters ``written`` (commits returned, under the store's writer lock) and ``durable``
  (the ``written`` a completed sync read before it started) say which.
- The WAL file replaced: SQLite deletes the ``-wal`` only when its last connection closes,
  after a checkpoint that copied every frame into the database and synced both files
  (NORMAL syncs at checkpoints). A commit of ours in a deleted WAL is therefore already
  durable in the database file; a sync that finds a new file (another inode) opens it and
  syncs it, and a missing file leaves nothing to sync.
- A newly created WAL's directory entry: SQLite syncs the directory on the first sync of a
  WAL it created; the syncer does the same, once for each WAL file (inode) it meets, before
  counting that file's commits durable.
- Every write of a ``durability="full"`` store takes this path: enqueues, claims,
  completions, heartbeats, everything that commits a change.
- A failed fsync is final: Linux may drop the dirty pages it could not write and report
  success on the next fsync, so after one error no commit of this store is reported
  durable again in this process (each writer gets StoreError).

Only where ``os.fdatasync`` exists (Linux, most POSIX systems); elsewhere
``durability="full"`` commits with ``synchronous=FULL``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from threaddispatch.errors import StoreError, StoreUnavailableError

__all__ = ["AVAILABLE", "Syncer", "sync_file"]

#: Whether commits can be made durable outside the write lock on this platform.
AVAILABLE = hasattr(os, "fdatasync") and os.name == "posix"


def sync_file(fd: int) -> None:
    """The one flush of the WAL: ``os.fdatasync`` (tests replace it to count the syncs)."""
    os.fdatasync(fd)


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Syncer:
    """Makes this process's commits to one SQLite file durable, sharing one WAL fdatasync among them.

    Thread-safe. :meth:`committed` is called under the store's writer lock, just after a
    COMMIT returned; :meth:`wait_durable` after releasing it.
    """

    def __init__(self, path: str) -> None:
        self.wal = f"{path}-wal"
        self.directory = os.path.dirname(os.path.abspath(path))
        self._init_process_state()

    def _init_process_state(self) -> None:
        # _written: commits returned, incremented only under the store's writer lock (one writer
        # at a time), read without a lock (an int read is atomic). _lock guards the rest; on it,
        # _synced is notified when a sync ends.
        self._written = 0
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._durable = 0  # every commit numbered up to this is on disk
        self._syncing = False  # a thread is inside _sync
        self._failed: OSError | None = None
        # Only the syncing thread touches these: the open WAL and its (device, inode).
        self._fd = -1
        self._file: tuple[int, int] | None = None

    def reset_after_fork(self) -> None:
        """In a forked child: nobody syncing (the thread does not exist there); the WAL reopened on next sync."""
        inherited = self._fd
        self._init_process_state()
        if inherited >= 0:
            with contextlib.suppress(OSError):
                os.close(inherited)  # our own descriptor: SQLite holds no lock through the -wal file

    def close(self) -> None:
        """Close the WAL descriptor (a sync after this opens it again)."""
        with self._lock:
            fd, self._fd, self._file = self._fd, -1, None
        if fd >= 0:
            os.close(fd)

    def committed(self) -> int:
        """A COMMIT just returned; the caller holds the store's writer lock. Its number for :meth:`wait_durable`."""
        self._written += 1
        return self._written

    def wait_written(self, deadline: float) -> None:
        """:meth:`wait_durable` for every commit that has returned so far (the caller's among them)."""
        self.wait_durable(self._written, deadline)

    def wait_durable(self, commit: int, deadline: float) -> None:
        """Return once commit number ``commit`` is on disk: a sync started after it, by this thread or another.

        Raises StoreUnavailableError if that takes past ``deadline`` (time.monotonic), StoreError
        if a sync failed (then no later commit of this process is counted durable).
        """
        target = self._take_sync(commit, deadline)
        if target is None:
            return
        try:
            self._sync()
        except OSError as error:
            self._end_sync(None, error)
            raise StoreError(f"SQLite store error: fsync of {self.wal!r} failed: {error}") from error
        except BaseException:
            self._end_sync(None, None)
            raise
        self._end_sync(target, None)

    def _take_sync(self, commit: int, deadline: float) -> int | None:
        """Wait until ``commit`` is durable (None) or no sync runs; then this thread syncs: the commits it covers."""
        with self._lock:
            while True:
                if self._failed is not None:
                    raise StoreError(f"SQLite store error: fsync of {self.wal!r} failed: {self._failed}")
                if self._durable >= commit:
                    return None
                if not self._syncing:
                    self._syncing = True
                    return self._written  # every commit up to here returned before the sync starts
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreUnavailableError(
                        f"SQLite store unavailable: {self.wal!r}: no fsync covered this commit in time"
                    )
                self._synced.wait(remaining)

    def _end_sync(self, covered: int | None, error: OSError | None) -> None:
        """The sync ended: commits up to ``covered`` are durable (None: none more); ``error`` is final."""
        with self._lock:
            if covered is not None:
                self._durable = max(self._durable, covered)
            if error is not None:
                self._failed = error
            self._syncing = False
            self._synced.notify_all()

    def _sync(self) -> None:
        """fdatasync the current WAL file; only one thread at a time (``_syncing``)."""
        try:
            found = os.stat(self.wal)
        except FileNotFoundError:
            return  # deleted after a checkpoint that synced every frame into the database
        if self._file != (found.st_dev, found.st_ino):
            self._open()
            if self._fd < 0:
                return
        sync_file(self._fd)

    def _open(self) -> None:
        """Open the WAL now at its path (a new file: sync the directory entry that names it)."""
        old, self._fd, self._file = self._fd, -1, None
        if old >= 0:
            os.close(old)
        try:
            fd = os.open(self.wal, os.O_RDWR)  # never O_CREAT: SQLite creates it
        except FileNotFoundError:
            return
        try:
            opened = os.fstat(fd)
            _sync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._file = fd, (opened.st_dev, opened.st_ino)
