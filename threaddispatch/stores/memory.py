"""MemoryStore: the job store in a dict, for tests and single-process use.

Nothing survives the process; a forked child starts with an empty store (the parent's
jobs stay the parent's). Claims use a heap per queue (priority, run_at, insertion) and
a heap of delayed jobs, so a claim costs O(k log n) for k jobs.
It runs past 600 lines because it implements the whole Store interface (jobs,
dependencies, locks, limits, dead letters, crons, leases, workers) under one lock and one
set of heaps; a split would put the same lock's invariants in several files.

Wake-ups (:meth:`MemoryStore.subscribe_wakeups`): the engines sharing one store learn of each
other's jobs at once. The calls that make a job claimable note ``(queue, run_at)`` under the
lock (the events PostgreSQL's triggers NOTIFY: a job stored ready, a retry at its time, a
dependent released, a serial lock's next turn once its job finished or its hold went, a
hand-back, a reap, a requeue or replay, a queue resumed) and, once the lock is released, call
the subscribers on that call's thread. With no subscriber nothing is noted.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence

from threaddispatch import _lifecycle
from threaddispatch.errors import ConfigurationError, InvalidStateError, JobNotFoundError, StoreError
from threaddispatch.stores._wakeups import InlineSubscribers, WakeupCallback
from threaddispatch.stores.base import (
    ACTIVE_STATES,
    FINAL_STATES,
    READY_STATES,
    WORKER_LOST_ERROR,
    Completion,
    CronEntry,
    DeadLetter,
    JobRecord,
    JobState,
    LockHold,
    QueueLimits,
    Store,
    WorkerInfo,
    key_held,
    limited_room,
    requeue_waits,
)

__all__ = ["MemoryStore"]

_FAILED = frozenset({JobState.FAILED, JobState.CANCELLED})
_log = logging.getLogger("threaddispatch.stores.memory")


class _Wakeups(InlineSubscribers):
    kind = "MemoryStore"


class MemoryStore(Store):
    """A :class:`~threaddispatch.stores.Store` held in memory. Thread-safe; one lock, short holds."""

    def __init__(self) -> None:
        self._init_state()
        _lifecycle.register(self)

    def _init_state(self) -> None:
        # _lock guards every field below. Invariants: a job id is in _running iff its state is
        # running; _unique[key] is the id of the ACTIVE job holding key; a job is claimable iff
        # its heap entry's token equals _tokens[id] and its state is ready.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._jobs: dict[str, JobRecord] = {}
        self._order: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._ready: dict[str, list[tuple[int, float, int, str, int]]] = {}
        self._delayed: list[tuple[float, int, str, int]] = []
        self._running: set[str] = set()
        self._unique: dict[str, str] = {}
        self._dead: dict[str, DeadLetter] = {}
        self._crons: dict[str, CronEntry] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._paused: set[str] = set()
        self._workers: dict[str, WorkerInfo] = {}  # the worker registry, by worker id
        # job id -> the waiting jobs that still wait for it, in the order they began waiting (an
        # ordered set: a job run again is listed once, found in O(1)); the entry goes when the job finishes
        self._dependents: dict[str, dict[str, None]] = {}
        # serial lock -> the ids of the ACTIVE jobs holding it
        self._locked: dict[str, set[str]] = {}
        # Lock holds past the running state, by claim (job id, attempts, worker id); and how many
        # holds each lock has (a lock is in _held iff some hold names it).
        self._holds: dict[tuple[str, int, str], LockHold] = {}
        self._held: dict[str, int] = {}
        # queue -> its limits (set_queue_limits), and its bucket as [tokens, updated_at]
        self._limits: dict[str, QueueLimits] = {}
        self._buckets: dict[str, list[float]] = {}
        self._serial = itertools.count(1)
        # The wake-ups: the subscribers of this process (a forked child has none), and what the
        # writes since the last delivery made claimable, queue -> earliest run_at (as
        # PostgreSQL's insert trigger: one per queue). Noted only while someone is subscribed;
        # taken under the lock and delivered with none held (:meth:`_deliver`).
        self._wakeups = _Wakeups(where="(in memory)", log=_log)
        self._due: dict[str, float] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def migrate(self) -> int:
        """Nothing to create; returns 1. Non-blocking."""
        return 1

    def close(self) -> None:
        """Drop everything; later calls raise StoreError. Idempotent."""
        with self._lock:
            self._closed = True
            self._jobs.clear()
            self._due.clear()
        self._wakeups.close()
        _lifecycle.unregister(self)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("MemoryStore is closed")

    def _reset_after_fork(self) -> None:
        self._init_state()

    # -- wake-ups ----------------------------------------------------------------------------------

    def subscribe_wakeups(self, callback: WakeupCallback) -> Callable[[], None]:
        """Have ``callback(queue, run_at)`` called when jobs become claimable in this store.

        Called on the thread whose store call made them so (another engine's enqueue,
        completion, retry...), after the store's lock is released, before that call returns;
        a callback that raises is logged, never raised to that caller. It must be quick and
        must not wait for another thread that may be calling this store. Returns an
        idempotent unsubscribe function. Non-blocking; StoreError once closed.
        """
        if not callable(callback):
            raise ConfigurationError(f"wake-up callback must be callable, got {callback!r}")
        return self._wakeups.subscribe(callback)

    def _note_ready(self, queue: str, run_at: float) -> None:
        """Lock held, someone subscribed: jobs of ``queue`` are claimable from ``run_at``."""
        if run_at < self._due.get(queue, math.inf):
            self._due[queue] = run_at

    def _note_turn(self, lock: str) -> None:
        """Lock held, someone subscribed: ``lock`` may be free; note its next job if that one is ready."""
        holders = self._locked.get(lock)
        if not holders or lock in self._held:
            return
        turn = self._jobs[min(holders, key=self._order.__getitem__)]
        if turn.state in READY_STATES:
            self._note_ready(turn.queue, turn.run_at)

    def _deliver(self) -> None:
        """No lock held: call the subscribers with what was noted (whoever takes the notes delivers them)."""
        with self._lock:
            due, self._due = self._due, {}
        if due:
            self._wakeups.wake(list(due.items()))

    # -- internal helpers (call with _lock held) ---------------------------------------------------

    def _schedule(self, job: JobRecord) -> None:
        token = self._tokens.get(job.id, 0) + 1
        self._tokens[job.id] = token
        heapq.heappush(self._delayed, (job.run_at, self._order[job.id], job.id, token))

    def _set_state(self, job: JobRecord, state: JobState, now: float) -> None:
        if job.unique_key is not None:
            if state in ACTIVE_STATES:
                self._unique[job.unique_key] = job.id
            elif self._unique.get(job.unique_key) == job.id:
                del self._unique[job.unique_key]
        if state is JobState.RUNNING:
            self._running.add(job.id)
        else:
            self._running.discard(job.id)
        if job.lock is not None:
            self._hold_lock(job, state in ACTIVE_STATES)
        job.state = state
        job.updated_at = now
        if state in FINAL_STATES:
            job.finished_at = now
            job.waiting_on = 0
        if state in READY_STATES:
            job.worker_id = None
            self._schedule(job)
            if self._wakeups.active:
                self._note_ready(job.queue, job.run_at)
        if state in FINAL_STATES and job.id in self._dependents:
            self._release(job.id, state, now)

    def _release(self, job_id: str, state: JobState, now: float) -> None:
        """Count the finished job ``job_id`` off its waiting dependents (a worklist: a chain does not recurse)."""
        work = [(job_id, state)]
        while work:
            finished, ended = work.pop()
            for dependent_id in self._dependents.pop(finished, ()):
                dependent = self._jobs.get(dependent_id)
                if dependent is None or dependent.state is not JobState.WAITING:
                    continue
                if ended is not JobState.COMPLETED and dependent.on_dependency_failure == "cancel":
                    dependent.error = f"dependency {finished} {ended.value}"
                    dependent.state = JobState.CANCELLED
                    dependent.updated_at = dependent.finished_at = now
                    dependent.waiting_on = 0
                    self._drop_unique(dependent)
                    work.append((dependent_id, JobState.CANCELLED))
                    continue
                dependent.waiting_on -= 1
                if dependent.waiting_on <= 0:
                    dependent.waiting_on = 0
                    self._set_state(dependent, JobState.PENDING, now)

    def _drop_unique(self, job: JobRecord) -> None:
        if job.unique_key is not None and self._unique.get(job.unique_key) == job.id:
            del self._unique[job.unique_key]
        if job.lock is not None:
            self._hold_lock(job, False)

    def _hold_lock(self, job: JobRecord, active: bool) -> None:
        assert job.lock is not None
        holders = self._locked.setdefault(job.lock, set())
        if active:
            holders.add(job.id)
        else:
            holders.discard(job.id)
            if not holders:
                del self._locked[job.lock]
            elif self._wakeups.active:
                self._note_turn(job.lock)

    def _lock_busy(self, job: JobRecord) -> bool:
        """Whether ``job``'s serial lock is not its turn: a holder runs, or one inserted before it is active."""
        if job.lock is None:
            return False
        if job.lock in self._held:
            return True
        order = self._order[job.id]
        for holder_id in self._locked.get(job.lock, ()):
            holder = self._jobs[holder_id]
            if holder_id != job.id and (holder.state is JobState.RUNNING or self._order[holder_id] < order):
                return True
        return False

    def _add_hold(self, job: JobRecord, now: float) -> None:
        """Keep the running ``job``'s lock held past its running state (see :class:`LockHold`)."""
        assert job.lock is not None and job.worker_id is not None
        key = (job.id, job.attempts, job.worker_id)
        if key not in self._holds:
            self._held[job.lock] = self._held.get(job.lock, 0) + 1
        self._holds[key] = LockHold(job.lock, job.id, job.attempts, job.worker_id, now)

    def _drop_hold(self, key: tuple[str, int, str]) -> None:
        hold = self._holds.pop(key)
        left = self._held[hold.lock] - 1
        if left:
            self._held[hold.lock] = left
        else:
            del self._held[hold.lock]
            if self._wakeups.active:
                self._note_turn(hold.lock)

    def _check_dependencies(self, jobs: Sequence[JobRecord]) -> None:
        """JobNotFoundError unless every dependency of ``jobs`` is stored or comes earlier in ``jobs``."""
        earlier: set[str] = set()
        for job in jobs:
            for dependency in job.depends_on:
                if dependency not in self._jobs and dependency not in earlier:
                    raise JobNotFoundError(f"job {job.id!r} depends on {dependency!r}: no job with that id")
            earlier.add(job.id)

    def _settle_new(self, job: JobRecord) -> None:
        """Decide the state of a new ``job`` with dependencies (stored, not yet placed) and note what it waits for."""
        unfinished = [d for d in dict.fromkeys(job.depends_on) if self._jobs[d].state not in FINAL_STATES]
        failed = next((self._jobs[d] for d in job.depends_on if self._jobs[d].state in _FAILED), None)
        if failed is not None and job.on_dependency_failure == "cancel":
            job.state, job.finished_at, job.waiting_on = JobState.CANCELLED, job.created_at, 0
            job.error = f"dependency {failed.id} {failed.state.value}"
        elif unfinished:
            job.state, job.waiting_on = JobState.WAITING, len(unfinished)
            for dependency in unfinished:
                self._dependents.setdefault(dependency, {})[job.id] = None
        else:
            job.state, job.waiting_on = JobState.PENDING, 0

    def _rerun_waits(self, job: JobRecord, subject: str) -> list[str]:
        """The checks of a job run again (requeued, or a replayed dead letter's new job), named ``subject``:
        InvalidStateError while an active job holds its unique key or a dependency refuses
        (:func:`requeue_waits`); else the dependencies it waits for."""
        if job.unique_key is not None and job.unique_key in self._unique:
            raise key_held(subject, job.unique_key, self._unique[job.unique_key])
        if not job.depends_on:
            return []
        states = {d: (self._jobs[d].state.value if d in self._jobs else None) for d in job.depends_on}
        return requeue_waits(job.id, job.depends_on, job.on_dependency_failure, states, subject=subject)

    def _place_again(self, job: JobRecord, waits: Sequence[str], now: float) -> None:
        """Put the stored ``job`` run again in its state: waiting for ``waits`` (:meth:`_rerun_waits`), else pending."""
        for dependency in waits:
            # Not twice: a job cancelled while it waited may still be listed under a dependency.
            self._dependents.setdefault(dependency, {})[job.id] = None
        job.waiting_on = len(waits)
        self._set_state(job, JobState.WAITING if waits else JobState.PENDING, now)

    def _insert(self, job: JobRecord) -> str:
        if job.unique_key is not None and job.unique_key in self._unique:
            return self._unique[job.unique_key]
        if job.id in self._jobs:
            raise StoreError(f"job id {job.id!r} already exists")
        stored = job.copy()  # the caller keeps its record: the store's is its own
        if stored.depends_on:
            self._settle_new(stored)
        self._jobs[job.id] = stored
        self._order[job.id] = next(self._serial)
        self._set_state(stored, stored.state, stored.updated_at or stored.created_at)
        return job.id

    def _claim_of(self, job_id: str, worker_id: str | None, attempts: int | None) -> JobRecord | None:
        job = self._jobs.get(job_id)
        if job is None or job.state is not JobState.RUNNING:
            return None
        if worker_id is not None and job.worker_id != worker_id:
            return None
        if attempts is not None and job.attempts != attempts:
            return None
        return job

    def _complete_claim(
        self, job_id: str, worker_id: str, attempts: int, *, result: str | None, error: str | None, now: float
    ) -> bool:
        job = self._claim_of(job_id, worker_id, attempts)
        if job is None:
            return False
        job.result = result
        job.error = error
        self._set_state(job, JobState.COMPLETED, now)
        return True

    def _dead_letter(self, job: JobRecord, error: str | None, now: float) -> DeadLetter:
        letter = DeadLetter(
            id=f"dl-{next(self._serial)}",
            job_id=job.id,
            name=job.name,
            queue=job.queue,
            payload=job.payload,
            priority=job.priority,
            max_retries=job.max_retries,
            attempts=job.attempts,
            error=error,
            failed_at=now,
            trace_context=job.trace_context,
            unique_key=job.unique_key,
            lock=job.lock,
            depends_on=job.depends_on,
            on_dependency_failure=job.on_dependency_failure,
            timeout=job.timeout,
        )
        self._dead[letter.id] = letter
        return dataclasses.replace(letter)

    # -- producers ---------------------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[str]:
        """See :meth:`Store.enqueue`. Holds the lock for the whole batch (all or nothing)."""
        with self._lock:
            self._check_open()
            ids = {job.id for job in jobs}
            clash = next((job.id for job in jobs if job.id in self._jobs), None)
            if clash is not None or len(ids) != len(jobs):
                raise StoreError(f"job id {clash!r} already exists" if clash else "duplicate job ids in one batch")
            self._check_dependencies(jobs)
            stored = [self._insert(job) for job in jobs]
        if self._due:
            self._deliver()
        return stored

    # -- workers -------------------------------------------------------------------------------------

    def set_queue_limits(self, limits: Sequence[QueueLimits], *, now: float) -> None:
        """See :meth:`Store.set_queue_limits` (this process is the whole cluster)."""
        with self._lock:
            for queue_limits in limits:
                queue = queue_limits.queue
                self._limits[queue] = queue_limits
                tokens, updated = self._buckets.get(queue, (float(queue_limits.rate_burst), now))
                self._buckets[queue] = [min(tokens, float(queue_limits.rate_burst)), updated]

    def _limited_room(self, queues: Sequence[str], limit: int, now: float) -> dict[str, int]:
        """The room of each limited queue of ``queues``, its bucket refilled to ``now`` (_lock held)."""
        room: dict[str, int] = {}
        for queue in queues:
            limits = self._limits.get(queue)
            if limits is None:
                continue
            bucket = self._buckets[queue]
            running = sum(1 for job_id in self._running if self._jobs[job_id].queue == queue)
            room[queue], bucket[0] = limited_room(limits, bucket[0], bucket[1], running, limit, now=now)
            bucket[1] = max(bucket[1], now)
        return room

    def claim(self, queues: Sequence[str], limit: int, *, worker_id: str, now: float) -> list[JobRecord]:
        """See :meth:`Store.claim`."""
        claimed: list[JobRecord] = []
        if limit <= 0 or not queues:
            return claimed
        with self._lock:
            self._check_open()
            delayed = self._delayed
            while delayed and delayed[0][0] <= now:
                run_at, order, job_id, token = heapq.heappop(delayed)
                job = self._jobs.get(job_id)
                if job is None or self._tokens.get(job_id) != token or job.state not in READY_STATES:
                    continue
                heapq.heappush(self._ready.setdefault(job.queue, []), (-job.priority, run_at, order, job_id, token))
            room = self._limited_room(queues, limit, now) if self._limits else {}
            heaps = [
                heap for queue in dict.fromkeys(queues) if room.get(queue, 1) > 0 and (heap := self._ready.get(queue))
            ]
            waiting_turn: list[tuple[list[tuple[int, float, int, str, int]], tuple[int, float, int, str, int]]] = []
            while len(claimed) < limit:
                best: list[tuple[int, float, int, str, int]] | None = None
                for heap in heaps:
                    while heap:
                        _, _, _, job_id, token = heap[0]
                        job = self._jobs.get(job_id)
                        if job is not None and self._tokens.get(job_id) == token and job.state in READY_STATES:
                            break
                        heapq.heappop(heap)
                    if heap and (best is None or heap[0] < best[0]):
                        best = heap
                if best is None:
                    break
                entry = heapq.heappop(best)
                job = self._jobs[entry[3]]
                if self._lock_busy(job):
                    waiting_turn.append((best, entry))  # still ready: back in its heap after this claim
                    continue
                self._tokens[job.id] += 1
                self._set_state(job, JobState.RUNNING, now)
                job.worker_id = worker_id
                job.attempts += 1
                job.started_at = job.heartbeat_at = now
                claimed.append(job.copy())
                if job.queue in room:
                    room[job.queue] -= 1
                    self._buckets[job.queue][0] -= 1
                    if room[job.queue] <= 0:
                        heaps = [heap for heap in heaps if heap is not best]
            for heap, entry in waiting_turn:
                heapq.heappush(heap, entry)
        return claimed

    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat`."""
        alive: set[str] = set()
        with self._lock:
            self._check_open()
            for job_id in job_ids:
                job = self._claim_of(job_id, worker_id, None)
                if job is not None:
                    job.heartbeat_at = now
                    alive.add(job_id)
        return alive

    def reap_stale(self, *, older_than: float, now: float) -> list[str]:
        """See :meth:`Store.reap_stale`."""
        reaped: list[str] = []
        with self._lock:
            self._check_open()
            for key in [key for key, hold in self._holds.items() if hold.heartbeat_at < older_than]:
                self._drop_hold(key)
            for job_id in list(self._running):
                job = self._jobs[job_id]
                if job.heartbeat_at is not None and job.heartbeat_at >= older_than:
                    continue
                reaped.append(job_id)
                if job.attempts >= job.max_retries + 1:
                    job.error = WORKER_LOST_ERROR
                    self._set_state(job, JobState.FAILED, now)
                    self._dead_letter(job, job.error, now)
                else:
                    job.run_at = now
                    self._set_state(job, JobState.PENDING, now)
        if self._due:
            self._deliver()
        return reaped

    def complete(
        self, job_id: str, *, worker_id: str, attempts: int, result: str | None, now: float, error: str | None = None
    ) -> bool:
        """See :meth:`Store.complete`."""
        with self._lock:
            self._check_open()
            done = self._complete_claim(job_id, worker_id, attempts, result=result, error=error, now=now)
        if self._due:
            self._deliver()
        return done

    def complete_many(self, outcomes: Sequence[Completion], *, now: float) -> set[str]:
        """See :meth:`Store.complete_many`."""
        done: set[str] = set()
        with self._lock:
            self._check_open()
            for job_id, worker_id, attempts, result, error in outcomes:
                if self._complete_claim(job_id, worker_id, attempts, result=result, error=error, now=now):
                    done.add(job_id)
        if self._due:
            self._deliver()
        return done

    def retry_later(
        self, job_id: str, *, worker_id: str, attempts: int, run_at: float, error: str | None, now: float
    ) -> bool:
        """See :meth:`Store.retry_later`."""
        with self._lock:
            self._check_open()
            job = self._claim_of(job_id, worker_id, attempts)
            if job is None:
                return False
            job.error = error
            job.run_at = run_at
            self._set_state(job, JobState.RETRYING, now)
        if self._due:
            self._deliver()
        return True

    def fail(
        self, job_id: str, *, worker_id: str | None, attempts: int | None, error: str | None, now: float
    ) -> DeadLetter | None:
        """See :meth:`Store.fail`."""
        with self._lock:
            self._check_open()
            if worker_id is None and attempts is None:
                job = self._jobs.get(job_id)
                if job is None:
                    raise JobNotFoundError(f"no job with id {job_id!r}")
            else:
                job = self._claim_of(job_id, worker_id, attempts)
                if job is None:
                    return None
            job.error = error
            self._set_state(job, JobState.FAILED, now)
            letter = self._dead_letter(job, error, now)
        if self._due:
            self._deliver()
        return letter

    def release(self, job_ids: Sequence[str], *, worker_id: str, now: float, refund_attempt: bool = True) -> int:
        """See :meth:`Store.release`."""
        released = 0
        with self._lock:
            self._check_open()
            for job_id in job_ids:
                job = self._claim_of(job_id, worker_id, None)
                if job is None:
                    continue
                if refund_attempt:
                    job.attempts = max(0, job.attempts - 1)
                job.run_at = now
                self._set_state(job, JobState.PENDING, now)
                released += 1
        if self._due:
            self._deliver()
        return released

    # -- management --------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """See :meth:`Store.get`."""
        with self._lock:
            self._check_open()
            job = self._jobs.get(job_id)
            return None if job is None else job.copy()

    def list_jobs(
        self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """See :meth:`Store.list_jobs`. O(n log n) over the stored jobs."""
        self._check_limit(limit, offset)
        with self._lock:
            self._check_open()
            jobs = [
                job
                for job in self._jobs.values()
                if (state is None or job.state is JobState(state)) and (queue is None or job.queue == queue)
            ]
            jobs.sort(key=lambda job: (job.created_at, self._order[job.id]), reverse=True)
            return [job.copy() for job in jobs[offset : offset + limit]]

    def counts(self, *, queue: str | None = None) -> dict[JobState, int]:
        """See :meth:`Store.counts`. O(n)."""
        result = dict.fromkeys(JobState, 0)
        with self._lock:
            self._check_open()
            for job in self._jobs.values():
                if queue is None or job.queue == queue:
                    result[job.state] += 1
        return result

    def counts_by_queue(self, queues: Sequence[str]) -> dict[str, dict[JobState, int]]:
        """See :meth:`Store.counts_by_queue`: one pass over the jobs under the lock. O(n)."""
        result = {queue: dict.fromkeys(JobState, 0) for queue in queues}
        with self._lock:
            self._check_open()
            for job in self._jobs.values():
                counts = result.get(job.queue)
                if counts is not None:
                    counts[job.state] += 1
        return result

    def throughput(self, *, since: float, now: float, bucket: float = 60.0) -> list[tuple[int, JobState, int]]:
        """See :meth:`Store.throughput`: one pass over the jobs under the lock. O(n)."""
        found: dict[tuple[int, JobState], int] = {}
        with self._lock:
            self._check_open()
            for job in self._jobs.values():
                done = job.finished_at
                if job.state in (JobState.COMPLETED, JobState.FAILED) and done is not None and since <= done < now:
                    key = (int((done - since) // bucket), job.state)
                    found[key] = found.get(key, 0) + 1
        return [(index, state, count) for (index, state), count in found.items()]

    def cancel(
        self,
        job_id: str,
        *,
        now: float,
        worker_id: str | None = None,
        attempts: int | None = None,
        error: str | None = None,
        include_running: bool = True,
    ) -> bool:
        """See :meth:`Store.cancel`. The check and the change happen under one hold of the lock."""
        with self._lock:
            self._check_open()
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            if worker_id is not None or attempts is not None:
                if self._claim_of(job_id, worker_id, attempts) is None:
                    return False
            elif job.state in FINAL_STATES or (job.state is JobState.RUNNING and not include_running):
                return False
            elif job.state is JobState.RUNNING and job.lock is not None:
                self._add_hold(job, now)  # its handler may still run: the lock stays held until it returns
            if error is not None:
                job.error = error
            self._set_state(job, JobState.CANCELLED, now)
        if self._due:
            self._deliver()
        return True

    def requeue(self, job_id: str, *, now: float) -> None:
        """See :meth:`Store.requeue`."""
        with self._lock:
            self._check_open()
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            if job.state not in (JobState.FAILED, JobState.CANCELLED):
                raise InvalidStateError(f"job {job_id!r} is {job.state.value}; only failed or cancelled jobs requeue")
            waits = self._rerun_waits(job, f"job {job_id!r}")
            for letter_id in [k for k, letter in self._dead.items() if letter.job_id == job_id]:
                del self._dead[letter_id]
            job.attempts = 0
            job.run_at = now
            job.finished_at = None
            job.result = None
            self._place_again(job, waits, now)
        if self._due:
            self._deliver()

    def purge_finished(self, *, older_than: float) -> int:
        """See :meth:`Store.purge_finished`."""
        with self._lock:
            self._check_open()
            doomed = [
                job.id
                for job in self._jobs.values()
                if job.state in FINAL_STATES and job.finished_at is not None and job.finished_at < older_than
            ]
            for job_id in doomed:
                del self._jobs[job_id]
                del self._order[job_id]
                self._tokens.pop(job_id, None)
            return len(doomed)

    # -- dead letters ------------------------------------------------------------------------------

    def list_dead_letters(self, *, queue: str | None = None, limit: int = 50, offset: int = 0) -> list[DeadLetter]:
        """See :meth:`Store.list_dead_letters`."""
        self._check_limit(limit, offset)
        with self._lock:
            self._check_open()
            # Newest first by failed_at (then insertion), as the SQL stores: keyset pages rely on it.
            matching = [(letter.failed_at, n, letter) for n, letter in enumerate(self._dead.values())]
            matching.sort(key=lambda item: (item[0], item[1]), reverse=True)
            letters = [letter for _, _, letter in matching if queue is None or letter.queue == queue]
            return [dataclasses.replace(letter) for letter in letters[offset : offset + limit]]

    def count_dead_letters(self, *, queue: str | None = None) -> int:
        """See :meth:`Store.count_dead_letters`: one pass under the lock."""
        with self._lock:
            self._check_open()
            return sum(1 for letter in self._dead.values() if queue is None or letter.queue == queue)

    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """See :meth:`Store.get_dead_letter`."""
        with self._lock:
            self._check_open()
            letter = self._dead.get(dead_letter_id)
            return None if letter is None else dataclasses.replace(letter)

    def replay_dead_letter(self, dead_letter_id: str, *, job: JobRecord) -> str:
        """See :meth:`Store.replay_dead_letter`."""
        with self._lock:
            self._check_open()
            if dead_letter_id not in self._dead:
                raise JobNotFoundError(f"no dead letter with id {dead_letter_id!r}")
            if job.id in self._jobs:
                raise StoreError(f"job id {job.id!r} already exists")
            waits = self._rerun_waits(job, f"the job of dead letter {dead_letter_id!r}")  # before any change
            stored = job.copy()  # the caller keeps its record: the store's is its own
            self._jobs[job.id] = stored
            self._order[job.id] = next(self._serial)
            self._place_again(stored, waits, stored.updated_at or stored.created_at)
            del self._dead[dead_letter_id]
        if self._due:
            self._deliver()
        return job.id

    def purge_dead_letters(self, *, older_than: float | None = None) -> int:
        """See :meth:`Store.purge_dead_letters`."""
        with self._lock:
            self._check_open()
            doomed = [k for k, letter in self._dead.items() if older_than is None or letter.failed_at < older_than]
            for letter_id in doomed:
                del self._dead[letter_id]
            return len(doomed)

    # -- queues ------------------------------------------------------------------------------------

    def set_queue_paused(self, queue: str, paused: bool, *, now: float) -> None:
        """See :meth:`Store.set_queue_paused`."""
        with self._lock:
            self._check_open()
            if paused:
                self._paused.add(queue)
            else:
                self._paused.discard(queue)
                if self._wakeups.active:
                    self._note_ready(queue, now)  # as PostgreSQL's resume: every resume, paused or not
        if self._due:
            self._deliver()

    def paused_queues(self) -> set[str]:
        """See :meth:`Store.paused_queues`."""
        with self._lock:
            self._check_open()
            return set(self._paused)

    # -- cron and leases ----------------------------------------------------------------------------

    def acquire_lease(self, name: str, *, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`Store.acquire_lease`."""
        with self._lock:
            self._check_open()
            current = self._leases.get(name)
            if current is not None and current[0] != holder and current[1] > now:
                return False
            self._leases[name] = (holder, now + ttl)
            return True

    def release_lease(self, name: str, *, holder: str) -> None:
        """See :meth:`Store.release_lease`."""
        with self._lock:
            current = self._leases.get(name)
            if current is not None and current[0] == holder:
                del self._leases[name]

    def upsert_cron(self, entry: CronEntry, *, now: float) -> CronEntry:
        """See :meth:`Store.upsert_cron`."""
        with self._lock:
            self._check_open()
            current = self._crons.get(entry.name)
            stored = dataclasses.replace(entry, updated_at=now)
            if current is None:
                stored.created_at = now
            else:
                stored.created_at = current.created_at
                stored.last_tick = current.last_tick
            self._crons[entry.name] = stored
            return dataclasses.replace(stored)

    def list_crons(self) -> list[CronEntry]:
        """See :meth:`Store.list_crons`."""
        with self._lock:
            self._check_open()
            return [dataclasses.replace(self._crons[name]) for name in sorted(self._crons)]

    def delete_cron(self, name: str) -> bool:
        """See :meth:`Store.delete_cron`."""
        with self._lock:
            self._check_open()
            return self._crons.pop(name, None) is not None

    def fire_cron(self, name: str, *, tick: float, job: JobRecord) -> bool:
        """See :meth:`Store.fire_cron`."""
        with self._lock:
            self._check_open()
            entry = self._crons.get(name)
            if entry is None:
                raise JobNotFoundError(f"no cron entry named {name!r}")
            if entry.last_tick is not None and entry.last_tick >= tick:
                return False
            entry.last_tick = tick
            entry.updated_at = job.created_at
            busy = job.lock is not None and (self._locked.get(job.lock) or job.lock in self._held)
            if not (entry.overlap == "skip" and busy):
                self._insert(job)
        if self._due:
            self._deliver()
        return True

    # -- lock holds ------------------------------------------------------------------------------

    def hold_locks(self, claims: Sequence[tuple[str, int]], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.hold_locks`."""
        held: set[str] = set()
        with self._lock:
            self._check_open()
            for job_id, attempts in claims:
                job = self._claim_of(job_id, worker_id, attempts)
                if job is not None and job.lock is not None:
                    self._add_hold(job, now)
                    held.add(job_id)
        return held

    def heartbeat_holds(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """See :meth:`Store.heartbeat_holds`. O(holds)."""
        wanted = set(job_ids)
        beaten: set[str] = set()
        with self._lock:
            self._check_open()
            for key, hold in self._holds.items():
                if hold.worker_id == worker_id and hold.job_id in wanted:
                    self._holds[key] = dataclasses.replace(hold, heartbeat_at=now)
                    beaten.add(hold.job_id)
        return beaten

    def release_holds(self, claims: Sequence[tuple[str, int]], *, worker_id: str) -> int:
        """See :meth:`Store.release_holds`."""
        released = 0
        with self._lock:
            self._check_open()
            for job_id, attempts in claims:
                key = (job_id, attempts, worker_id)
                if key in self._holds:
                    self._drop_hold(key)
                    released += 1
        if self._due:
            self._deliver()
        return released

    def list_holds(self, *, lock: str | None = None) -> list[LockHold]:
        """See :meth:`Store.list_holds`."""
        with self._lock:
            self._check_open()
            holds = [hold for hold in self._holds.values() if lock is None or hold.lock == lock]
        return sorted(holds, key=lambda hold: (hold.heartbeat_at, hold.job_id))

    # -- the worker registry ------------------------------------------------------------------

    def register_worker(self, info: WorkerInfo) -> None:
        """See :meth:`Store.register_worker`."""
        with self._lock:
            self._check_open()
            self._workers[info.id] = info

    def heartbeat_worker(self, worker_id: str, *, running: int, now: float) -> bool:
        """See :meth:`Store.heartbeat_worker`."""
        with self._lock:
            self._check_open()
            info = self._workers.get(worker_id)
            if info is None:
                return False
            self._workers[worker_id] = dataclasses.replace(info, heartbeat_at=now, running=running)
            return True

    def remove_worker(self, worker_id: str) -> bool:
        """See :meth:`Store.remove_worker`."""
        with self._lock:
            self._check_open()
            return self._workers.pop(worker_id, None) is not None

    def list_workers(self, *, now: float, stale_after: float) -> list[WorkerInfo]:
        """See :meth:`Store.list_workers`."""
        with self._lock:
            self._check_open()
            live = [info for info in self._workers.values() if info.heartbeat_at >= now - stale_after]
        return sorted(live, key=lambda info: (info.started_at, info.id))

    def reap_workers(self, *, older_than: float) -> int:
        """See :meth:`Store.reap_workers`."""
        with self._lock:
            self._check_open()
            stale = [worker_id for worker_id, info in self._workers.items() if info.heartbeat_at < older_than]
            for worker_id in stale:
                del self._workers[worker_id]
            return len(stale)

    def describe(self) -> Mapping[str, object]:
        """``{"kind": "MemoryStore", "jobs": n}``."""
        with self._lock:
            return {"kind": "MemoryStore", "jobs": len(self._jobs)}
