"""The records of EndpointBatchDispatcher: DispatchJob, WebhookBatch, BatchStats, and their checks.

What a user builds (a :class:`DispatchJob`) and reads back (a job's delivery record, a
:class:`WebhookBatch`, a :class:`BatchStats` snapshot), the event names, and the checks of
the values a job carries (endpoint ids, ``scheduled_at``). Ids are made here: a random
per-process prefix and a counter (re-seeded in a forked child). No threads, no locks beyond
the module's id counter (``itertools.count``: atomic under the GIL).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from threaddispatch import _lifecycle
from threaddispatch._validate import check_positive_int, show
from threaddispatch.errors import ConfigurationError, PayloadError

__all__ = [
    "EVENTS",
    "MAX_SCHEDULE_AHEAD",
    "BatchStats",
    "BatchStatus",
    "DispatchJob",
    "JobStatus",
    "SendBatch",
    "WebhookBatch",
]

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


def new_id() -> str:
    return "%s%010x" % (_id_prefix, next(_id_serial))  # noqa: UP031 - a third faster than the f-string


def check_endpoint_id(endpoint_id: object) -> None:
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


def check_scheduled_at(value: object) -> float | None:
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
        "_spool_seq",
        "_trace_context",
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

    # Its sequence number in the dispatcher's spool: set by a spooled add_job only (unset otherwise,
    # so a dispatcher without a spool pays nothing for it).
    _spool_seq: int

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
        check_endpoint_id(endpoint_id)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigurationError(f"priority must be an int, got {priority!r}")
        if max_attempts is not None:
            check_positive_int("max_attempts", max_attempts)
        self.scheduled_at: float | None = check_scheduled_at(scheduled_at)
        if id is None:
            id = new_id()
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
        # The span context of the code that added the job (only with a tracer_provider): the send links to it.
        self._trace_context: Any = None

    def __repr__(self) -> str:
        # No payload: it may be large or sensitive, and this repr ends up in logs.
        return (
            f"DispatchJob(id={self.id!r}, endpoint_id={self.endpoint_id!r}, priority={self.priority}, "
            f"attempts={self.attempts}/{'policy' if self.max_attempts is None else self.max_attempts}, "
            f"status={self.status!r})"
        )


def spool_entry(job: DispatchJob, scheduled_at: float | None) -> dict[str, Any]:
    """What a spool keeps of ``job`` to re-create it (JSON: the spool refuses the rest with PayloadError).

    The endpoint id must survive JSON as itself (a str, int or float: a tuple would come back a list).
    """
    endpoint_id = job.endpoint_id
    if type(endpoint_id) is not str and type(endpoint_id) is not int and type(endpoint_id) is not float:
        raise PayloadError(
            f"a spooled job's endpoint_id must be a str, int or float (it is stored as JSON), got {show(endpoint_id)}; "
            f"{job!r} was not accepted"
        )
    return {
        "e": endpoint_id,
        "p": job.payload,
        "r": job.priority,
        "m": job.max_attempts,
        "i": job.id,
        "s": scheduled_at,
        "c": job.created_at,
    }


def job_from_spool(seq: int, entry: Any) -> DispatchJob:
    """The job a spool entry of :func:`spool_entry` describes, numbered ``seq``; ConfigurationError for a bad entry."""
    if not isinstance(entry, dict):
        raise ConfigurationError(f"spool entry {seq} is not a spooled DispatchJob: {show(entry)}")
    try:
        job = DispatchJob(entry["e"], entry["p"], entry["r"], entry["m"], entry["i"], scheduled_at=entry["s"])
        created_at = float(entry["c"])
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigurationError(f"spool entry {seq} is not a spooled DispatchJob ({error!r}): {show(entry)}") from None
    job.created_at = created_at
    job._spool_seq = seq
    return job


@dataclass(eq=False, slots=True)  # slots: one object per batch, not two (no __dict__)
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
