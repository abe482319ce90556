"""SQLiteStore's group commit: concurrent enqueues share one transaction: its one job.

An enqueuing thread that finds no commit running becomes the leader, takes everything
queued so far and writes it with its own jobs in ONE transaction on its own connection
(for new plain jobs one multi-row INSERT statement, no BEGIN/COMMIT; the index pages the jobs
share written once: less CPU and WAL per job);
threads that arrive meanwhile queue and sleep. It serves every durability: with
``durability="full"`` each commit is followed by an fsync the whole group shares; with
``"normal"`` (or ``synchronous="OFF"``) it saves the writer lock, the transaction and the
index writes per job, so several producers no longer queue one transaction each on the
file's writer lock (measured, 8 producers: ``normal`` made 6.2k enqueues/s alone against
``full``'s 8.7k grouped). With one producer there is never a group: the leader writes alone.

With a syncer (``durability="full"``), once the transaction has committed the leader waits,
outside the writer lock, for the
:class:`~threaddispatch.stores._sqlite_sync.Syncer`'s fsync covering its commit; then it
wakes each caller of its group once, settled, and hands the leadership to the first one
queued, which leads with all that queued meanwhile. (Handing the lead on before the sync,
so the next group is written while it runs, measured 3.4 enqueues per fsync against 3.9
with 4 producers, and no faster: a sync started during the next group's write covers only
one group.) There, a leader whose
group would be smaller than the last one waits up to ``linger`` (:data:`LINGER`) for the
callers the last commit released to queue again (PostgreSQL's ``commit_delay``/``commit_siblings``):
without it, groups alternate between a few callers and the rest. Without an fsync to share
the committer never lingers (``linger=0``): a commit is short, and what queues during one
goes into the next. Each caller returns only
after the commit holding its own jobs is durable (or with its own error: a failed group is
retried one request at a time, so one bad job fails only its caller; a failed sync fails the
whole group). No extra thread.

Wake-ups, measured on a loaded 2-core machine, are what the cycle between two fsyncs costs:
each caller sleeps on its own lock, released exactly once (settled, or made the leader), and
the lingering leader is woken once, when its group is complete, not at every arrival.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from threaddispatch.errors import StoreUnavailableError
from threaddispatch.stores._sqlite_sync import Syncer
from threaddispatch.stores.base import JobRecord

__all__ = ["LINGER", "Commit", "GroupCommitter"]

#: Seconds a leader of ``durability="full"`` waits for the last group's callers to queue again (far below an fsync).
LINGER = 0.001

#: Writes the requests' jobs in one transaction on the calling thread's connection; each request's ids.
Commit = Callable[[Sequence[Sequence[JobRecord]]], list[list[str]]]


class _Request:
    """One caller's jobs and outcome. ``wake`` is held from creation and released exactly once, by
    another thread holding the committer's lock: when the request is settled or made the leader."""

    __slots__ = ("done", "error", "ids", "jobs", "lead", "taken", "wake")

    def __init__(self, jobs: Sequence[JobRecord]) -> None:
        self.jobs = jobs
        self.wake = threading.Lock()
        self.wake.acquire()
        self.taken = False  # in a leader's batch: it will be settled, never dropped
        self.lead = False  # handed the leadership: its thread commits the next group
        self.done = False
        self.ids: list[str] = []
        self.error: BaseException | None = None


class GroupCommitter:
    """Joins concurrent enqueues into shared transactions; ``timeout`` bounds a caller's wait. Thread-safe.

    ``linger``: seconds a leader waits for the last group's size to queue again (0: never waits)."""

    def __init__(self, *, timeout: float, where: str, syncer: Syncer | None = None, linger: float = 0.0) -> None:
        self.timeout = timeout
        self.where = where
        self.syncer = syncer  # makes a group's commit durable after the lead is handed on (None: the commit did)
        self.linger = linger
        self._init_process_state()

    def _init_process_state(self) -> None:
        # _lock guards _queue, _leading, _want, _last_group and every _Request's taken/lead/done/ids/error.
        # On it, _queued is notified when the queue reaches _want (a lingering leader's group is complete).
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self._queue: deque[_Request] = deque()  # waiting for a leader, oldest first
        self._leading = False  # a thread is leading (lingering or committing)
        self._want = 0  # queued requests a lingering leader waits for (0: none lingers)
        self._last_group = 1  # requests in the last commit

    def reset_after_fork(self) -> None:
        """In a forked child: nothing queued, nobody leading (those threads do not exist there)."""
        self._init_process_state()

    def enqueue(self, jobs: Sequence[JobRecord], commit: Commit) -> list[str]:
        """Write ``jobs`` in a group commit (``commit`` runs here if this thread leads); their ids."""
        with self._lock:
            if not self._leading:  # nobody leads, so nobody is queued either
                self._leading = True
                if self.linger == 0 or self._last_group == 1:  # no reason to linger: lead alone at once
                    request = None
                else:
                    request = _Request(jobs)
                    request.lead = True
            else:
                request = _Request(jobs)
                self._queue.append(request)
                if self._want and len(self._queue) >= self._want:
                    self._queued.notify()
        if request is None:
            return self._lead_alone(jobs, commit)
        deadline = time.monotonic() + self.timeout
        if not request.lead and not request.wake.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self._give_up(request)
        if not request.done:  # made the leader
            self._lead(self._gather(request, deadline), commit, deadline)
        if request.error is not None:
            raise request.error
        return request.ids

    def _lead_alone(self, jobs: Sequence[JobRecord], commit: Commit) -> list[str]:
        """The uncontended path (one producer): commit ``jobs`` alone, no :class:`_Request` built; the callers
        that queue meanwhile go into the next group, as they would behind a group."""
        try:
            ids = commit([jobs])[0]
            if self.syncer is not None and ids:  # outside the writer lock: other writes go on meanwhile
                self.syncer.wait_written(time.monotonic() + self.timeout)
        finally:
            with self._lock:
                self._last_group = 1
                self._hand_on()
        return ids

    def _gather(self, leader: _Request, deadline: float) -> list[_Request]:
        """The leader's group: itself and what has queued, after lingering for the last group's size."""
        with self._lock:
            want = self._last_group - 1  # queued requests besides the leader's own
            if self.linger > 0 and len(self._queue) < want:
                linger_until = min(deadline, time.monotonic() + self.linger)
                self._want = want
                while len(self._queue) < want:
                    remaining = linger_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._queued.wait(remaining)
                self._want = 0
            batch = [leader, *self._queue]
            self._queue.clear()
            self._last_group = len(batch)
            for queued in batch:
                queued.taken = True
        return batch

    def _give_up(self, request: _Request) -> None:
        """The caller's deadline passed while it waited: leave the queue, or wait for what took it."""
        with self._lock:
            if not request.taken and not request.lead:
                self._queue.remove(request)
                raise StoreUnavailableError(
                    f"SQLite store unavailable: {self.where!r}: the group commit did not take this enqueue "
                    f"within {self.timeout:.3g}s"
                )
        # Taken by a leader (which settles every request of its batch in a finally), or made the
        # leader: either way ``wake`` is released, or is about to be.
        while not request.wake.acquire(timeout=self.timeout):
            pass

    def _lead(self, batch: list[_Request], commit: Commit, deadline: float) -> None:
        try:
            self._commit(batch, commit)
            if self.syncer is not None and any(request.ids for request in batch):
                self.syncer.wait_written(deadline)  # outside the writer lock: other writes go on meanwhile
        except BaseException as error:
            for request in batch:
                request.ids, request.error = [], request.error or error
            raise
        finally:
            self._settle(batch)

    @staticmethod
    def _commit(batch: list[_Request], commit: Commit) -> None:
        """Write the batch in one transaction; if that fails, each request alone (it gets its own outcome)."""
        try:
            for request, ids in zip(batch, commit([request.jobs for request in batch]), strict=True):
                request.ids = ids
        except Exception:
            if len(batch) == 1:
                raise
            for request in batch:
                try:
                    request.ids = commit([request.jobs])[0]
                except Exception as error:  # noqa: BLE001 - handed to its caller
                    request.error = error

    def _settle(self, batch: list[_Request]) -> None:
        """Wake each caller of ``batch`` (the leader's own, ``batch[0]``, is awake), then hand the lead on."""
        with self._lock:
            for request in batch:
                request.done = True
            for request in batch[1:]:
                request.wake.release()
            self._hand_on()

    def _hand_on(self) -> None:
        """With ``_lock`` held, as a leader ends: make the first queued caller the leader, or nobody."""
        if self._queue:
            successor = self._queue.popleft()
            successor.lead = True
            successor.wake.release()
        else:
            self._leading = False
