"""The job store contract: the :class:`Store` base class, whose docstrings ARE the contract.

(That is why it runs past 600 lines: most of it is those docstrings, and the records.)

A store keeps jobs, dead letters, cron entries, queue pause flags, leases and the worker
registry (one row per running engine, :class:`WorkerInfo`). The engine is its only writer
of job state; the admin app and the CLI read it and call the few management methods.
Every store passes the one contract suite in ``tests/test_stores.py``
(``TestStoreContract``); a new store joins it by adding its factory to the ``store`` fixture.

Conventions every method follows:

- Times are float seconds since the Unix epoch, **always passed in by the caller**
  (``now=``); a store never reads the clock, so the engine (and tests) decide what
  "now" is and every backend compares times the same way.
- Payloads and results are JSON **text**; a store stores and returns the text and never
  decodes it. ``JobRecord.decoded_payload()`` / ``decoded_result()`` decode.
- Records returned are snapshots (fresh objects); changing one changes nothing stored.
- Job ids are strings chosen by the caller (the engine's are UUIDv7s as 32 hex digits,
  increasing within a process: see ``threaddispatch.jobs.new_job_id``); dead letter ids
  are strings chosen by the store.
- Every method is thread-safe, and safe from several processes where the backend is
  shared (SQLite file, PostgreSQL). Each method is one short transaction: a store never
  holds a lock or a transaction open between calls.
- Errors: an unreachable or locked backend raises ``StoreUnavailableError`` (callers
  may retry); any other backend failure ``StoreError``. Methods that name one object
  raise ``JobNotFoundError`` when it does not exist, except where a return value says so.
- A "worker" is a string id; a claimed job carries it in ``worker_id``. Methods that
  finish a running job take the ``worker_id`` and the ``attempts`` value the claim
  returned, and change nothing (returning False / None) when the job is no longer that
  claim (it was reaped, cancelled or re-claimed meanwhile): a late worker never
  overwrites newer state.

Schema changes are versioned: ``migrate()`` applies the numbered migrations in order and
records each in a ``dispatch_schema_version`` table (see ``SQLiteStore.MIGRATIONS`` for
the reference list a SQL backend mirrors).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple, TypeVar

from threaddispatch._validate import check_int
from threaddispatch.errors import InvalidStateError, JobNotFoundError

_R = TypeVar("_R")
_StoreT = TypeVar("_StoreT", bound="Store")

__all__ = [
    "ACTIVE_STATES",
    "CRON_OVERLAP_POLICIES",
    "DEPENDENCY_FAILURE_POLICIES",
    "FINAL_STATES",
    "READY_STATES",
    "Completion",
    "CronEntry",
    "DeadLetter",
    "JobRecord",
    "JobState",
    "LockHold",
    "QueueLimits",
    "Store",
    "WorkerInfo",
]


class JobState(str, Enum):
    """The states of a job. ``str`` values are what stores persist."""

    PENDING = "pending"
    """Waiting for its ``run_at``, then for a worker."""
    RUNNING = "running"
    """Claimed by a worker (``worker_id``), which heartbeats it."""
    COMPLETED = "completed"
    """The handler returned; ``result`` holds its JSON value."""
    FAILED = "failed"
    """Every attempt failed (or the handler raised a non-retryable error); a dead letter exists."""
    RETRYING = "retrying"
    """An attempt failed; waits for ``run_at`` (now + backoff), then runs again."""
    CANCELLED = "cancelled"
    """Cancelled by an operator, by the handler raising ``Cancel``, or by a failed dependency; never runs again."""
    WAITING = "waiting"
    """Waiting for its ``depends_on`` jobs to finish (``waiting_on`` of them still unfinished); then pending."""

    def __str__(self) -> str:
        return self.value


#: States a worker may claim from (when ``run_at`` has come).
READY_STATES = frozenset({JobState.PENDING, JobState.RETRYING})
#: States that hold a ``unique_key``: a second job with the same key is not created meanwhile.
ACTIVE_STATES = frozenset({JobState.PENDING, JobState.RETRYING, JobState.RUNNING, JobState.WAITING})
#: What a cron tick does while the entry's previous job is unfinished (``CronEntry.overlap``).
CRON_OVERLAP_POLICIES = ("skip", "queue", "allow")
#: What a dependent does when a job it depends on ends failed or cancelled (``JobRecord.on_dependency_failure``).
DEPENDENCY_FAILURE_POLICIES = ("cancel", "run")
#: States a job never leaves on its own; purged after the engine's retention.
FINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
#: The ``error`` :meth:`Store.reap_stale` records on a job that used all its attempts (and its dead letter).
WORKER_LOST_ERROR = "worker lost: heartbeat older than the stale threshold"


class Completion(NamedTuple):
    """One finished claim for :meth:`Store.complete_many`: the claim ``(job_id, worker_id, attempts)``
    and what to store, ``result`` (JSON text) and ``error`` (a note or None)."""

    job_id: str
    worker_id: str
    attempts: int
    result: str | None
    error: str | None


@dataclass
class JobRecord:
    """One job as stored. Built by the engine at enqueue; returned as a snapshot by stores.

    ``attempts`` counts the claims that started an attempt (the first run is attempt 1);
    a job gets ``max_retries + 1`` attempts. ``timeout`` is the handler's time budget in
    seconds (None: none). ``trace_context`` is the W3C ``traceparent`` of the span that
    enqueued the job (None: none), which the worker's run span links to; a retried or
    replayed job keeps it.

    ``depends_on`` lists the ids of the jobs this one runs after: it is stored ``waiting``
    (never claimed) while ``waiting_on`` of them are unfinished, and becomes pending when
    the last completes. When one ends failed or cancelled the job is cancelled too
    (``on_dependency_failure="cancel"``) or counts it as finished (``"run"``). The store
    decides the state at insert (the caller passes pending).

    ``lock`` names a serial lock: of the jobs holding one, at most one runs at a time across
    every process on the store, and they run in insertion order (a claim takes a locked job
    only when no job with its lock is running and none inserted before it is unfinished).
    A job whose handler outlives its claim (past its timeout, cancelled while running, handed
    back at stop) shows its new state at once (failed, retrying, cancelled, pending) while its
    lock stays held until the handler returns: a :class:`LockHold` (``Store.list_holds``).
    Not thread-safe to mutate; stores hand out fresh copies.
    """

    id: str
    name: str
    payload: str
    queue: str = "default"
    state: JobState = JobState.PENDING
    priority: int = 0
    attempts: int = 0
    max_retries: int = 3
    timeout: float | None = None
    run_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    worker_id: str | None = None
    unique_key: str | None = None
    result: str | None = None
    error: str | None = None
    trace_context: str | None = None
    depends_on: tuple[str, ...] = ()
    on_dependency_failure: str = "cancel"
    waiting_on: int = 0
    lock: str | None = None

    def copy(self) -> JobRecord:
        """A snapshot: a new record with the same field values (``dataclasses.replace(self)``, without its cost)."""
        clone = object.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        return clone

    def decoded_payload(self) -> Any:
        """The payload decoded from its JSON text."""
        return json.loads(self.payload)

    def decoded_result(self) -> Any:
        """The handler's return value decoded from JSON (None when there is none)."""
        return None if self.result is None else json.loads(self.result)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (payload and result decoded), for admin APIs and the CLI."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["state"] = self.state.value
        data["payload"] = self.decoded_payload()
        data["result"] = self.decoded_result()
        data["depends_on"] = list(self.depends_on)
        return data


@dataclass
class DeadLetter:
    """A job that failed for good, kept for inspection and replay.

    It copies what replay needs (name, queue, payload, priority, max_retries, the trace
    context, and what the replayed job keeps: the serial ``lock``, ``unique_key``,
    ``depends_on``, ``on_dependency_failure`` and ``timeout``), so it outlives the purge of its
    job. Created by :meth:`Store.fail` (and by :meth:`Store.reap_stale` for a job out of
    attempts) in the same transaction. ``on_dependency_failure`` None marks a dead letter stored
    before a store kept those fields (SQLite migration 11, PostgreSQL 14): a replay then reads
    them from its job's record while it is stored.
    """

    id: str
    job_id: str
    name: str
    queue: str
    payload: str
    priority: int
    max_retries: int
    attempts: int
    error: str | None
    failed_at: float
    trace_context: str | None = None
    unique_key: str | None = None
    lock: str | None = None
    depends_on: tuple[str, ...] = ()
    on_dependency_failure: str | None = None
    timeout: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (payload decoded, ``depends_on`` a list)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["payload"] = json.loads(self.payload)
        data["depends_on"] = list(self.depends_on)
        return data


@dataclass
class CronEntry:
    """A recurring job: ``job_name`` with ``payload`` enqueued on ``queue`` at every tick of ``expression``.

    ``name`` identifies the entry across processes (every engine that declares the same
    name shares one entry); ``last_tick`` is the tick most recently fired (epoch seconds).
    A disabled entry (:meth:`Store.set_cron_enabled`) has ``last_tick = math.inf``, so no
    tick is ever later and :meth:`Store.fire_cron` never fires it. ``overlap`` says what a
    tick does while the entry's previous job is unfinished: ``"skip"`` (nothing), ``"queue"``
    (its job waits for the previous one: they share a serial lock) or ``"allow"`` (runs too).
    """

    name: str
    expression: str
    job_name: str
    payload: str
    queue: str = "default"
    priority: int = 0
    last_tick: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    overlap: str = "skip"

    @property
    def enabled(self) -> bool:
        """Whether the entry fires (False once disabled with :meth:`Store.set_cron_enabled`)."""
        return self.last_tick != math.inf

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (payload decoded, ``enabled`` added; ``last_tick`` None while disabled)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["payload"] = json.loads(self.payload)
        data["enabled"] = self.enabled
        if not self.enabled:
            data["last_tick"] = None
        return data


@dataclass(frozen=True)
class WorkerInfo:
    """One running JobEngine, as its worker-registry row (:meth:`Store.register_worker`).

    ``id`` is the run's worker id (the ``worker_id`` its claims carry); ``queues`` the queues
    it serves; ``running`` the jobs it ran at its last heartbeat; times are epoch seconds.
    """

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    started_at: float
    heartbeat_at: float
    running: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``queues`` as a list)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["queues"] = list(self.queues)
        return data


@dataclass(frozen=True)
class LockHold:
    """A serial lock kept held past its job's running state, while the job's handler still runs.

    A Python thread cannot be killed: a handler past its timeout, or whose running job was
    cancelled or handed back at stop, goes on until it returns. Its job's state is final (or
    retrying, or pending) at once, but the lock stays held by this record, made by
    :meth:`Store.hold_locks` (or by :meth:`Store.cancel` of a running job), until the worker
    drops it when the handler returns (:meth:`Store.release_holds`). The worker's heartbeat
    keeps ``heartbeat_at`` fresh; a hold whose heartbeat stopped (its worker died) is deleted
    by :meth:`Store.reap_stale`, by the rule that recovers running jobs.
    """

    lock: str
    job_id: str
    attempts: int
    worker_id: str
    heartbeat_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class QueueLimits:
    """A queue's limits for the whole cluster (:meth:`Store.set_queue_limits`).

    ``rate_limit``: jobs started per second, a token bucket of ``rate_burst`` tokens (None:
    none); ``max_concurrency``: jobs running at once (None: no bound). The engine validates
    them (QueueConfig).
    """

    queue: str
    rate_limit: float | None = None
    rate_burst: int = 1
    max_concurrency: int | None = None


def limited_room(
    limits: QueueLimits, tokens: float, updated_at: float, running: int, wanted: int, *, now: float
) -> tuple[int, float]:
    """How many of ``wanted`` jobs a claim of ``limits.queue`` may take now, and the bucket's refilled tokens.

    ``tokens`` / ``updated_at``: the bucket as last stored; ``running``: the queue's running
    jobs. A clock behind ``updated_at`` (another host's) refills nothing.
    """
    room = wanted
    if limits.max_concurrency is not None:
        room = min(room, limits.max_concurrency - running)
    if limits.rate_limit is not None:
        tokens = min(float(limits.rate_burst), tokens + max(0.0, now - updated_at) * limits.rate_limit)
        room = min(room, int(tokens))
    return max(0, room), tokens


def requeue_waits(
    job_id: str,
    depends_on: Sequence[str],
    on_dependency_failure: str,
    states: Mapping[str, str | None],
    *,
    subject: str | None = None,
) -> list[str]:
    """The dependencies a job run again waits for (none: it is pending), the rule every store applies.

    A job runs again when it is requeued (:meth:`Store.requeue`) or its dead letter replayed as a
    new job (:meth:`Store.replay_dead_letter`). ``states``: each dependency's state value
    (``"completed"``, ``"running"``...), None for one no longer stored (purged: it finished long
    ago, and blocks nothing). Under policy ``"cancel"`` a dependency that ended failed or
    cancelled refuses the run with InvalidStateError naming ``subject`` (default: the job) and
    that dependency (retry the dependency first: its dependent would otherwise run without its
    result); every unfinished one is waited for.
    """
    subject = f"job {job_id!r}" if subject is None else subject
    unfinished = []
    for dependency in dict.fromkeys(depends_on):
        state = states.get(dependency)
        if state is None or state == JobState.COMPLETED.value:
            continue
        if state in (JobState.FAILED.value, JobState.CANCELLED.value):
            if on_dependency_failure == "cancel":
                raise InvalidStateError(
                    f"{subject} cannot run again while its dependency {dependency!r} is {state}: "
                    "retry the dependency first (the job then waits for it)"
                )
            continue
        unfinished.append(dependency)
    return unfinished


def key_held(subject: str, unique_key: str, holder: str) -> InvalidStateError:
    """The refusal of a job run again (requeued, or a replayed dead letter's new job), named ``subject``,
    whose ``unique_key`` the active job ``holder`` holds: the rule every store applies."""
    return InvalidStateError(f"{subject}: unique_key {unique_key!r} is held by active job {holder!r}")


def _page_after(
    fetch: Callable[[int, int], Sequence[_R]],
    key: Callable[[_R], tuple[str, float]],
    after: tuple[str, float],
    position: int,
    limit: int,
) -> list[_R]:
    """The ``limit`` records that follow the anchor ``after = (id, time)`` in a newest-first listing.

    ``fetch(limit, offset)`` reads the listing. The scan starts a little before the
    ``position`` hint (where the anchor was last seen) and falls back to the start when
    the listing moved past it. With the anchor present the page is exact whatever was
    inserted or removed before it; with the anchor gone, the page starts at the first
    record older than it (records sharing its time are all included: repeats, never gaps).
    """
    chunk = min(max(2 * limit, 100), 1000)
    for start in (max(0, position - chunk), 0) if position > 0 else (0,):
        found = False
        ties: list[_R] = []
        out: list[_R] = []
        offset = start
        while len(out) < limit:
            batch = fetch(chunk, offset)
            if (
                offset == start
                and start > 0
                and (
                    not batch
                    or key(batch[0])[1] < after[1]
                    or (key(batch[0])[1] == after[1] and key(batch[0])[0] != after[0])
                )
            ):
                break  # the hint may be past the anchor's place: rescan from the start
            for record in batch:
                record_id, record_time = key(record)
                if found:
                    out.append(record)
                elif record_id == after[0]:
                    found, ties = True, []
                elif record_time < after[1]:
                    found = True
                    out.extend(ties)
                    out.append(record)
                elif record_time == after[1]:
                    ties.append(record)
            offset += len(batch)
            if len(batch) < chunk:
                return (out if found else ties)[:limit]
        else:
            return out[:limit]
    return []


class Store(abc.ABC):
    """A persistent home for jobs. Abstract: the docstrings below are the contract.

    See the module docstring for the conventions (caller-supplied times, JSON text,
    snapshots, thread and process safety, errors, claim fencing). Implementations must be
    usable from many threads at once and must not reuse a connection across ``fork()``.
    """

    # -- lifecycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema to the newest version; returns that version. Idempotent.

        Safe to call from several processes at once. Stores call it on first use unless
        built with ``migrate=False``.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and handles. Idempotent; a closed store raises StoreError when used."""

    # -- jobs: producers ---------------------------------------------------------------------

    @abc.abstractmethod
    def enqueue(self, jobs: Sequence[JobRecord]) -> list[str]:
        """Insert ``jobs`` in ONE transaction; returns one id per job, in order.

        A job whose ``unique_key`` is held by an ACTIVE job (pending, retrying, running)
        is not inserted: its returned id is the holder's. Two jobs in the same call with
        the same key behave the same way (the second gets the first's id). Blocks for one
        short transaction. Raises StoreError if a job id already exists.

        A job with ``depends_on`` is stored ``waiting`` with ``waiting_on`` = how many of
        those jobs are unfinished (pending when none is; cancelled at once when one already
        ended failed or cancelled and ``on_dependency_failure`` is ``"cancel"``). Its
        dependencies may be jobs inserted earlier in the same call. An unknown dependency
        id raises JobNotFoundError, inserting nothing.
        """

    # -- jobs: workers -----------------------------------------------------------------------

    @abc.abstractmethod
    def claim(self, queues: Sequence[str], limit: int, *, worker_id: str, now: float) -> list[JobRecord]:
        """Atomically claim up to ``limit`` ready jobs from ``queues`` for ``worker_id``.

        Ready: state pending or retrying and ``run_at <= now``, and, for a job with a
        ``lock``, no job with that lock running, no :class:`LockHold` of that lock (a handler
        still running after its job left the running state, this job's own earlier attempt
        included) and none inserted before it still active (pending, retrying, waiting): a
        claim of several never takes two jobs of one lock.
        Order: ``priority``
        descending, then ``run_at``, then insertion order. Claimed jobs become running
        with ``worker_id``, ``started_at = heartbeat_at = now`` and ``attempts + 1``; the
        returned records show that. A job is never handed to two claims, whatever the
        number of threads and processes claiming. Returns [] when nothing is ready (and for
        ``limit <= 0`` or no queues). Blocks for one short write transaction.
        """

    @abc.abstractmethod
    def heartbeat(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """Set ``heartbeat_at = now`` on those of ``job_ids`` still running for ``worker_id``.

        Returns the ids that were updated; an id missing from the result is no longer this
        worker's claim (cancelled, reaped, finished), which tells the worker to give up on it.
        """

    @abc.abstractmethod
    def reap_stale(self, *, older_than: float, now: float) -> list[str]:
        """Recover running jobs whose ``heartbeat_at < older_than`` (their worker died).

        A job with attempts left goes back to pending (``run_at = now``, worker cleared);
        one that used all ``max_retries + 1`` attempts becomes failed with a dead letter
        (error "worker lost"). Returns the ids recovered either way. The lock holds
        (:class:`LockHold`) whose ``heartbeat_at < older_than`` are deleted in the same
        transaction (their worker died: its handlers are gone), which frees their locks; they
        are not among the ids returned. One transaction.
        """

    @abc.abstractmethod
    def complete(
        self, job_id: str, *, worker_id: str, attempts: int, result: str | None, now: float, error: str | None = None
    ) -> bool:
        """Mark the claim ``(job_id, worker_id, attempts)`` completed with ``result`` (JSON text).

        ``finished_at = now``; ``error`` may carry a note (e.g. an unstorable result).
        Returns False, changing nothing, if the job is no longer that claim.

        Every method that finishes a job (complete, complete_many, complete_and_claim, fail,
        cancel, reap_stale) releases its waiting dependents in the same transaction:
        ``waiting_on`` drops by one, and at 0 the dependent becomes pending; a failed or
        cancelled job cancels its dependents of policy ``"cancel"`` (and theirs, in turn).
        """

    @abc.abstractmethod
    def complete_many(self, outcomes: Sequence[Completion], *, now: float) -> set[str]:
        """:meth:`complete` for many ``(job_id, worker_id, attempts, result, error)`` in ONE transaction.

        Returns the ids that applied (claims no longer current are skipped). The engine's
        workers group-commit their completions through this call.
        """

    def set_queue_limits(self, limits: Sequence[QueueLimits], *, now: float) -> None:
        """Keep ``limits`` for their queues, for every claimer of the store (the engine calls it at start).

        From then on :meth:`claim` (and :meth:`complete_and_claim`) takes a limited queue's
        jobs only within its limits, across every process claiming through a store that
        registered them: at most ``max_concurrency`` running at once, at most ``rate_limit``
        started per second (the bucket, kept in the store, is refilled and spent in the claim's
        transaction). A later call replaces a queue's limits (its bucket keeps its tokens, up to
        the new burst). This default keeps none: the engines' per-process limits alone apply.
        """
        return None

    def complete_and_claim(
        self,
        outcomes: Sequence[Completion],
        queues: Sequence[str],
        limit: int,
        *,
        worker_id: str,
        now: float,
    ) -> tuple[set[str], list[JobRecord]]:
        """:meth:`complete_many` then :meth:`claim`; returns (ids completed, jobs claimed).

        The engine's fetcher writes the jobs its workers finished and claims their
        successors with this call. This default makes two transactions; a backend may
        override it to make one (SQLiteStore does), which is where most throughput comes from.
        """
        return self.complete_many(outcomes, now=now), self.claim(queues, limit, worker_id=worker_id, now=now)

    @abc.abstractmethod
    def retry_later(
        self, job_id: str, *, worker_id: str, attempts: int, run_at: float, error: str | None, now: float
    ) -> bool:
        """Move the claim back to retrying, due at ``run_at``, recording ``error``.

        The worker is cleared; ``attempts`` keeps its value (the next claim adds one).
        Returns False, changing nothing, if the job is no longer that claim.
        """

    @abc.abstractmethod
    def fail(
        self, job_id: str, *, worker_id: str | None, attempts: int | None, error: str | None, now: float
    ) -> DeadLetter | None:
        """Mark the job failed and push a dead letter for it, in one transaction.

        With ``worker_id``/``attempts`` it applies only to that claim (None and nothing
        changed otherwise). Returns the new dead letter.
        """

    @abc.abstractmethod
    def release(self, job_ids: Sequence[str], *, worker_id: str, now: float, refund_attempt: bool = True) -> int:
        """Give claims back: those of ``job_ids`` running for ``worker_id`` become pending.

        Used at stop for claimed jobs that never started (``refund_attempt=True`` takes the
        claim's attempt back) and for hung ones handed back (``False``). ``run_at = now``.
        Returns how many were released.
        """

    # -- jobs: management --------------------------------------------------------------------

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The job with ``job_id``, or None."""

    def get_within(self, job_id: str, *, timeout: float) -> JobRecord | None:
        """:meth:`get`, waiting at most about ``timeout`` seconds for a lock another session holds.

        Past it the read gives up with StoreUnavailableError (``JobEngine.result(timeout=)``
        reads through it, so its own deadline holds). The default is :meth:`get`, whose
        stores never wait for another session's lock longer than their own bound.
        """
        return self.get(job_id)

    @abc.abstractmethod
    def list_jobs(
        self, *, state: JobState | None = None, queue: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """Jobs filtered by state and queue, newest first (by ``created_at``, then insertion)."""

    @abc.abstractmethod
    def counts(self, *, queue: str | None = None) -> dict[JobState, int]:
        """``{state: number of jobs}`` with every state present (0 when none), for one queue or all."""

    @abc.abstractmethod
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
        """Cancel a job that has not finished: pending, retrying or running become cancelled.

        Returns False if it was already completed, failed or cancelled (nothing changes).
        With ``include_running=False`` only a pending or retrying job is cancelled, and a
        running one is left as it is (False): the state check and the change are ONE
        conditional statement, so a job claimed concurrently is either cancelled before
        its claim or refused, never cancelled after its handler started. With
        ``worker_id``/``attempts`` (a handler raised ``Cancel``) it applies only to that
        claim (``include_running`` is then ignored). A running job cancelled by an operator
        stops being its worker's claim: the worker's next heartbeat learns it. A running job
        with a ``lock`` cancelled by an operator keeps its lock held, in the same transaction:
        a :class:`LockHold` for its claim (its handler may still run), which the worker drops
        when the handler returns. Raises JobNotFoundError for an unknown id.
        """

    @abc.abstractmethod
    def requeue(self, job_id: str, *, now: float) -> None:
        """Run a failed or cancelled job again: pending, ``attempts = 0``, ``run_at = now``.

        Its dead letters are deleted in the same transaction. Raises JobNotFoundError for an
        unknown id, InvalidStateError for a job in any other state, and leaves the job as
        it is if its ``unique_key`` is held by another active job (InvalidStateError).

        A job with dependencies (``depends_on``) is placed as at its enqueue, by
        :func:`requeue_waits`: waiting (``waiting_on``) for each dependency not yet finished,
        released as they complete; pending once all completed (or are no longer stored);
        and, under ``on_dependency_failure="cancel"``, refused with InvalidStateError (the
        job left as it is) while one of them is failed or cancelled: retry that one first.
        """

    @abc.abstractmethod
    def purge_finished(self, *, older_than: float) -> int:
        """Delete completed, failed and cancelled jobs with ``finished_at < older_than``; returns how many."""

    # -- dead letters ------------------------------------------------------------------------

    @abc.abstractmethod
    def list_dead_letters(self, *, queue: str | None = None, limit: int = 50, offset: int = 0) -> list[DeadLetter]:
        """Dead letters, newest first."""

    @abc.abstractmethod
    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """The dead letter with that id, or None."""

    @abc.abstractmethod
    def replay_dead_letter(self, dead_letter_id: str, *, job: JobRecord) -> str:
        """Insert ``job`` (built by the caller from the dead letter) and delete the dead letter, atomically.

        The caller passes a new pending record that keeps what the failed job had (its
        ``lock``, ``unique_key``, ``depends_on``, ``on_dependency_failure``). The store places it
        as :meth:`requeue` places a job run again, in the same transaction as the delete: a
        ``unique_key`` held by an active job, or (under ``on_dependency_failure="cancel"``) a
        dependency that is failed or cancelled, refuses the replay with InvalidStateError and
        leaves the dead letter as it is; otherwise the job is waiting (``waiting_on``) for each
        dependency not yet finished (:func:`requeue_waits`: one no longer stored counts as
        finished), else pending. Its ``lock`` is a column like any other: the job takes its turn
        behind the lock's earlier jobs. A dead letter replayed at once by several callers (threads,
        processes) makes one job: the others get JobNotFoundError.

        Returns ``job.id``. Raises JobNotFoundError for an unknown dead letter.
        """

    @abc.abstractmethod
    def purge_dead_letters(self, *, older_than: float | None = None) -> int:
        """Delete dead letters with ``failed_at < older_than`` (all when None); returns how many."""

    # -- queues --------------------------------------------------------------------------------

    @abc.abstractmethod
    def set_queue_paused(self, queue: str, paused: bool, *, now: float) -> None:
        """Record that ``queue`` is paused (workers claim nothing from it) or resumed."""

    @abc.abstractmethod
    def paused_queues(self) -> set[str]:
        """The queues paused now."""

    # -- cron and leases ----------------------------------------------------------------------

    @abc.abstractmethod
    def acquire_lease(self, name: str, *, holder: str, ttl: float, now: float) -> bool:
        """Take or renew the named lease for ``holder`` until ``now + ttl``; returns whether held.

        Succeeds when the lease is free, expired (``expires_at <= now``) or already
        ``holder``'s. Atomic across processes. Used as the cron leader lock.
        """

    @abc.abstractmethod
    def release_lease(self, name: str, *, holder: str) -> None:
        """Give the lease up if ``holder`` has it (so another process can lead at once)."""

    @abc.abstractmethod
    def upsert_cron(self, entry: CronEntry, *, now: float) -> CronEntry:
        """Create the cron entry, or update its expression/job/payload/queue/priority/overlap keeping ``last_tick``.

        A new entry is stored with the ``last_tick`` given (the engine passes the tick at
        or before now, so a new entry does not fire for a tick that passed before it
        existed). Returns the stored entry.
        """

    @abc.abstractmethod
    def list_crons(self) -> list[CronEntry]:
        """Every cron entry, by name."""

    @abc.abstractmethod
    def delete_cron(self, name: str) -> bool:
        """Delete the cron entry; returns whether it existed."""

    @abc.abstractmethod
    def fire_cron(self, name: str, *, tick: float, job: JobRecord) -> bool:
        """Fire the entry for ``tick`` at most once across every process, atomically.

        If the entry's ``last_tick`` is None or ``< tick``: set it to ``tick`` and insert
        ``job`` (unique-key rules as :meth:`enqueue`) in one transaction, and return True.
        The insert is skipped (still True) when the entry's ``overlap`` is ``"skip"`` and an
        unfinished job holds ``job.lock`` (the entry's previous job), or a :class:`LockHold`
        does (the previous job's handler still runs after a timeout or a cancel).
        Otherwise (another process fired this tick) change nothing and return False.
        """

    # -- admin helpers, with default implementations on the methods above ---------------------------

    def list_jobs_after(
        self,
        after: tuple[str, float] | None,
        *,
        state: JobState | None = None,
        queue: str | None = None,
        limit: int = 50,
        position: int = 0,
    ) -> list[JobRecord]:
        """Keyset page of :meth:`list_jobs`: the jobs that follow ``after = (job id, created_at)``.

        ``after`` None gives the first page. ``position`` is a hint: the anchor's offset
        when it was listed. Unlike an offset, the anchor keeps its place when jobs are
        inserted, claimed, finished or purged meanwhile: no job is skipped; a job whose
        state changed into the filter while paging may be missed, as in any live listing.
        The default reads :meth:`list_jobs` in chunks from about ``position``; a store may
        override it with a keyset query. Blocks for one or a few short reads.
        """
        self._check_limit(limit, position)
        if after is None:
            return self.list_jobs(state=state, queue=queue, limit=limit)
        return _page_after(
            lambda n, offset: self.list_jobs(state=state, queue=queue, limit=n, offset=offset),
            lambda job: (job.id, job.created_at), after, position, limit,
        )  # fmt: skip

    def list_dead_letters_after(
        self, after: tuple[str, float] | None, *, queue: str | None = None, limit: int = 50, position: int = 0
    ) -> list[DeadLetter]:
        """Keyset page of :meth:`list_dead_letters` after ``after = (dead letter id, failed_at)``.

        Same rules and default as :meth:`list_jobs_after`.
        """
        self._check_limit(limit, position)
        if after is None:
            return self.list_dead_letters(queue=queue, limit=limit)
        return _page_after(
            lambda n, offset: self.list_dead_letters(queue=queue, limit=n, offset=offset),
            lambda letter: (letter.id, letter.failed_at), after, position, limit,
        )  # fmt: skip

    def count_dead_letters(self, *, queue: str | None = None) -> int:
        """How many dead letters there are, in ``queue`` or in every queue.

        The default pages through :meth:`list_dead_letters_after` (one read per 1,000
        letters); a store should override it with one ``COUNT``. Blocks for those reads.
        """
        total = 0
        after: tuple[str, float] | None = None
        while True:
            page = self.list_dead_letters_after(after, queue=queue, limit=1000, position=total)
            total += len(page)
            if len(page) < 1000:
                return total
            after = (page[-1].id, page[-1].failed_at)

    def counts_by_queue(self, queues: Sequence[str]) -> dict[str, dict[JobState, int]]:
        """``{queue: counts(queue=queue)}`` for each of ``queues``, every state present (0 when none).

        For listing many queues at once (the admin's ``/queues``). The default makes one
        :meth:`counts` read per queue; a store should override it with one read (a
        ``GROUP BY queue, state``). Blocks for that read or those reads.
        """
        return {queue: self.counts(queue=queue) for queue in queues}

    def throughput(self, *, since: float, now: float, bucket: float = 60.0) -> list[tuple[int, JobState, int]]:
        """How many jobs completed and failed in each ``bucket`` seconds of ``[since, now)``, by ``finished_at``.

        Rows ``(bucket index, state, count)`` (index 0 starts at ``since``), nonzero ones
        only, in any order; for the admin's throughput chart. The default pages through
        :meth:`list_jobs` of both states (one read per 1,000 jobs; paging by offset, it may
        miss or repeat a job finishing meanwhile); a store should override it with one
        ``GROUP BY``. Blocks for those reads.
        """
        found: dict[tuple[int, JobState], int] = {}
        for state in (JobState.COMPLETED, JobState.FAILED):
            offset, full = 0, True
            while full:
                page = self.list_jobs(state=state, limit=1000, offset=offset)
                for job in page:
                    if job.finished_at is not None and since <= job.finished_at < now:
                        key = (int((job.finished_at - since) // bucket), state)
                        found[key] = found.get(key, 0) + 1
                offset, full = offset + 1000, len(page) == 1000
        return [(index, state, count) for (index, state), count in found.items()]

    def set_cron_enabled(self, name: str, enabled: bool, *, now: float) -> CronEntry:
        """Disable a cron entry, or enable it again; returns the stored entry. Idempotent.

        Disabled: ``last_tick = math.inf``, so :meth:`fire_cron` refuses every tick in
        every process, and it stays so across restarts (:meth:`upsert_cron` keeps
        ``last_tick``). Enabled again: ``last_tick = now``, so ticks that passed while it
        was disabled are not caught up; the next one fires. Raises JobNotFoundError for an
        unknown name. The default replaces the entry (delete, then upsert: two short
        transactions; a tick fired in between is refused and logged, ``created_at``
        restarts); a store may override it with one update.
        """
        entry = next((e for e in self.list_crons() if e.name == name), None)
        if entry is None:
            raise JobNotFoundError(f"no cron entry named {name!r}")
        if entry.enabled == bool(enabled):
            return entry
        self.delete_cron(name)
        return self.upsert_cron(dataclasses.replace(entry, last_tick=now if enabled else math.inf), now=now)

    def release_waiting(self, *, now: float) -> int:
        """Settle waiting jobs whose dependencies all finished (pending, or cancelled); how many changed.

        The backstop of the release at completion, run by the engines' upkeep: on a backend
        where an enqueue can race the completion of its dependency (PostgreSQL's snapshots),
        a dependent may miss its release. The default does nothing (stores whose writers are
        serialised cannot miss one). One short write.
        """
        return 0

    # -- serial lock holds past the running state --------------------------------------------------
    # A store without holds may keep these defaults: nothing is held, so a lock is free as soon as
    # its job leaves the running state (a handler abandoned by a timeout may then overlap the next).

    def hold_locks(self, claims: Sequence[tuple[str, int]], *, worker_id: str, now: float) -> set[str]:
        """Keep the serial locks of the running claims ``(job_id, attempts)`` of ``worker_id`` held (:class:`LockHold`).

        Called before the engine ends a claim whose handler still runs (a timeout, a hand-back
        at stop): the job's state then changes, its lock does not free. Claims that are no
        longer running for that worker, or whose job has no lock, get none. Idempotent.
        Returns the job ids now held. One short write. The default holds nothing.
        """
        return set()

    def heartbeat_holds(self, job_ids: Sequence[str], *, worker_id: str, now: float) -> set[str]:
        """Set ``heartbeat_at = now`` on the holds of ``worker_id`` for ``job_ids``; the ids that have one.

        One short write. The default returns an empty set.
        """
        return set()

    def release_holds(self, claims: Sequence[tuple[str, int]], *, worker_id: str) -> int:
        """Delete the holds of ``worker_id`` for the claims ``(job_id, attempts)`` (their handlers returned).

        The locks' next jobs may then be claimed; the store wakes its subscribers as a lock
        freed by a finished job does. Returns how many were deleted. Idempotent. One short
        write. The default deletes nothing.
        """
        return 0

    def list_holds(self, *, lock: str | None = None) -> list[LockHold]:
        """The lock holds (of ``lock``, or all), oldest heartbeat first. One read. The default lists none."""
        return []

    # -- the worker registry ---------------------------------------------------------------------
    # A store without a registry may keep these defaults: nothing is registered, none listed.

    def register_worker(self, info: WorkerInfo) -> None:
        """Insert or replace the registry row of worker ``info.id``. One short write."""
        return None

    def heartbeat_worker(self, worker_id: str, *, running: int, now: float) -> bool:
        """Set worker ``worker_id``'s ``heartbeat_at = now`` and ``running``; False when it has no row.

        (A row deleted meanwhile, e.g. reaped while its process was paused, is not made
        again here: the engine registers anew.) One short write. The default returns True.
        """
        return True

    def remove_worker(self, worker_id: str) -> bool:
        """Delete worker ``worker_id``'s row; whether there was one. Idempotent. One short write."""
        return False

    def list_workers(self, *, now: float, stale_after: float) -> list[WorkerInfo]:
        """The workers whose heartbeat is at most ``stale_after`` seconds before ``now``, oldest start first."""
        return []

    def reap_workers(self, *, older_than: float) -> int:
        """Delete the rows of workers whose last heartbeat is before ``older_than``; how many. One write."""
        return 0

    # -- helpers shared by implementations ------------------------------------------------------

    @staticmethod
    def _check_limit(limit: int, offset: int) -> None:
        # Bounded by 64 bits: LIMIT/OFFSET are 64-bit integers in SQLite and PostgreSQL.
        check_int("limit", limit, 0)
        check_int("offset", offset, 0)

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        """The exit drain of ``threaddispatch._lifecycle``: a store holds no pending work, so (0, 0)."""
        return (0, 0)

    def __enter__(self: _StoreT) -> _StoreT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def describe(self) -> Mapping[str, object]:
        """A short description for logs and the admin app (kind, location); no secrets."""
        return {"kind": type(self).__name__}

    def subscribe_wakeups(self, callback: Callable[[str | None, float | None], None]) -> Callable[[], None]:
        """Have ``callback(queue, run_at)`` called when jobs become ready in the store, from any process.

        ``queue`` is the queue of the new jobs and ``run_at`` the earliest time they are
        due; ``(None, None)`` means "something may have changed: look now". The callback
        runs on a store thread (MemoryStore: the thread of the store call that made the
        job ready, with no lock held) and must be quick (engines just wake their fetcher).
        Returns an idempotent unsubscribe function. Non-blocking. This default has no
        signal to offer: it calls nothing and returns a no-op, and engines poll
        (PostgresStore overrides it with LISTEN/NOTIFY, SQLiteStore with a ``PRAGMA
        data_version`` watcher, MemoryStore with calls made after the mutating store call).
        """
        return _no_op


def _no_op() -> None:
    """The unsubscribe function of a store without wake-ups."""
