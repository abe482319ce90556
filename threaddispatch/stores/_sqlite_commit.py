"""SQLiteStore's group commit for ``durability="full"``: concurrent enqueues share one fsync: its one job.

With ``synchronous=FULL`` every commit waits for an fsync (milliseconds on most disks), so
writers committing one by one are bounded by the disk. :class:`GroupCommitter` joins them:
an enqueuing thread queues its jobs; if no commit is running it becomes the leader, takes
everything queued so far and writes it in ONE transaction on its own connection; threads
that queue meanwhile wait, and when the commit ends the next of them leads with all that
queued while it ran. A leader whose group would be smaller than the last one waits up to
:data:`LINGER` for the callers the last commit released to queue again (PostgreSQL's
``commit_delay``/``commit_siblings``): without it, groups alternate between a few callers and
the rest. Each caller returns only after the commit holding its own jobs (or
with its own error: a failed group is retried one request at a time, so one bad job fails
only its caller). No extra thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from threaddispatch.errors import StoreUnavailableError
from threaddispatch.stores.base import JobRecord

__all__ = ["LINGER", "Commit", "GroupCommitter"]

#: Seconds a leader waits for the last group's callers to queue again (far below an fsync).
LINGER = 0.001

#: Writes the requests' jobs in one transaction on the calling thread's connection; each request's ids.
Commit = Callable[[Sequence[Sequence[JobRecord]]], list[list[str]]]


class _Request:
    __slots__ = ("done", "error", "ids", "jobs", "taken")

    def __init__(self, jobs: Sequence[JobRecord]) -> None:
        self.jobs = jobs
        self.taken = False  # in a leader's batch: it will be settled, never dropped
        self.done = False
        self.ids: list[str] = []
        self.error: BaseException | None = None


class GroupCommitter:
    """Joins concurrent enqueues into shared transactions; ``timeout`` bounds a caller's wait. Thread-safe."""

    def __init__(self, *, timeout: float, where: str) -> None:
        self.timeout = timeout
        self.where = where
        self._init_process_state()

    def _init_process_state(self) -> None:
        # _lock guards _queue, _leading, _last_group and every _Request's taken/done/ids/error.
        # On it, _settled is notified when a leader's batch is settled, _queued when a request queues.
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._queued = threading.Condition(self._lock)
        self._queue: list[_Request] = []
        self._leading = False
        self._last_group = 1  # requests in the last commit

    def reset_after_fork(self) -> None:
        """In a forked child: nothing queued, nobody leading (those threads do not exist there)."""
        self._init_process_state()

    def enqueue(self, jobs: Sequence[JobRecord], commit: Commit) -> list[str]:
        """Write ``jobs`` in a group commit (``commit`` runs here if this thread leads); their ids."""
        request = _Request(jobs)
        deadline = time.monotonic() + self.timeout
        with self._lock:
            self._queue.append(request)
            self._queued.notify()
            while self._leading and not request.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._give_up(request)
                self._settled.wait(remaining)
            if not request.done:
                self._leading = True
                batch = self._take(min(deadline, time.monotonic() + LINGER))
        if not request.done:
            self._lead(batch, commit)
        if request.error is not None:
            raise request.error
        return request.ids

    def _take(self, linger_until: float) -> list[_Request]:
        """As the new leader (``_lock`` held): what has queued, after lingering for the last group's size."""
        while len(self._queue) < self._last_group:
            remaining = linger_until - time.monotonic()
            if remaining <= 0:
                break
            self._queued.wait(remaining)
        batch, self._queue = self._queue, []
        self._last_group = len(batch)
        for queued in batch:
            queued.taken = True
        return batch

    def _give_up(self, request: _Request) -> list[str]:
        """The caller's deadline passed while others committed; the caller holds ``_lock``."""
        if not request.taken:
            self._queue.remove(request)
            raise StoreUnavailableError(
                f"SQLite store unavailable: {self.where!r}: the group commit did not take this enqueue "
                f"within {self.timeout:.3g}s"
            )
        # Taken by a leader that has not finished: it settles every request in finally, so wait for that.
        while not request.done:
            self._settled.wait(self.timeout)
        if request.error is not None:
            raise request.error
        return request.ids

    def _lead(self, batch: list[_Request], commit: Commit) -> None:
        try:
            try:
                for request, ids in zip(batch, commit([request.jobs for request in batch]), strict=True):
                    request.ids = ids
            except Exception:
                if len(batch) == 1:
                    raise
                for request in batch:  # one at a time: each caller gets its own outcome
                    try:
                        request.ids = commit([request.jobs])[0]
                    except Exception as error:  # noqa: BLE001 - handed to its caller
                        request.error = error
        except BaseException as error:
            for request in batch:
                if not request.ids and request.error is None:
                    request.error = error
            raise
        finally:
            with self._lock:
                for request in batch:
                    request.done = True
                self._leading = False
                self._settled.notify_all()
