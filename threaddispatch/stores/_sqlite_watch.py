"""SQLiteStore's wake-ups: a process's subscribers and the watcher thread serving them: its one job.

SQLite has no NOTIFY. While an engine of this process is subscribed, one daemon thread per
store (``threaddispatch-sqlite-watch``) reads ``PRAGMA data_version`` on its own
connection every :data:`TICK` seconds after a change, backing off to :data:`IDLE_TICK`
while nothing changes: a few microseconds, touching only the WAL index in shared memory,
and it changes exactly when another connection (any process) committed.
On a change it reads the rows inserted since it last looked (``seq`` above the last one
seen, by the rowid: only the new rows) and

- for another process's ready job, calls every subscriber with ``(queue, run_at)`` at once
  (this process's own enqueues already woke its engines: the store notes their ``seq``
  ranges with :meth:`Watcher.note_own` and the watcher skips them);
- for a job due later (from any process, and those pending when the watcher started),
  keeps ``(run_at, queue)`` and calls the subscribers when it falls due (the thread sleeps
  until then, so a delayed job is announced within a millisecond or so of its ``run_at``).

It reads the ready log the same way (``dispatch_ready_log``, migration 8: its rows above the
last ``seq`` seen): the jobs an UPDATE made claimable, which no insert shows (a released
dependent, a job handed back at stop, reaped, requeued, a failed attempt's retry, and the
next job of a serial lock whose holder finished), and the queues resumed (migration 9: a row
``(queue, when resumed)``), written by row triggers in the updating transaction by any
process. Those rows are announced like inserted ones, now or when their ``run_at`` falls due,
this process's own too (a spurious wake-up costs an engine one claim; telling them apart would
cost every release a read). The log keeps about a minute (each write prunes it): a watcher
that fell further behind wakes its subscribers with "look now".

It also has the PASSIVE WAL checkpoints run (at most every :data:`CHECKPOINT_EVERY` seconds,
after changes) on a second thread, ``threaddispatch-sqlite-checkpoint``, so no commit of this
process stalls on one, nor an announcement behind a slow fsync. The engines' polling remains
the fallback (for a file not migrated to 8, or a store whose watcher was not running). Started
by the first subscriber, stopped by the last unsubscribe and by close; a forked child starts
with none.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from threaddispatch.errors import StoreError
from threaddispatch.stores._wakeups import Subscribers, WakeupCallback

__all__ = ["CHECKPOINT_EVERY", "IDLE_TICK", "TICK", "WakeupCallback", "WatchSource", "Watcher"]

_log = logging.getLogger("threaddispatch.stores.sqlite")

#: How often the watcher reads ``PRAGMA data_version`` (seconds) after a change ...
TICK = 0.01
#: ... growing by half each quiet look up to this (a new job waits at most this long for its wake-up).
IDLE_TICK = 0.03
#: The fewest seconds between two PASSIVE checkpoints by the watcher.
CHECKPOINT_EVERY = 0.1
_ROWS = 2_000  # new rows read per tick at most (a bigger batch is read over the next ticks)
_DUE_CAP = 1_024  # delayed jobs kept in memory; past it the earliest are kept and the rest re-read later
_RETRY = 1.0  # seconds between tries while the store fails


class WatchSource(Protocol):
    """The reads the watcher runs on its own connection (SQLiteStore's ``_watch_*`` methods)."""

    def _watch_version(self) -> int: ...

    def _watch_rows(self, after_seq: int, limit: int) -> tuple[int, list[tuple[int, str, float]]]: ...

    def _watch_released(self, after_seq: int, limit: int) -> tuple[int, int, list[tuple[int, str, float]]]: ...

    def _watch_later(self, after: float, limit: int) -> list[tuple[float, str]]: ...

    def _watch_checkpoint(self) -> None: ...


class Watcher(Subscribers["_Run"]):
    """This process's wake-up subscribers on one store, and the watcher thread that runs while there are any.

    Thread-safe. Callbacks run on the watcher thread with no lock held.
    """

    kind = "SQLiteStore"
    stop_wait = 1.0  # the last unsubscribe waits for the threads: a stopped engine leaves none behind

    def __init__(self, source: WatchSource, *, where: str) -> None:
        self.source = source
        super().__init__(where=repr(where), log=_log)

    def _init_process_state(self) -> None:
        super()._init_process_state()
        # Guarded by _lock: this process's inserted rows as sorted, disjoint [first, last] seq
        # ranges, noted after their commit while a watcher runs; the watcher drops those it has passed.
        self._own: list[list[int]] = []

    def _new_worker(self) -> _Run:
        return _Run(self)

    def note_own(self, first: int, last: int) -> None:
        """Rows ``first..last`` (seq) were inserted and committed by this process."""
        with self._lock:
            if self._own and self._own[-1][1] + 1 == first:
                self._own[-1][1] = last
            else:
                bisect.insort(self._own, [first, last])

    def _own_ranges(self, passed: int) -> list[list[int]]:
        """The own ranges; those wholly at or below ``passed`` (read for good) are forgotten for next time."""
        with self._lock:
            ranges = [list(span) for span in self._own]
            self._own = [span for span in self._own if span[1] > passed]
        return ranges


def _owned(seq: int, ranges: list[list[int]]) -> bool:
    index = bisect.bisect_right(ranges, [seq, float("inf")]) - 1
    return index >= 0 and ranges[index][0] <= seq <= ranges[index][1]


class _Run:
    """One watcher thread's state, and its checkpoint thread; only the watcher thread touches the
    fields below ``_checkpoint``."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self._stop = threading.Event()
        self._checkpoint = threading.Event()  # set: the checkpoint thread should run one
        self._version: int | None = None
        self._seq = -1  # the highest seq seen (-1: not read yet)
        self._log_seq = 0  # the highest ready log seq seen
        self._later: list[tuple[float, str]] = []  # delayed jobs, sorted by run_at, at most _DUE_CAP
        self._reread: float | None = None  # later jobs were dropped past this run_at: read them again
        self._checkpointed = 0.0
        self._dirty = True  # a change since the last checkpoint (at start: what others left in the WAL)
        self.threads = (
            threading.Thread(target=self._main, name="threaddispatch-sqlite-watch", daemon=True),
            threading.Thread(target=self._checkpoints, name="threaddispatch-sqlite-checkpoint", daemon=True),
        )

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the threads to leave; wait for them up to ``timeout`` in all (not for the calling one)."""
        self._stop.set()
        self._checkpoint.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _checkpoints(self) -> None:
        while not self._stop.is_set():
            if not self._checkpoint.wait(_RETRY):
                continue
            self._checkpoint.clear()
            if self._stop.is_set():
                return
            try:
                self.watcher.source._watch_checkpoint()
            except StoreError as error:
                _log.debug("SQLiteStore %s: checkpoint failed: %s", self.watcher.where, error)

    def _main(self) -> None:
        wait = 0.0
        tick = TICK
        failing = False
        while not self._stop.wait(wait) and self.watcher.is_current(self):
            try:
                changed = self._step()
            except StoreError as error:
                if not failing:
                    _log.warning("SQLiteStore %s watcher: %s; retrying every %.3gs", self.watcher.where, error, _RETRY)
                failing = True
                wait = _RETRY
                continue
            failing = False
            tick = TICK if changed else min(tick * 1.5, IDLE_TICK)
            wait = tick
            if self._later:
                wait = min(wait, max(0.0, self._later[0][0] - time.time()))

    def _step(self) -> bool:
        """One look; whether anything was committed since the last."""
        source = self.watcher.source
        if self._seq < 0:
            self._start(source)
        version = source._watch_version()
        changed = version != self._version
        if changed:
            self._version = version
            self._dirty = True
            self._read_new(source)
        self._announce_due(source)
        if self._dirty and time.monotonic() - self._checkpointed >= CHECKPOINT_EVERY:
            self._checkpoint.set()
            self._checkpointed = time.monotonic()
            self._dirty = False
        return changed

    def _start(self, source: WatchSource) -> None:
        """First step: the rows present are not news, but the jobs already waiting for a later run_at are."""
        self._version = source._watch_version()
        self._seq, _rows = source._watch_rows(2**63 - 1, 0)
        self._log_seq = source._watch_released(2**63 - 1, 0)[1]
        self._keep_later(source._watch_later(time.time(), _DUE_CAP + 1))
        # Jobs committed between the engine's first claim and this read: have it look once.
        self.watcher.wake([(None, None)])

    def _read_new(self, source: WatchSource) -> None:
        """Announce the ready jobs inserted, and those the ready log names, since the last read."""
        ready: dict[str, float] = {}
        if self._read_inserted(source, ready) | self._read_released(source, ready):
            self.watcher.wake([(None, None)])
        elif ready:
            self.watcher.wake(list(ready.items()))

    def _read_inserted(self, source: WatchSource, ready: dict[str, float]) -> bool:
        """Sort the new rows into ``ready`` (another process's) and ``_later``; whether to look everywhere."""
        highest, rows = source._watch_rows(self._seq, _ROWS)
        if highest < self._seq:
            # The newest rows were deleted and their seqs may be in use again: look everywhere.
            self._seq = highest
            return True
        self._seq = rows[-1][0] if len(rows) >= _ROWS else highest
        if len(rows) >= _ROWS:
            self._version = None  # more to read next tick
        own = self.watcher._own_ranges(self._seq)
        self._sort(rows, ready, lambda seq: _owned(seq, own))
        return False

    def _read_released(self, source: WatchSource, ready: dict[str, float]) -> bool:
        """Sort the new ready log rows (this process's too) into ``ready`` and ``_later``; whether to look
        everywhere (rows were pruned unread, or the log was emptied by hand)."""
        lowest, highest, rows = source._watch_released(self._log_seq, _ROWS)
        lost = highest < self._log_seq or (highest > self._log_seq and lowest > self._log_seq + 1)
        self._log_seq = rows[-1][0] if len(rows) >= _ROWS else highest
        if len(rows) >= _ROWS:
            self._version = None  # more to read next tick
        self._sort(rows, ready, lambda seq: False)
        return lost

    def _sort(self, rows: list[tuple[int, str, float]], ready: dict[str, float], skip: Callable[[int], bool]) -> None:
        """Jobs due by now into ``ready`` (queue -> earliest run_at) unless ``skip(seq)``; later ones kept."""
        now = time.time()
        later: list[tuple[float, str]] = []
        for seq, queue, run_at in rows:
            if run_at > now:
                later.append((run_at, queue))
            elif not skip(seq):
                ready[queue] = min(run_at, ready.get(queue, run_at))
        self._keep_later(later)

    def _keep_later(self, jobs: list[tuple[float, str]]) -> None:
        if not jobs:
            return
        self._later.extend(jobs)
        self._later.sort()
        if len(self._later) > _DUE_CAP:
            dropped = self._later[_DUE_CAP][0]
            del self._later[_DUE_CAP:]
            self._reread = dropped if self._reread is None else min(self._reread, dropped)

    def _announce_due(self, source: WatchSource) -> None:
        now = time.time()
        count = bisect.bisect_right(self._later, (now, "\U0010ffff"))
        if count:
            due: dict[str | None, float | None] = {}
            for run_at, queue in self._later[:count]:
                due.setdefault(queue, run_at)
            del self._later[:count]
            self.watcher.wake(list(due.items()))
        if not self._later and self._reread is not None:
            after, self._reread = self._reread, None
            self._keep_later(source._watch_later(min(after, now) - 1e-6, _DUE_CAP + 1))
