"""EndpointBatchDispatcher: per-endpoint webhook batches with retries, a concurrency limit, stats and events.

The face of k-msg's webhook ``BatchDispatcher`` on the shared
:class:`~threaddispatch._engine.BatchEngine`: one keyed lane per endpoint (a priority lane),
the engine's window as ``batch_timeout``, its gate as the ``max_concurrent_batches`` limit,
``put_later`` as the timer of retries and of jobs with a ``scheduled_at``, and
``take_now``/``settle`` for the synchronous ``process_*`` calls. The engine's worker takes
the batches; they are sent on a :class:`~threaddispatch._pool.WorkerPool` of
``max_concurrent_batches`` threads.

Every job is in exactly one place at a time (an endpoint's queue, a batch being sent, the
schedule of retries and not-yet-due jobs, or finished: delivered, exhausted, dropped, or
cancelled at shutdown), and it moves between them under the engine's lock, so the
dispatcher never loses a job and never sends one twice.

Memory is bounded by ``max_pending_jobs``: the jobs held (accepted and not finished, so
queued, in a batch, or waiting for a retry or their ``scheduled_at``) are counted under
``_Core.lock``, and ``add_job`` applies the overflow policy of
:class:`~threaddispatch.BackgroundDispatcher` when the count is at the bound. A retry never
counts again: the job is held already.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from types import TracebackType
from typing import Any, Literal

from threaddispatch import _lifecycle
from threaddispatch._engine import OVERFLOW_POLICIES, BatchEngine, Overflow
from threaddispatch._invoke import BASE, ERROR, Outcome, TimedCaller
from threaddispatch._lanes import FifoLane, Lane, PriorityLane
from threaddispatch._pool import WorkerPool
from threaddispatch._validate import check_positive_int, check_seconds, show
from threaddispatch.backoff import Exponential, RetryPolicy
from threaddispatch.errors import (
    ConfigurationError,
    DispatcherClosedError,
    InvalidStateError,
    QueueFullError,
    ThreadDispatchError,
)
from threaddispatch.events import EventEmitter, Listener

__all__ = ["EVENTS", "BatchStats", "DispatchJob", "EndpointBatchDispatcher", "WebhookBatch"]

_log = logging.getLogger("threaddispatch")

EVENTS: frozenset[str] = frozenset(
    {
        "job_added",
        "batch_skipped",
        "batch_started",
        "batch_executed",
        "batch_execution_error",
        "batch_completed",
        "batch_failed",
        "job_exhausted",
        "job_dropped",
        "requeue_error",
        "processor_error",
        "shutdown",
    }
)

JobStatus = Literal[
    "new", "pending", "scheduled", "processing", "retrying", "delivered", "exhausted", "cancelled", "dropped"
]
BatchStatus = Literal["pending", "processing", "completed", "failed"]

#: ``send_batch(endpoint_id, jobs)``: raise (every job failed), return None (every job was
#: delivered), or return one outcome per job: None/True delivered, False/an exception failed.
#: It may be an ``async def`` function (awaited on the sending thread's private loop).
SendBatch = Callable[[Any, "list[DispatchJob]"], object]

# The default retry: 3 attempts, exponential from 1 s (doubling, capped at 60 s). A job's own
# max_attempts, when it has one, overrides the policy's.
_DEFAULT_RETRY = RetryPolicy(max_attempts=3, backoff=Exponential(initial=1.0))

_names = iter(range(1, 1 << 62))

# The default max_pending_jobs. A held job costs its DispatchJob (about 200 bytes) plus its
# payload: 100_000 jobs of 1 KiB are about 120 MB, a bound a service notices before the
# kernel does. And at the default max_batch_size (100) and max_concurrent_batches (10) it
# is 100 full rounds of batches: a backlog that large means the endpoints are down or far
# too slow, and more buffering would only postpone the failure.
DEFAULT_MAX_PENDING_JOBS = 100_000


# Ids are a random per-process prefix and a counter: unique across processes (and, re-seeded
# in a forked child, across forks), usable as idempotency keys, and cheap (no syscall per job).
_id_prefix = ""
_id_serial = itertools.count()


def _seed_ids() -> None:
    global _id_prefix, _id_serial
    _id_prefix = os.urandom(7).hex()
    _id_serial = itertools.count(1)


_seed_ids()
_lifecycle.at_fork_child(_seed_ids)


def _new_id() -> str:
    return f"{_id_prefix}{next(_id_serial):010x}"


def _check_endpoint_id(endpoint_id: object) -> None:
    if type(endpoint_id) is str and endpoint_id and not endpoint_id[0].isspace():
        return  # the common case, checked cheaply
    if (
        endpoint_id is None
        or isinstance(endpoint_id, bool)
        or (isinstance(endpoint_id, str) and not endpoint_id.strip())
    ):
        raise ConfigurationError(f"endpoint_id must be a non-empty str (or another hashable id), got {endpoint_id!r}")
    try:
        hash(endpoint_id)
    except TypeError:
        raise ConfigurationError(f"endpoint_id must be hashable, got {endpoint_id!r}") from None


# How far ahead add_job accepts a scheduled_at: jobs wait in memory, and no process lives long
# enough to send a job due later (nor can a thread wait that long: the timeout overflows).
MAX_SCHEDULE_AHEAD = 365 * 24 * 3600.0


def _check_scheduled_at(value: object) -> float | None:
    """``value`` as epoch seconds: None, a finite int or float (``time.time()``), or an aware datetime."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    elif isinstance(value, datetime) and value.utcoffset() is not None:
        return value.timestamp()
    raise ConfigurationError(
        "scheduled_at must be None, epoch seconds (a finite number, as time.time() returns) "
        f"or a timezone-aware datetime, got {show(value)}"
    )


class DispatchJob:
    """One payload for one endpoint, and the record of its delivery.

    ``id`` is generated when not given (unique across processes); ``created_at`` is set at
    construction (``time.time()``). ``max_attempts`` (None: the dispatcher's
    ``retry.max_attempts``) counts every try, the first included, and when given overrides
    the policy's. ``scheduled_at`` (None: at once) is the earliest time the job may be sent:
    epoch seconds on the ``time.time()`` clock, or a timezone-aware datetime (stored as epoch
    seconds); the wait is fixed at ``add_job`` from ``time.time()`` then. Bad values raise
    ConfigurationError naming them. From ``add_job`` on, the dispatcher owns the job and
    updates ``status`` (new, pending or scheduled, processing, retrying, then delivered,
    exhausted, cancelled, or dropped by the overflow policy), ``attempts``,
    ``last_attempt_at``, ``next_retry_at``, ``finished_at`` and ``last_error``: read them,
    do not write them. A job can be added once.
    """

    __slots__ = (
        "attempts",
        "created_at",
        "endpoint_id",
        "finished_at",
        "id",
        "last_attempt_at",
        "last_error",
        "max_attempts",
        "next_retry_at",
        "payload",
        "priority",
        "scheduled_at",
        "status",
    )

    def __init__(
        self,
        endpoint_id: Hashable,
        payload: Any,
        priority: int = 0,
        max_attempts: int | None = None,
        id: str | None = None,
        *,
        scheduled_at: float | datetime | None = None,
    ) -> None:
        _check_endpoint_id(endpoint_id)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigurationError(f"priority must be an int, got {priority!r}")
        if max_attempts is not None:
            check_positive_int("max_attempts", max_attempts)
        self.scheduled_at: float | None = _check_scheduled_at(scheduled_at)
        if id is None:
            id = _new_id()
        elif not isinstance(id, str) or not id:
            raise ConfigurationError(f"id must be a non-empty str or None, got {id!r}")
        self.endpoint_id = endpoint_id
        self.payload = payload
        self.priority = priority
        self.max_attempts: int | None = max_attempts
        self.id = id
        self.created_at = time.time()
        self.attempts = 0
        self.status: JobStatus = "new"
        self.last_attempt_at: float | None = None
        self.next_retry_at: float | None = None
        self.finished_at: float | None = None
        self.last_error: BaseException | None = None

    def __repr__(self) -> str:
        # No payload: it may be large or sensitive, and this repr ends up in logs.
        return (
            f"DispatchJob(id={self.id!r}, endpoint_id={self.endpoint_id!r}, priority={self.priority}, "
            f"attempts={self.attempts}/{'policy' if self.max_attempts is None else self.max_attempts}, "
            f"status={self.status!r})"
        )


@dataclass(eq=False)
class WebhookBatch:
    """The record of one batch: its jobs (in send order), status and timestamps (``time.time()``).

    ``status`` goes ``pending`` (taken, waiting for a sending thread), ``processing``, then
    ``completed`` (every job delivered) or ``failed`` (``failed`` of its jobs were not;
    ``error`` is set when the whole batch failed: ``send_batch`` raised or returned a bad result).
    """

    id: str
    endpoint_id: Hashable
    jobs: tuple[DispatchJob, ...]
    created_at: float
    status: BatchStatus = "pending"
    started_at: float | None = None
    completed_at: float | None = None
    successful: int = 0
    failed: int = 0
    error: BaseException | None = None


@dataclass(frozen=True)
class BatchStats:
    """A consistent snapshot of the queues (all fields read at one instant).

    ``pending_jobs_count`` counts jobs queued for sending (not those waiting for a retry or for
    their ``scheduled_at``, which ``retrying_jobs_count`` counts); ``average_queue_size`` is
    over endpoints that have jobs.
    """

    pending_jobs_count: int
    active_batches_count: int
    endpoints_with_pending_jobs: int
    average_queue_size: float
    retrying_jobs_count: int = 0


def _priority_lane(key: Hashable) -> Lane[DispatchJob]:
    return PriorityLane(key, _priority_of)


_priority_of: Callable[[DispatchJob], int] = attrgetter("priority")


def _outcomes(result: object, count: int, endpoint_id: Hashable) -> list[object]:
    """``result`` as a list of ``count`` outcomes; TypeError or ValueError saying what is wrong with it."""
    if isinstance(result, (str, bytes, bytearray)) or not isinstance(result, Sequence):
        raise TypeError(
            f"send_batch for endpoint {endpoint_id!r} returned {show(result)}; "
            f"expected None or a sequence of {count} outcomes (one per job)"
        )
    outcomes = list(result)
    if len(outcomes) != count:
        raise ValueError(
            f"send_batch for endpoint {endpoint_id!r} returned {len(outcomes)} outcomes for a batch of "
            f"{count} jobs; expected None or exactly {count}"
        )
    for index, outcome in enumerate(outcomes):
        if not (outcome is None or outcome is True or outcome is False or isinstance(outcome, BaseException)):
            raise TypeError(
                f"send_batch for endpoint {endpoint_id!r} returned outcome {show(outcome)} at index {index}; "
                "expected None or True (delivered), False or an exception (failed)"
            )
    return outcomes


class _Core:
    """Everything the engine's worker and the sending threads use.

    Never refers to the dispatcher, so an unreferenced dispatcher can be collected while its
    threads drain. Thread-safe: ``lock`` guards ``closed``, ``adding`` and the counters below it.
    """

    def __init__(
        self,
        send_batch: SendBatch,
        *,
        name: str,
        max_batch_size: int,
        batch_timeout: float,
        max_concurrent_batches: int,
        enable_prioritization: bool,
        retry: RetryPolicy,
        max_pending_jobs: int,
        overflow: Overflow,
        send_timeout: float | None,
    ) -> None:
        self.send_batch = send_batch
        self.name = name
        self.label = f"EndpointBatchDispatcher {name!r}"
        self.max_batch_size = max_batch_size
        self.max_concurrent_batches = max_concurrent_batches
        self.retry = retry
        self.max_pending_jobs = max_pending_jobs
        self.overflow = overflow
        self.events = EventEmitter(known_events=EVENTS)
        self._init_locks()
        # Calls send_batch (on the sending thread itself when send_timeout is None; else on a
        # runner thread, marked as sending like the sending thread: _send_on_runner).
        self.caller = TimedCaller(f"{name}-send", timeout=send_timeout)
        self.send_target: Callable[..., object] = send_batch if send_timeout is None else self._send_on_runner
        self.pool = WorkerPool(max_concurrent_batches, name=f"{name}-send")
        self.engine: BatchEngine[DispatchJob] = BatchEngine(
            self.deliver,
            name=name,
            window=batch_timeout,
            max_batch_size=max_batch_size,
            gate=self.gate,
            on_skip=self.on_skip,
            on_abandon=self.on_abandon,
            lane_factory=_priority_lane if enable_prioritization else FifoLane,
            # No per-lane bound: max_pending_jobs is over all endpoints, applied by add_job.
        )
        _lifecycle.register(self)

    def _init_locks(self) -> None:
        self.lock = threading.Lock()
        self.adds_done = threading.Condition(self.lock)  # shutdown waits here for announced adds
        self.room = threading.Condition(self.lock)  # add_job waits here with overflow="block"
        # Sends running now, whoever runs them. The gate keeps it from blocking while open;
        # during the shutdown drain (no gate) it keeps a process_* call in progress and the
        # pool's threads together within the limit.
        self.permits = threading.BoundedSemaphore(self.max_concurrent_batches)
        self.local = threading.local()  # .sending / .adding: what this thread is in the middle of
        self.closed = False
        self.adding = 0  # add_job calls between their job_added event and their put
        self.shutdown_emitted = False
        self.exhausted = 0
        self.cancelled: list[DispatchJob] = []
        self.exhausted_at_close = 0
        # Jobs accepted and not finished (queued, in a batch, or waiting for a retry): never
        # above max_pending_jobs. A job finishes delivered, exhausted, cancelled or dropped.
        self.held = 0
        self.dropped = 0
        self.room_waiters = 0

    # -- engine hooks ------------------------------------------------------------------------

    def gate(self, _endpoint_id: Hashable) -> bool:
        # Runs with the engine's lock held: a read, no user code.
        return self.engine.unsettled < self.max_concurrent_batches

    def on_skip(self, endpoint_id: Hashable, pending: int) -> None:
        if self.events.has_listeners("batch_skipped"):
            self.events.emit(
                "batch_skipped",
                {
                    "endpoint_id": endpoint_id,
                    "pending_jobs": pending,
                    "active_batches": self.engine.in_flight(),
                    "max_concurrent_batches": self.max_concurrent_batches,
                    "reason": "max_concurrent_batches",
                },
            )

    def on_abandon(self, _endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        self.cancel(jobs)

    def cancel(self, jobs: list[DispatchJob]) -> None:
        """Retries (or scheduled first sends) that can no longer happen (shutdown): the jobs are not delivered."""
        now = time.time()
        for job in jobs:
            job.status = "cancelled"
            job.next_retry_at = None
            job.finished_at = now
        with self.lock:
            self.cancelled.extend(jobs)
            self._release_held(len(jobs))
        _log.warning(
            "%s: shut down with %d job(s) waiting for a retry or their scheduled_at; they were not delivered: %s",
            self.label,
            len(jobs),
            ", ".join(job.id for job in jobs[:10]) + (", ..." if len(jobs) > 10 else ""),
        )

    def deliver(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> Future[None] | None:
        batch = WebhookBatch(_new_id(), endpoint_id, tuple(jobs), time.time())
        # Whoever acquires the claim sends the batch: a submit that raised may still have queued it.
        claim = threading.Lock()
        try:
            return self.pool.submit(self.run_pooled, batch, claim)
        except DispatcherClosedError:
            pass  # the pool was shut down while the engine still drains: send here rather than lose it
        except Exception as exc:  # noqa: BLE001 - e.g. no thread could start: report it, send here
            self.processor_failed(exc, batch, "could not hand a batch to a sending thread; sending it here")
        if claim.acquire(blocking=False):
            self.run_batch(batch)
        return None

    def run_pooled(self, batch: WebhookBatch, claim: threading.Lock) -> None:
        """``run_batch`` on a sending thread; what escapes it is reported, not left in a Future."""
        if not claim.acquire(blocking=False):
            return
        try:
            self.run_batch(batch)
        except Exception as exc:  # noqa: BLE001 - send_batch's errors are handled inside: this is a bug
            self.processor_failed(exc, batch, "sending a batch failed outside send_batch")

    def processor_failed(self, error: Exception, batch: WebhookBatch, what: str) -> None:
        """The batching machinery itself failed around ``batch``: log it and emit ``processor_error``."""
        _log.error("%s: %s (batch %s, endpoint %r)", self.label, what, batch.id, batch.endpoint_id, exc_info=error)
        if self.events.has_listeners("processor_error"):
            self.events.emit(
                "processor_error",
                {
                    "error": error,
                    "endpoint_id": batch.endpoint_id,
                    "batch_id": batch.id,
                    "job_count": len(batch.jobs),
                    "batch": batch,
                },
            )

    # -- sending -----------------------------------------------------------------------------

    def run_batch(self, batch: WebhookBatch) -> BaseException | None:
        """Send one batch on this thread and settle its jobs; events fire here, in order.

        Returns the BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...)
        send_batch raised, if it did: the batch failed with it like with any error, and it was
        logged; the synchronous ``process_*`` calls re-raise it to their caller.
        """
        local = self.local
        self.permits.acquire()
        local.sending = getattr(local, "sending", 0) + 1
        try:
            return self._send(batch)
        finally:
            local.sending -= 1
            self.permits.release()

    def _send(self, batch: WebhookBatch) -> BaseException | None:
        events = self.events
        jobs = batch.jobs
        endpoint_id = batch.endpoint_id
        started = time.time()
        batch.started_at = started
        batch.status = "processing"
        for job in jobs:
            job.attempts += 1
            job.status = "processing"
            job.last_attempt_at = started
            job.next_retry_at = None
        error: BaseException | None = None
        outcomes: list[object] | None = None  # None: every job delivered (unless error)
        if events.has_listeners("batch_started"):
            events.emit(
                "batch_started",
                {
                    "batch_id": batch.id,
                    "endpoint_id": endpoint_id,
                    "job_count": len(jobs),
                    "job_ids": [job.id for job in jobs],
                    "batch": batch,
                },
            )
        sent = self._call_send(endpoint_id, list(jobs))
        if not sent.ok:
            error = sent.error
            if sent.kind == BASE:
                _log.error("%s: send_batch raised %s; the batch failed", self.label, show(error), exc_info=error)
        elif sent.value is not None:
            try:
                outcomes = _outcomes(sent.value, len(jobs), endpoint_id)
            except Exception as exc:  # noqa: BLE001 - a bad result fails the batch; reported below
                error = exc
                _log.error("%s: %s; the batch is treated as failed", self.label, exc)

        delivered: Sequence[DispatchJob] = ()
        failed: list[tuple[DispatchJob, BaseException]] = []
        if error is not None:
            failed = [(job, error) for job in jobs]
        elif outcomes is None:
            delivered = jobs
        else:
            delivered = []
            for job, outcome in zip(jobs, outcomes, strict=True):
                if outcome is None or outcome is True:
                    delivered.append(job)
                else:
                    failed.append((job, outcome if isinstance(outcome, BaseException) else _not_delivered(job)))

        finished = time.time()
        for job in delivered:
            job.status = "delivered"
            job.finished_at = finished
            job.last_error = None
        retries: list[tuple[DispatchJob, float]] = []
        exhausted: list[DispatchJob] = []
        for job, job_error in failed:
            job.last_error = job_error
            # The one retry decision: Cancel final, Retry(delay) honoured, a bad delay final.
            delay = self.retry.next_delay(job.attempts, job_error, max_attempts=job.max_attempts)
            if delay is not None:
                job.status = "retrying"
                job.next_retry_at = finished + delay
                retries.append((job, delay))
            else:
                job.status = "exhausted"
                job.finished_at = finished
                exhausted.append(job)
        batch.successful = len(delivered)
        batch.failed = len(failed)
        batch.error = error
        batch.completed_at = finished
        batch.status = "failed" if failed else "completed"
        if delivered or exhausted:
            with self.lock:
                self.exhausted += len(exhausted)
                self._release_held(len(delivered) + len(exhausted))

        try:
            self._report(batch, failed, retries, exhausted)
        finally:
            # After the events, so a retry never overtakes the report of the attempt before it;
            # in a finally, so no listener can lose a job.
            self._requeue(endpoint_id, retries)
        return error if sent.kind == BASE else None

    def _call_send(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> Outcome:
        """``send_batch(endpoint_id, jobs)`` within send_timeout; never raises."""
        try:
            return self.caller.call(self.send_target, endpoint_id, jobs)
        except DispatcherClosedError as exc:  # shut down (its wait timed out) while this batch still went
            return Outcome(ERROR, None, exc)

    def _send_on_runner(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> object:
        """``send_batch`` on a send_timeout runner thread, which counts as sending meanwhile (so
        shutdown or a blocking add_job inside it does not wait for its own batch); an awaitable
        it returns is wrapped to keep the mark while the runner awaits it."""
        local = self.local
        local.sending = getattr(local, "sending", 0) + 1
        try:
            result = self.send_batch(endpoint_id, jobs)
        finally:
            local.sending -= 1
        if inspect.isawaitable(result):
            return self._await_sending(result)
        return result

    async def _await_sending(self, awaitable: Awaitable[object]) -> object:
        local = self.local
        local.sending = getattr(local, "sending", 0) + 1
        try:
            return await awaitable
        finally:
            local.sending -= 1

    def _requeue(self, endpoint_id: Hashable, retries: list[tuple[DispatchJob, float]]) -> None:
        """Schedule the retries. One the engine refuses as closed is cancelled (as shutdown cancels
        pending retries); one it fails to schedule otherwise is exhausted, with ``requeue_error``."""
        cancelled: list[DispatchJob] = []
        failed: list[tuple[DispatchJob, Exception]] = []
        for job, delay in retries:
            try:
                self.engine.put_later(job, endpoint_id, delay)
            except DispatcherClosedError:
                cancelled.append(job)
            except Exception as exc:  # noqa: BLE001 - the job must finish, not stay "retrying" forever
                failed.append((job, exc))
        if cancelled:
            self.cancel(cancelled)
        if failed:
            self._requeue_failed(endpoint_id, failed)

    def _requeue_failed(self, endpoint_id: Hashable, failed: list[tuple[DispatchJob, Exception]]) -> None:
        finished = time.time()
        for job, _error in failed:
            job.status = "exhausted"
            job.next_retry_at = None
            job.finished_at = finished
        with self.lock:
            self.exhausted += len(failed)
            self._release_held(len(failed))
        events = self.events
        for job, error in failed:
            _log.error("%s: the retry of %r could not be scheduled; it is given up", self.label, job, exc_info=error)
            if events.has_listeners("requeue_error"):
                events.emit(
                    "requeue_error",
                    {
                        "job_id": job.id,
                        "endpoint_id": endpoint_id,
                        "error": error,
                        "attempts": job.attempts,
                        "job": job,
                    },
                )
            self._emit_exhausted(job, endpoint_id)

    def _emit_exhausted(self, job: DispatchJob, endpoint_id: Hashable) -> None:
        if self.events.has_listeners("job_exhausted"):
            self.events.emit(
                "job_exhausted",
                {
                    "job_id": job.id,
                    "endpoint_id": endpoint_id,
                    "attempts": job.attempts,
                    "error": job.last_error,
                    "job": job,
                },
            )

    def _report(
        self,
        batch: WebhookBatch,
        failed: list[tuple[DispatchJob, BaseException]],
        retries: list[tuple[DispatchJob, float]],
        exhausted: list[DispatchJob],
    ) -> None:
        events = self.events
        endpoint_id = batch.endpoint_id
        if events.has_listeners("batch_executed"):
            events.emit(
                "batch_executed",
                {
                    "batch_id": batch.id,
                    "endpoint_id": endpoint_id,
                    "total": len(batch.jobs),
                    "successful": batch.successful,
                    "failed": batch.failed,
                    "batch": batch,
                },
            )
        if batch.error is not None and events.has_listeners("batch_execution_error"):
            events.emit(
                "batch_execution_error",
                {
                    "batch_id": batch.id,
                    "endpoint_id": endpoint_id,
                    "error": batch.error,
                    "job_count": len(batch.jobs),
                    "batch": batch,
                },
            )
        if not failed:
            if events.has_listeners("batch_completed"):
                events.emit(
                    "batch_completed",
                    {"batch_id": batch.id, "endpoint_id": endpoint_id, "job_count": len(batch.jobs), "batch": batch},
                )
        elif events.has_listeners("batch_failed"):
            events.emit(
                "batch_failed",
                {
                    "batch_id": batch.id,
                    "endpoint_id": endpoint_id,
                    "error": batch.error,
                    "failed": batch.failed,
                    "failed_job_ids": [job.id for job, _ in failed],
                    "retrying": len(retries),
                    "exhausted": len(exhausted),
                    "batch": batch,
                },
            )
        for job in exhausted:
            self._emit_exhausted(job, endpoint_id)

    # -- the bound ---------------------------------------------------------------------------

    def _release_held(self, count: int) -> None:
        """``count`` held jobs finished: make room for as many adds. Holds lock."""
        self.held -= count
        if self.room_waiters:
            self.room.notify(count)

    def admit(self, job: DispatchJob, timeout: float | None) -> bool:
        """Count ``job`` as held, by the overflow policy: True if it is to be queued, False if dropped.

        Raises QueueFullError (``"raise"``, or ``"block"`` past ``timeout``) and
        DispatcherClosedError; the job is then not counted. A True answer must be followed
        by a put, or by :meth:`unadmit` if the put fails.
        """
        with self.lock:
            if self.closed:
                raise DispatcherClosedError(f"{self.label} is shut down; {job!r} was not accepted")
            if self.held < self.max_pending_jobs:
                self.held += 1
                return True
            overflow = self.overflow
            if overflow == "raise":
                raise QueueFullError(self._full_message(job))
            if overflow == "block":
                self._wait_for_room(job, timeout)
                self.held += 1
                return True
        if overflow == "drop_oldest" and self._drop_queued(job.endpoint_id):
            return True  # a held job was dropped: this one takes its place in the count
        self._finish_dropped(job)
        return False

    def unadmit(self) -> None:
        """An admitted job's put failed: it is not held after all."""
        with self.lock:
            self._release_held(1)

    def _full_message(self, job: DispatchJob) -> str:
        return (
            f"{self.label}: max_pending_jobs ({self.max_pending_jobs}) jobs are queued, in flight or "
            f"waiting for a retry; {job!r} was not accepted"
        )

    def _wait_for_room(self, job: DispatchJob, timeout: float | None) -> None:
        """Wait until fewer than max_pending_jobs are held; holds lock (released meanwhile)."""
        if getattr(self.local, "sending", 0):
            # Inside send_batch or a batch listener: the room we would wait for may be held by
            # the batch this thread runs, which cannot finish while we wait.
            raise QueueFullError(self._full_message(job) + "; add_job inside send_batch or a listener cannot wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        self.room_waiters += 1
        try:
            while self.held >= self.max_pending_jobs:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise QueueFullError(
                        f"{self.label}: the bound of {self.max_pending_jobs} held jobs stayed full for "
                        f"{timeout}s; {job!r} was not accepted"
                    )
                self.room.wait(remaining)
                if self.closed:
                    raise DispatcherClosedError(f"{self.label} shut down while {job!r} waited for room")
        finally:
            self.room_waiters -= 1

    def _drop_queued(self, endpoint_id: Hashable) -> bool:
        """Drop the queued job that would be sent first: of ``endpoint_id`` if it has one queued,
        else of the longest queue. Returns whether a job was dropped. Nothing held."""
        lengths, _in_flight, _scheduled = self.engine.snapshot()
        for key in [endpoint_id, *sorted(lengths, key=lengths.__getitem__, reverse=True)]:
            victim = self.engine.drop_first(key)  # the job the lane sends first, under the engine's lock
            if victim is not None:
                self._finish_dropped(victim)
                return True
        return False

    def _finish_dropped(self, job: DispatchJob) -> None:
        """Mark ``job`` dropped by the overflow policy, count it, emit ``job_dropped``. Nothing held."""
        job.status = "dropped"
        job.next_retry_at = None
        job.finished_at = time.time()
        with self.lock:
            self.dropped += 1
        if self.events.has_listeners("job_dropped"):
            self.events.emit(
                "job_dropped",
                {
                    "job_id": job.id,
                    "endpoint_id": job.endpoint_id,
                    "reason": "max_pending_jobs",
                    "overflow": self.overflow,
                    "max_pending_jobs": self.max_pending_jobs,
                    "job": job,
                },
            )

    # -- adding ------------------------------------------------------------------------------

    def queue(self, job: DispatchJob, delay: float) -> None:
        """Put an admitted job in its endpoint's queue, or, with ``delay`` > 0, in the schedule until then."""
        if delay > 0:
            self.engine.put_later(job, job.endpoint_id, delay)
        else:
            self.engine.put(job, job.endpoint_id)

    def add_announced(self, job: DispatchJob, delay: float) -> None:
        """Emit ``job_added`` and then queue the job, so the event precedes any batch holding it.

        Counted in ``adding`` meanwhile: shutdown waits for these before it closes the engine,
        so a job whose ``job_added`` was emitted is always accepted.
        """
        local = self.local
        with self.lock:
            if self.closed:
                raise DispatcherClosedError(f"{self.label} is shut down; {job!r} was not accepted")
            self.adding += 1
        local.adding = getattr(local, "adding", 0) + 1
        try:
            self.events.emit(
                "job_added",
                {
                    "job_id": job.id,
                    "endpoint_id": job.endpoint_id,
                    "priority": job.priority,
                    "queue_size": self.engine.lane_length(job.endpoint_id) + (0 if delay > 0 else 1),
                    "scheduled_at": job.scheduled_at,
                    "job": job,
                },
            )
            self.queue(job, delay)
        finally:
            local.adding -= 1
            with self.lock:
                self.adding -= 1
                if self.closed and not self.adding:
                    self.adds_done.notify_all()

    # -- lifecycle ---------------------------------------------------------------------------

    def release_threads(self) -> None:
        """After the drain of an unreferenced dispatcher: let the sending and send_timeout threads leave."""
        self.pool.shutdown()
        self.caller.close(0.0)  # a runner busy with a hung send leaves after it

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return 0, 0  # the engine is registered too and drains the jobs

    def _reset_after_fork(self) -> None:
        # A parent thread may have held these locks at fork time; the engine and pool reset themselves.
        closed = self.closed
        self._init_locks()
        self.closed = closed


def _not_delivered(job: DispatchJob) -> ThreadDispatchError:
    return ThreadDispatchError(f"send_batch reported job {job.id!r} as not delivered (False)")


class EndpointBatchDispatcher:
    """Batches jobs per endpoint and calls ``send_batch(endpoint_id, jobs)`` for each batch.

    A batch holds jobs of one endpoint only, at most ``max_batch_size`` of them, highest
    ``priority`` first and first in first out within a priority. An endpoint's queue goes at
    once when it holds ``max_batch_size`` jobs, otherwise ``batch_timeout`` seconds after its
    first job arrived. At most ``max_concurrent_batches`` batches are in flight: a batch over
    the limit is skipped (``batch_skipped``), its jobs stay queued, and it goes when a batch
    finishes or its next window closes. Batches are sent on up to ``max_concurrent_batches``
    daemon threads ``threaddispatch-<name>-send-<n>``, taken by one thread ``threaddispatch-<name>``.
    The limit is over all endpoints, so two batches of one endpoint may be in flight together:
    jobs keep their order within a batch, not across batches.

    ``send_batch`` raises (every job failed), returns None (every job delivered), or returns
    one outcome per job: None or True (delivered), False or an exception (failed). A result
    of another length or kind fails the whole batch, with an error naming what was wrong.
    ``send_batch`` may be an ``async def`` function (or return an awaitable): it is awaited on
    the sending thread's private event loop, and its result or exception counts the same.
    Failed jobs, and only they, rejoin their endpoint's queue after ``retry``'s backoff
    (default: 3 attempts, exponential from 1 s, doubling, capped at 60 s) and go with its next
    batch, until ``retry.max_attempts`` (or the job's own ``max_attempts``, which overrides it
    when given) or ``retry.retry_on`` says stop: then ``job_exhausted``. The decision is
    :meth:`RetryPolicy.next_delay`'s: ``Retry(delay)`` (raised by send_batch, or a job's
    outcome) retries after ``delay`` instead of the backoff, within the attempt limit;
    ``Cancel`` exhausts at once; a bad ``Retry`` delay, or a backoff that raises, makes the
    failure final (logged). A job whose retry cannot be scheduled (an error of the dispatcher
    itself) is given up the same way, after ``requeue_error``.

    ``send_timeout`` (None: no limit) bounds each call of ``send_batch``: a call past it fails
    the batch with DispatchTimeoutError (retried like any failure); its thread is abandoned
    (left to finish on its own, its late result logged and ignored) and later batches go on
    fresh threads ``threaddispatch-<name>-send-call``. At most 4 abandoned calls run at once
    (``stats()["abandoned_calls"]``); past that a send waits for one to end, within its own
    timeout. A BaseException that is not an Exception (SystemExit, KeyboardInterrupt) from
    ``send_batch`` fails the batch like an error and is logged; no sending thread dies of it,
    and ``process_*``, which send on the caller's thread, re-raise it to their caller after the
    batch's jobs are settled.

    A job with a ``scheduled_at`` in the future waits for it, held but not queued (so neither
    the batching nor ``process_*`` sends it, and the overflow policy never drops it), then
    joins its endpoint's queue like a retry; one in the past is queued at once.

    Events, with one dict argument, fire synchronously on the thread doing the work:
    ``job_added`` (the caller of add_job, before the job can be in a batch),
    ``batch_skipped``, then per batch ``batch_started``, ``batch_executed``,
    ``batch_execution_error`` (only when the whole batch failed with an error: send_batch
    raised or returned a bad result), and ``batch_completed`` or ``batch_failed``, then
    ``requeue_error`` per job whose retry could not be scheduled and ``job_exhausted`` per
    exhausted job; ``processor_error`` when the machinery around ``send_batch`` failed
    (a batch could not be handed to a sending thread: it is then sent on the batching thread);
    ``shutdown`` once. Listeners may be ``async def`` (awaited on the emitting thread's
    private loop). A listener that raises, whatever it raises, is logged and changes nothing else.
    All methods are thread-safe.

    At most ``max_pending_jobs`` jobs (default 100_000) are held: queued, in a batch, or
    waiting for a retry or their ``scheduled_at``. At the bound ``add_job`` applies
    ``overflow``, the policies of :class:`~threaddispatch.BackgroundDispatcher`: ``"raise"``
    (the default) raises QueueFullError; ``"block"`` waits up to ``add_job``'s ``timeout``
    for a job to finish, then raises QueueFullError (at once on a thread inside
    ``send_batch`` or a batch listener, whose own batch may hold the room);
    ``"drop_newest"`` drops the new job;
    ``"drop_oldest"`` drops the queued job its endpoint would send first (or, if that
    endpoint has none queued, the one of the longest queue), and drops the new job when no
    job is queued. A dropped job gets status ``"dropped"``, is counted in ``total_dropped``
    and ``stats()``, and fires ``job_dropped`` on the thread of the add_job that dropped it.
    A retry never counts twice, and a job waiting for its retry or its ``scheduled_at`` is
    never dropped (once in its queue, it is a queued job like the others).

    Pending jobs are sent at interpreter exit, and when a dispatcher nobody references is
    collected; a listener or ``send_batch`` that refers to the dispatcher keeps it alive
    until :meth:`shutdown`.
    """

    def __init__(
        self,
        send_batch: SendBatch,
        *,
        max_batch_size: int = 100,
        batch_timeout: float = 5.0,
        max_concurrent_batches: int = 10,
        enable_prioritization: bool = True,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        max_pending_jobs: int = DEFAULT_MAX_PENDING_JOBS,
        overflow: Overflow = "raise",
        send_timeout: float | None = None,
    ) -> None:
        if not callable(send_batch):
            raise ConfigurationError(f"send_batch must be callable, got {send_batch!r}")
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("max_pending_jobs", max_pending_jobs)
        if not isinstance(overflow, str) or overflow not in OVERFLOW_POLICIES:
            raise ConfigurationError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}")
        batch_timeout = check_seconds("batch_timeout", batch_timeout, allow_zero=False)
        if send_timeout is not None:
            send_timeout = check_seconds("send_timeout", send_timeout, allow_zero=False)
        check_positive_int("max_concurrent_batches", max_concurrent_batches)
        if not isinstance(enable_prioritization, bool):
            raise ConfigurationError(f"enable_prioritization must be a bool, got {enable_prioritization!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        if name is None:
            name = f"endpoint-{next(_names)}"
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str, got {name!r}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_concurrent_batches = max_concurrent_batches
        self.enable_prioritization = enable_prioritization
        self.max_pending_jobs = max_pending_jobs
        self.overflow: Overflow = overflow
        self.send_timeout = send_timeout
        self.retry = _DEFAULT_RETRY if retry is None else retry
        self._core = _Core(
            send_batch,
            name=name,
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            max_concurrent_batches=max_concurrent_batches,
            enable_prioritization=enable_prioritization,
            retry=self.retry,
            max_pending_jobs=max_pending_jobs,
            overflow=overflow,
            send_timeout=send_timeout,
        )
        # An unreferenced dispatcher drains in the background, then its threads leave.
        self._finalizer = weakref.finalize(self, self._core.engine.close_unreferenced, self._core.release_threads)
        self._finalizer.atexit = False  # at exit the lifecycle drain has it, and no thread may start

    # -- jobs --------------------------------------------------------------------------------

    def add_job(self, job: DispatchJob, timeout: float | None = None) -> str:
        """Queue ``job`` for its endpoint and return its id. Never sends on this thread.

        A job whose ``scheduled_at`` is still ahead (by ``time.time()`` now; at most 365 days)
        waits for it in the schedule, with status ``"scheduled"``; it is held from now on. Does not block
        (beyond ``job_added`` listeners), except with ``overflow="block"``
        at the ``max_pending_jobs`` bound: then it waits up to ``timeout`` seconds (None:
        no limit) for room, then raises QueueFullError. With ``"raise"`` it raises
        QueueFullError at the bound; with the drop policies it returns the id of a job
        that may have been dropped (``job.status == "dropped"``). Raises TypeError for a
        non-job, InvalidStateError for a job already added, DispatcherClosedError after
        shutdown, ConfigurationError for a bad ``timeout`` or ``job.scheduled_at``. A job
        refused with an exception keeps status ``"new"``.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        if not isinstance(job, DispatchJob):
            raise TypeError(f"add_job takes a DispatchJob, got {show(job)}")
        if job.status != "new":
            raise InvalidStateError(
                f"{job!r} was already added; to send it again add DispatchJob(job.endpoint_id, job.payload, id=job.id)"
            )
        scheduled_at = _check_scheduled_at(job.scheduled_at)  # it may have been set after construction
        delay = 0.0 if scheduled_at is None else scheduled_at - time.time()
        if delay > MAX_SCHEDULE_AHEAD:
            raise ConfigurationError(
                f"scheduled_at must be at most {MAX_SCHEDULE_AHEAD / 86400:.0f} days ahead, got {scheduled_at!r} "
                f"({delay / 86400:.0f} days from now); {job!r} was not accepted"
            )
        core = self._core
        if not core.admit(job, timeout):
            return job.id  # dropped by the overflow policy
        job.scheduled_at = scheduled_at
        job.status = "scheduled" if delay > 0 else "pending"
        try:
            if core.events.has_listeners("job_added"):
                core.add_announced(job, delay)
            else:
                if core.closed:
                    raise DispatcherClosedError(f"{core.label} is shut down; {job!r} was not accepted")
                core.queue(job, delay)
        except BaseException:
            job.status = "new"  # not queued: the caller may add it elsewhere
            core.unadmit()
            raise
        return job.id

    def process_batch_for_endpoint(self, endpoint_id: Hashable) -> WebhookBatch | None:
        """Send the next batch of ``endpoint_id`` now, on this thread, and return its record.

        Blocks for the send. Returns None when the endpoint has no pending job, or when
        ``max_concurrent_batches`` batches are in flight (then ``batch_skipped`` fires and the
        jobs stay queued). Raises DispatcherClosedError after shutdown.
        """
        _check_endpoint_id(endpoint_id)
        self._check_open()
        return self._process(endpoint_id)

    def process_all_batches(self) -> list[WebhookBatch]:
        """Send one batch for every endpoint with pending jobs, now, on this thread, one after another.

        Blocks for the sends. Returns the records of the batches sent (endpoints skipped for
        the concurrency limit are not in it). Raises DispatcherClosedError after shutdown.
        """
        self._check_open()
        batches = []
        for endpoint_id in self._core.engine.keys_with_entries():
            batch = self._process(endpoint_id)
            if batch is not None:
                batches.append(batch)
        return batches

    def _process(self, endpoint_id: Hashable) -> WebhookBatch | None:
        core = self._core
        seq, jobs = core.engine.take_now(endpoint_id, core.max_batch_size)
        if not jobs:
            return None
        batch = WebhookBatch(_new_id(), endpoint_id, tuple(jobs), time.time())
        try:
            interrupt = core.run_batch(batch)
        finally:
            core.engine.settle(seq)
        if interrupt is not None:
            raise interrupt  # this is the caller's own thread: a KeyboardInterrupt is for it
        return batch

    def _check_open(self) -> None:
        if self._core.closed:
            raise DispatcherClosedError(f"{self._core.label} is shut down")

    # -- stats -------------------------------------------------------------------------------

    def get_batch_stats(self) -> BatchStats:
        """Pending jobs, batches in flight, endpoints with jobs, average queue size: one snapshot."""
        lengths, in_flight, scheduled = self._core.engine.snapshot()
        pending = sum(lengths.values())
        endpoints = len(lengths)
        return BatchStats(
            pending_jobs_count=pending,
            active_batches_count=in_flight,
            endpoints_with_pending_jobs=endpoints,
            average_queue_size=pending / endpoints if endpoints else 0.0,
            retrying_jobs_count=scheduled,
        )

    @property
    def total_dropped(self) -> int:
        """Jobs dropped by the overflow policy since the dispatcher was made."""
        return self._core.dropped

    def stats(self) -> dict[str, int]:
        """Gauges and counters. ``held``: jobs queued, in a batch or waiting for a retry or their
        ``scheduled_at`` (what ``max_pending_jobs`` bounds); ``pending``, ``active_batches``,
        ``retrying`` (retries and scheduled jobs not yet due): as in :meth:`get_batch_stats`;
        ``dropped``, ``exhausted``, ``cancelled``: jobs so far. ``abandoned_calls``: sends past
        ``send_timeout`` whose threads still run (at most 4; past that a send waits for one to
        end, within its own timeout); ``call_timeouts``: sends that timed out so far.

        The queue gauges are one snapshot; ``held`` and the counters are read just after it.
        """
        core = self._core
        lengths, in_flight, scheduled = core.engine.snapshot()
        calls = core.caller.stats()
        with core.lock:
            return {
                "held": core.held,
                "pending": sum(lengths.values()),
                "active_batches": in_flight,
                "retrying": scheduled,
                "dropped": core.dropped,
                "exhausted": core.exhausted,
                "cancelled": len(core.cancelled),
                "abandoned_calls": calls["abandoned_calls"],
                "call_timeouts": calls["call_timeouts"],
            }

    def get_pending_job_count(self, endpoint_id: Hashable) -> int:
        """Jobs queued for ``endpoint_id`` now (not in flight, not waiting for a retry)."""
        _check_endpoint_id(endpoint_id)
        return self._core.engine.lane_length(endpoint_id)

    # -- events ------------------------------------------------------------------------------

    def on(self, event: str, listener: Listener) -> Callable[[], bool]:
        """Call ``listener(payload)`` on every ``event``; returns a function that removes it."""
        return self._core.events.on(event, listener)

    def once(self, event: str, listener: Listener) -> Callable[[], bool]:
        """Like :meth:`on`, for the next ``event`` only."""
        return self._core.events.once(event, listener)

    def off(self, event: str, listener: Listener) -> bool:
        """Remove one registration of ``listener``; returns whether there was one."""
        return self._core.events.off(event, listener)

    def emit(self, event: str, *args: Any) -> bool:
        """Call the listeners of ``event`` on this thread; returns whether there were any."""
        return self._core.events.emit(event, *args)

    def remove_all_listeners(self, event: str | None = None) -> None:
        """Remove the listeners of ``event``, or of every event."""
        self._core.events.remove_all_listeners(event)

    add_listener = on
    remove_listener = off

    # -- shutdown ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._core.closed

    def shutdown(self, timeout: float | None = 30.0) -> bool:
        """Stop intake, send every pending job, wait for active batches, cancel pending retries.

        Blocks up to ``timeout`` seconds (None: no limit), even if ``send_batch`` hangs.
        Retries and scheduled jobs not yet due are cancelled (status ``"cancelled"``) and
        reported as not delivered, together: ``cancelled_retries`` and ``cancelled_jobs`` in
        the ``shutdown`` event count both (a scheduled job never sent has ``attempts == 0``).
        Emits ``shutdown`` with the counts (once) and returns whether every job pending, in
        flight or waiting (for a retry or its ``scheduled_at``) was delivered. Idempotent: a
        later call waits again and returns the state then. Called from ``send_batch`` or a
        listener, it cannot wait for the batch it runs in: it starts the drain and returns False.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        core = self._core
        local = core.local
        with core.lock:
            first = not core.closed
            if first:
                core.closed = True
                core.exhausted_at_close = core.exhausted
                core.room.notify_all()  # adds waiting for room are refused now
            # Jobs announced by job_added are accepted: wait for their puts (not our own).
            own = getattr(local, "adding", 0)
            while core.adding > own:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                core.adds_done.wait(remaining)
        if getattr(local, "sending", 0):
            core.engine.begin_close()
            drained = False
        else:
            drained = core.engine.close(_remaining(deadline))
            core.pool.shutdown(_remaining(deadline))
            core.caller.close(_remaining(deadline))  # abandoned sends are left to end on their own
            self._finalizer.detach()  # closed: nothing left for the collector to do
        lengths, in_flight, _scheduled = core.engine.snapshot()
        pending = sum(lengths.values())
        with core.lock:
            cancelled = list(core.cancelled)
            exhausted = core.exhausted - core.exhausted_at_close
            emit = not core.shutdown_emitted
            core.shutdown_emitted = True
        delivered = drained and not pending and not in_flight and not cancelled and not exhausted
        if emit and core.events.has_listeners("shutdown"):
            core.events.emit(
                "shutdown",
                {
                    "delivered": delivered,
                    "pending_jobs": pending,
                    "active_batches": in_flight,
                    "cancelled_retries": len(cancelled),
                    "cancelled_jobs": cancelled,
                    "exhausted_jobs": exhausted,
                },
            )
        return delivered

    def __enter__(self) -> EndpointBatchDispatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self.closed else "open"
        return (
            f"<EndpointBatchDispatcher {self.name!r} max_batch_size={self.max_batch_size} "
            f"batch_timeout={self.batch_timeout} max_concurrent_batches={self.max_concurrent_batches} {state}>"
        )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
