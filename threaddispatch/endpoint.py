"""EndpointBatchDispatcher: per-endpoint webhook batches with retries, a concurrency limit, stats and events.

The face of k-msg's webhook ``BatchDispatcher``: its constructor's checks, ``add_job``, the
synchronous ``process_*`` calls, stats, events and shutdown. It is one of three modules:

- :mod:`threaddispatch._endpoint_records`: what users build and read (``DispatchJob``,
  ``WebhookBatch``, ``BatchStats``, the event names) and the checks of a job's values;
- :mod:`threaddispatch._endpoint_core`: the scheduler core the worker and the sending
  threads run (the engine's hooks, one batch's send and settling, retries, the bound);
- this module: the face, over one core. Everything the package exported from
  ``threaddispatch.endpoint`` is still importable from here.

The core runs on the shared :class:`~threaddispatch._engine.BatchEngine`: one keyed lane per
endpoint (a priority lane), the engine's window as ``batch_timeout``, its gate as the
``max_concurrent_batches`` limit, ``put_later`` as the timer of retries and of jobs with a
``scheduled_at``, and ``take_now``/``settle`` for the synchronous ``process_*`` calls. The
engine's worker takes the batches; they are sent on a
:class:`~threaddispatch._pool.WorkerPool` of sending threads, and a sending thread whose batch
ends takes the next due one itself (``settle_and_take``), so at the limit a batch costs no
hand-off between threads. Sends that return at once go on one sending thread (more would only
contend for the GIL with ``add_job``); sends that wait (I/O, a hung receiver) start more, up to
``max_concurrent_batches`` at once. Closing
(``close``/``shutdown``, ``with``, the close of an unreferenced dispatcher) is the shared
:class:`~threaddispatch._lifecycle.Closing`.

Every job is in exactly one place at a time (an endpoint's queue, a batch being sent, the
schedule of retries and not-yet-due jobs, or finished: delivered, exhausted, dropped, or
cancelled at shutdown), and it moves between them under the engine's lock, so the
dispatcher never loses a job and never sends one twice.

Memory is bounded by ``max_pending_jobs``: the jobs held (accepted and not finished, so
queued, in a batch, or waiting for a retry or their ``scheduled_at``) are counted under
``Core.lock``, and ``add_job`` applies the overflow policy of
:class:`~threaddispatch.BackgroundDispatcher` when the count is at the bound. A retry never
counts again: the job is held already.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable
from typing import Any

from threaddispatch import _immediate
from threaddispatch._endpoint_core import Core
from threaddispatch._endpoint_records import (
    EVENTS,
    MAX_SCHEDULE_AHEAD,
    BatchStats,
    BatchStatus,
    DispatchJob,
    JobStatus,
    SendBatch,
    WebhookBatch,
    check_endpoint_id,
    check_scheduled_at,
    job_from_spool,
    new_id,
    spool_entry,
)
from threaddispatch._engine import OVERFLOW_POLICIES, Overflow
from threaddispatch._lifecycle import Closing
from threaddispatch._spool import Spool, SpoolDeadLetter, SpoolSync
from threaddispatch._trace import Tracing, make_tracing
from threaddispatch._validate import check_positive_int, check_seconds, check_wait, show
from threaddispatch.backoff import Exponential, RetryPolicy
from threaddispatch.errors import ConfigurationError, DispatcherClosedError, InvalidStateError, StoreError
from threaddispatch.events import Listener
from threaddispatch.metrics import Metrics, check_metrics

__all__ = [
    "DEFAULT_MAX_PENDING_JOBS",
    "EVENTS",
    "MAX_SCHEDULE_AHEAD",
    "BatchStats",
    "BatchStatus",
    "DispatchJob",
    "EndpointBatchDispatcher",
    "JobStatus",
    "SendBatch",
    "WebhookBatch",
]

# The default retry: 3 attempts, exponential from 1 s (doubling, capped at 60 s). A job's own
# max_attempts, when it has one, overrides the policy's.
_DEFAULT_RETRY = RetryPolicy(max_attempts=3, backoff=Exponential(initial=1.0))

_names = iter(range(1, 1 << 62))
_log = logging.getLogger("threaddispatch")

# The default max_pending_jobs. A held job costs its DispatchJob (about 200 bytes) plus its
# payload: 100_000 jobs of 1 KiB are about 120 MB, a bound a service notices before the
# kernel does. And at the default max_batch_size (100) and max_concurrent_batches (10) it
# is 100 full rounds of batches: a backlog that large means the endpoints are down or far
# too slow, and more buffering would only postpone the failure.
DEFAULT_MAX_PENDING_JOBS = 100_000


class EndpointBatchDispatcher(Closing):
    """Batches jobs per endpoint and calls ``send_batch(endpoint_id, jobs)`` for each batch.

    A batch holds jobs of one endpoint only, at most ``max_batch_size`` of them, highest
    ``priority`` first and first in first out within a priority. An endpoint's queue goes at
    once when it holds ``max_batch_size`` jobs, otherwise ``batch_timeout`` seconds after its
    first job arrived. At most ``max_concurrent_batches`` batches are in flight: the first
    batch over the limit is skipped (``batch_skipped``), its jobs stay queued, and it goes when
    a batch finishes (or is retried when its next window closes); batches that come due while
    it waits queue up behind it, in order, untried and without an event of their own, so a
    full limit costs the same with 10 endpoints or 100,000. Batches are sent on up to
    ``max_concurrent_batches`` daemon threads ``threaddispatch-<name>-send-<n>``, taken by one
    thread ``threaddispatch-<name>`` or, when a send ends, by its sending thread for its next batch.
    The limit is over all endpoints, so two batches of one endpoint may be in flight together:
    jobs keep their order within a batch, not across batches. With ``max_concurrent_batches=1``
    batches go one at a time in the order they were taken, so an endpoint's jobs (of one
    priority) also keep their order across batches, through a shutdown's drain and a spool
    replay too; a job that is retried goes again after the jobs queued meanwhile.

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
    timeout. So one hung receiver can fail unrelated jobs: once 4 of its sends hang at once
    (each hung call keeps its thread), every later send, to any endpoint, waits for one of
    them to end and fails with DispatchTimeoutError without running (retried, then exhausted)
    until a hung call returns. Without ``send_timeout`` a hung send instead holds its in-flight
    slot: once ``max_concurrent_batches`` sends hang, nothing else is sent (and nothing fails)
    until one returns. Either way, give ``send_batch`` its own I/O timeout shorter than
    ``send_timeout``. A BaseException that is not an Exception (SystemExit, KeyboardInterrupt) from
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
    until :meth:`shutdown`. ``metrics`` (a :class:`~threaddispatch.metrics.Metrics`) reads
    ``stats()`` when it collects.

    ``tracer_provider`` (an OpenTelemetry TracerProvider; extra ``otel``) traces the sends:
    ``add_job`` captures the caller's current span, and each batch is sent inside a PRODUCER
    span ``send <name>`` linked to the spans that added its jobs (a retry links to them
    again), with the messaging attributes (``messaging.destination.name``: the endpoint id;
    ``messaging.batch.message_count``) and an error status when the whole batch failed.
    Without it ``add_job`` pays one ``is None`` test.

    ``spool`` (a file path; None: none) makes the held jobs crash-durable: every job
    ``add_job`` accepts is first appended to that SQLite WAL file (appends from many threads
    share one commit), with what re-creates it: endpoint id (a str, int or float), payload
    (JSON-encodable), priority, ``max_attempts``, id (the receiver's idempotency key: a
    replayed job keeps it), ``scheduled_at`` and ``created_at``; anything else raises
    PayloadError and the job is not accepted. A job leaves the spool when it finishes
    delivered, dropped by the overflow policy, or cancelled at shutdown (a retry or
    scheduled job not yet due: given up by the policy or the user's shutdown, so not kept);
    a job whose retries are exhausted moves to the spool's dead letters (``job_exhausted``
    fires as without a spool): :meth:`spool_dead_letters` lists them,
    :meth:`replay_spool_dead_letters` adds them again. The constructor re-adds, in order
    (by priority, then as they were added) and before any new job, the jobs a previous
    owner left: delivery is at-least-once across a crash (a batch in flight at the crash is
    sent again). A replayed job starts again with ``attempts == 0`` and is held even past
    ``max_pending_jobs`` (never dropped). ``spool_sync`` is ``"normal"`` (survives a process
    crash) or ``"full"`` (an fsync per commit: survives power loss). One dispatcher owns a
    spool at a time (SpoolOwnedError for a second, in this process or another);
    :meth:`shutdown` closes it after its drain, so jobs its timeout left unsettled stay in
    it for the next start. Immediate mode sends before ``add_job`` returns and does not
    touch the spool; a forked child's dispatcher does not use its parent's spool.
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
        metrics: Metrics | None = None,
        tracer_provider: object = None,
        spool: str | os.PathLike[str] | None = None,
        spool_sync: SpoolSync = "normal",
    ) -> None:
        if not callable(send_batch):
            raise ConfigurationError(f"send_batch must be callable, got {send_batch!r}")
        checked_metrics = check_metrics(metrics)
        tracing = make_tracing(tracer_provider, "endpoint")
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("max_pending_jobs", max_pending_jobs)
        if not isinstance(overflow, str) or overflow not in OVERFLOW_POLICIES:
            raise ConfigurationError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}")
        batch_timeout = check_seconds("batch_timeout", batch_timeout, allow_zero=False)
        if send_timeout is not None:
            send_timeout = check_wait("send_timeout", send_timeout, allow_zero=False)
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
        if spool_sync not in ("normal", "full"):
            raise ConfigurationError(f"spool_sync must be 'normal' or 'full', got {show(spool_sync)}")
        opened = None if spool is None else Spool(spool, sync=spool_sync)  # last check: it takes the file
        try:
            self._core = self._new_core(send_batch, tracing)
        except BaseException:
            if opened is not None:
                opened.close()
            raise
        checked_metrics.watch(self)  # stats() read at collection time; no histograms here yet
        # An unreferenced dispatcher drains in the background, then its threads leave.
        self._init_closing(self._core.engine.close_unreferenced, self._core.release_threads)
        if _immediate.active():
            self._set_immediate(True)
        if opened is not None:
            self._core.spool = opened
            self._put_spooled(opened.pending())  # a previous owner's jobs, before any new one

    def _new_core(self, send_batch: SendBatch, tracing: Tracing | None) -> Core:
        return Core(
            send_batch,
            name=self.name,
            max_batch_size=self.max_batch_size,
            batch_timeout=self.batch_timeout,
            max_concurrent_batches=self.max_concurrent_batches,
            enable_prioritization=self.enable_prioritization,
            retry=self.retry,
            max_pending_jobs=self.max_pending_jobs,
            overflow=self.overflow,
            send_timeout=self.send_timeout,
            tracing=tracing,
        )

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

        In immediate mode (``threaddispatch.testing.immediate()``, for tests and serverless
        handlers) ``add_job`` sends the job itself, as a batch of one on this thread, and
        returns once it is delivered or exhausted: the same events, stats and retry
        decision, with the waits skipped (a retry is the next attempt at once; a future
        ``scheduled_at`` is not waited for). ``max_concurrent_batches`` still applies: the
        send waits for a free slot. A BaseException such as KeyboardInterrupt from
        ``send_batch`` is re-raised here once the job is settled.
        """
        if timeout is not None:
            timeout = check_wait("timeout", timeout)  # at most MAX_WAIT: it may be waited for, at the bound
        if not isinstance(job, DispatchJob):
            raise TypeError(f"add_job takes a DispatchJob, got {show(job)}")
        if job.status != "new":
            raise InvalidStateError(
                f"{job!r} was already added; to send it again add DispatchJob(job.endpoint_id, job.payload, id=job.id)"
            )
        # It may have been set after construction: checked again (the call skipped for None, the usual case).
        scheduled_at = None if job.scheduled_at is None else check_scheduled_at(job.scheduled_at)
        delay = 0.0 if scheduled_at is None else scheduled_at - time.time()
        if delay > MAX_SCHEDULE_AHEAD:
            raise ConfigurationError(
                f"scheduled_at must be at most {MAX_SCHEDULE_AHEAD / 86400:.0f} days ahead, got {scheduled_at!r} "
                f"({delay / 86400:.0f} days from now); {job!r} was not accepted"
            )
        core = self._core
        if not core.admit(job, timeout):
            return job.id  # dropped by the overflow policy
        immediate = core.immediate
        spool = core.spool
        if spool is not None and not immediate:
            self._spool_append(spool, job, scheduled_at)  # durable before the job can be in a batch
        if core.tracing is not None:
            job._trace_context = core.tracing.capture()  # before the put: the send reads it
        if immediate:
            delay = 0.0  # sent now: immediate mode waits for nothing
        job.scheduled_at = scheduled_at
        job.status = "scheduled" if delay > 0 else "pending"
        try:
            if "job_added" in core.events.registered:  # has_listeners without its call
                core.add_announced(job, delay, queue=not immediate)
            else:
                if core.closed:
                    raise DispatcherClosedError(f"{core.label} is shut down; {job!r} was not accepted")
                if not immediate and delay <= 0:
                    core.engine.put(job, job.endpoint_id)  # core.queue's put without its frame: the hot path
                elif not immediate:
                    core.queue(job, delay)
        except BaseException:
            job.status = "new"  # not queued: the caller may add it elsewhere
            core.unadmit()
            if spool is not None and not immediate:
                core.settle_spool((job,), ())  # never accepted: it leaves the spool
                del job._spool_seq
            raise
        if immediate:
            interrupt = core.send_now(job)
            if interrupt is not None:
                raise interrupt  # this is the caller's own thread: a KeyboardInterrupt is for it
        return job.id

    def _spool_append(self, spool: Spool, job: DispatchJob, scheduled_at: float | None) -> None:
        """Append admitted ``job`` to ``spool`` and number it; on failure it is not held (PayloadError if not JSON)."""
        core = self._core
        try:
            job._spool_seq = spool.append(spool_entry(job, scheduled_at))
        except BaseException as error:
            core.unadmit()
            if isinstance(error, StoreError) and core.closed:  # the spool closed with the dispatcher
                raise DispatcherClosedError(f"{core.label} is shut down; {job!r} was not accepted") from error
            raise

    def _put_spooled(self, rows: list[tuple[int, Any]]) -> int:
        """Hold and queue the jobs of spool rows, in order (past the bound if need be); returns how many.

        An entry that is not a spooled job (another face's file) goes to the dead letters, logged.
        """
        core = self._core
        spool = core.spool
        assert spool is not None
        jobs: list[DispatchJob] = []
        for seq, entry in rows:
            try:
                jobs.append(job_from_spool(seq, entry))
            except ConfigurationError as error:
                _log.error("%s: %s; it is dead-lettered", core.label, error)
                spool.dead_letter((seq,), str(error))
        core.hold(len(jobs))
        now = time.time()
        for index, job in enumerate(jobs):
            delay = 0.0 if job.scheduled_at is None else job.scheduled_at - now
            job.status = "scheduled" if delay > 0 else "pending"
            try:
                core.queue(job, delay)
            except DispatcherClosedError:
                core.unadmit(len(jobs) - index)  # closed meanwhile: the rest stay in the spool
                for left in jobs[index:]:
                    left.status = "new"
                raise
        return len(jobs)

    def spool_dead_letters(self, limit: int = 100) -> list[SpoolDeadLetter]:
        """The spool's dead letters (jobs whose retries were exhausted), oldest first; at most ``limit``.

        Raises DispatcherClosedError after shutdown (the spool is closed), ConfigurationError without a spool.
        Each ``entry`` is the spooled job (``spool_entry``'s dict); ``error`` names the last failure.
        """
        return self._own_spool().dead_letters(limit)

    def replay_spool_dead_letters(self, seqs: list[int] | None = None) -> int:
        """Add dead letters again (all, or those numbered), oldest first, as new jobs; returns how many.

        At most as many as ``max_pending_jobs`` has room for now (call again for the rest).
        They keep their ids and spool sequence numbers, start from ``attempts == 0``, and
        leave the spool once delivered, or go back to the dead letters when exhausted again.
        Raises DispatcherClosedError after shutdown, ConfigurationError without a spool.
        """
        spool = self._own_spool()
        room = self._core.room_left()
        if seqs is None:
            wanted = [dead.seq for dead in spool.dead_letters(room)] if room else []
        else:
            wanted = list(seqs)[:room]
        if not wanted:
            return 0
        return self._put_spooled(spool.take_dead_letters(wanted))

    def _own_spool(self) -> Spool:
        """The open spool; ConfigurationError without one, DispatcherClosedError after shutdown (it is closed)."""
        spool = self._core.spool
        if spool is None:
            raise ConfigurationError(f"{self._core.label} has no spool (pass spool=PATH)")
        self._check_open()
        return spool

    def _set_immediate(self, on: bool) -> None:
        """While ``on``, :meth:`add_job` sends each job on its caller's thread (see there).

        Jobs queued before are sent as usual, by the worker. The switch reaches the
        dispatcher through its core, which is the component registered with the lifecycle.
        """
        self._core._set_immediate(on)

    def process_batch_for_endpoint(self, endpoint_id: Hashable) -> WebhookBatch | None:
        """Send the next batch of ``endpoint_id`` now, on this thread, and return its record.

        Blocks for the send. Returns None when the endpoint has no pending job, or when
        ``max_concurrent_batches`` batches are in flight (then ``batch_skipped`` fires and the
        jobs stay queued). Raises DispatcherClosedError after shutdown.
        """
        check_endpoint_id(endpoint_id)
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
        batch = WebhookBatch(new_id(), endpoint_id, tuple(jobs), time.time())
        try:
            interrupt = core.run_batch(batch)
        finally:
            core.engine.settle(seq)
        if interrupt is not None:
            raise interrupt  # this is the caller's own thread: a KeyboardInterrupt is for it
        return batch

    def _check_open(self) -> None:
        if self._closed:
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
                "held": core._held_now(),
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
        check_endpoint_id(endpoint_id)
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
        :meth:`close` (and leaving a ``with`` block) is the same with no limit by default.
        """
        return self.close(timeout)

    def _begin_close(self) -> None:
        # Closing.close, once, under _close_lock: refuse adds from now on; no wait, no user code.
        self._core.begin_close()

    def _finish_close(self, deadline: float | None) -> bool:
        return self._core.finish_close(deadline)

    def __repr__(self) -> str:
        state = "shut down" if self.closed else "open"
        return (
            f"<EndpointBatchDispatcher {self.name!r} max_batch_size={self.max_batch_size} "
            f"batch_timeout={self.batch_timeout} max_concurrent_batches={self.max_concurrent_batches} {state}>"
        )
