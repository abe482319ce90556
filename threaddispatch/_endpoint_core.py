"""The scheduler core of EndpointBatchDispatcher: the engine's hooks, sending, retries, the bound.

:class:`Core` is everything the engine's worker and the sending threads use: the
:class:`~threaddispatch._engine.BatchEngine` (one keyed lane per endpoint, its gate as the
``max_concurrent_batches`` limit, ``put_later`` as the timer of retries and scheduled jobs),
the :class:`~threaddispatch._pool.WorkerPool` the batches are sent on, the send of one batch
and the settling of its jobs (events, the one retry decision, requeues), and the
``max_pending_jobs`` bound with its overflow policies.

The sending threads (:meth:`Core.run_pooled`): a batch the engine's worker takes goes to a
sending thread, or, while one runs, to ``ready`` (taken batches, first in first out), which the
running threads drain between their own ``settle_and_take`` batches. Sends that return at once
keep one thread: a thread whose send was quick ends when another is not stuck in a send, so
``add_job`` competes for the GIL with one sending thread, not ``max_concurrent_batches``. A slow
send with batches waiting starts one more thread, and the watch (:meth:`Core._watch`, on the
pool while batches wait) starts one per waiting batch when no send began for ``_STALL``: sends
that wait on I/O or hang still run up to the limit at once. It never refers to the face
(:mod:`threaddispatch.endpoint`), so an unreferenced dispatcher can be collected while its
threads drain.

It runs past 600 lines because it is one object under one lock: splitting the send, the
settling and the bound apart would spread that lock's invariants over several modules.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from operator import attrgetter

from threaddispatch import _drop_log, _lifecycle
from threaddispatch._drop_log import DropLog
from threaddispatch._endpoint_records import EVENTS, DispatchJob, SendBatch, WebhookBatch, new_id
from threaddispatch._engine import BatchEngine, Overflow
from threaddispatch._invoke import BASE, ERROR, OK, Outcome, TimedCaller, call, classify, resolve, settled
from threaddispatch._lanes import FifoLane, Lane, PriorityLane
from threaddispatch._pool import WorkerPool
from threaddispatch._spool import Spool
from threaddispatch._trace import Tracing
from threaddispatch._validate import show
from threaddispatch.backoff import RetryPolicy
from threaddispatch.errors import DispatcherClosedError, QueueFullError, ThreadDispatchError
from threaddispatch.events import EventEmitter

__all__ = ["Core"]

_log = logging.getLogger("threaddispatch")

# The longest a sending thread sends batch after batch before it lets other threads have the GIL
# (seconds): a loop holding it for a switch interval (5 ms) would keep add_job waiting as long.
_TURN = 0.0002
# A send that returns within this (seconds) is quick: more sending threads would not make such
# sends go faster, only contend for the GIL. A slower one with batches waiting starts another.
_QUICK = 0.001
# How long batches may wait in ``ready`` with no send beginning before the watch starts sending
# threads for them (seconds): the running ones are stuck in sends (a hung receiver, I/O).
_STALL = 0.02

# How many delivered counts the sending threads may leave in ``Core.finished`` before an add takes them off.
_FINISHED_SLACK = 64

_forked_spools: list[Spool] = []  # a forked child's copies of its parent's spools: never used nor closed there


_priority_of: Callable[[DispatchJob], int] = attrgetter("priority")
# A new endpoint's lane: a partial, so making one is a C call, not a Python frame more per endpoint.
_priority_lane: Callable[[Hashable], Lane[DispatchJob]] = functools.partial(PriorityLane, priority_of=_priority_of)


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


class Core:
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
        tracing: Tracing | None = None,
    ) -> None:
        self.send_batch = send_batch
        self.tracing = tracing  # None: no tracer_provider, nothing captured or opened
        # Set by the face given a spool: every job it holds then has a _spool_seq. None: no spool.
        self.spool: Spool | None = None
        self.name = name
        self.label = f"EndpointBatchDispatcher {name!r}"
        self.max_batch_size = max_batch_size
        self.max_concurrent_batches = max_concurrent_batches
        self.retry = retry
        self.max_pending_jobs = max_pending_jobs
        self.overflow = overflow
        self.events = EventEmitter(known_events=EVENTS)
        self.immediate = False  # add_job sends on its caller's thread (the immediate switch)
        self._init_locks()
        # Calls send_batch (on the sending thread itself when send_timeout is None; else on a
        # runner thread, marked as sending like the sending thread: _send_on_runner).
        self.caller = TimedCaller(f"{name}-send", timeout=send_timeout)
        self.send_target: Callable[..., object] = send_batch if send_timeout is None else self._send_on_runner
        self.plain_send = send_timeout is None  # send_batch runs on the sending thread: _invoke.call, no caller
        # One sending thread per batch in flight, and the watch (see run_pooled and _watch).
        self.pool = WorkerPool(max_concurrent_batches + 1, name=f"{name}-send")
        self.pooled_run = self.run_pooled  # bound once: a batch's hand-off allocates no bound method
        self.engine: BatchEngine[DispatchJob] = BatchEngine(
            self.deliver,
            name=name,
            window=batch_timeout,
            max_batch_size=max_batch_size,
            max_unsettled=max_concurrent_batches,  # the gate: at most this many batches in flight
            on_skip=self.on_skip,
            on_abandon=self.on_abandon,
            lane_factory=_priority_lane if enable_prioritization else FifoLane,
            self_settling=True,  # deliver hands each batch to a sender, which settles it
            # No per-lane bound: max_pending_jobs is over all endpoints, applied by add_job.
            drop_log=self._new_drop_log(),
        )
        _lifecycle.register(self)

    def _new_drop_log(self) -> DropLog:
        """The log of this dispatcher's drops (by ``max_pending_jobs``); the engine notes each delivered batch."""
        policy = f"overflow={self.overflow!r}, max_pending_jobs={self.max_pending_jobs}"
        self.drop_log = DropLog(_log, self.label, policy, interval=_drop_log.INTERVAL)
        return self.drop_log

    def _init_locks(self) -> None:
        self.lock = threading.Lock()
        self.adds_done = threading.Condition(self.lock)  # shutdown waits here for announced adds
        self.room = threading.Condition(self.lock)  # add_job waits here with overflow="block"
        # Sends running now, whoever runs them. The gate keeps it from blocking while open;
        # during the shutdown drain (no gate) it keeps a process_* call in progress and the
        # pool's threads together within the limit.
        # One token per send allowed at once: a SimpleQueue is a semaphore at C speed (a
        # threading.Semaphore is a Condition in Python, several microseconds per batch).
        self.permits: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(self.max_concurrent_batches):
            self.permits.put(None)
        self.local = threading.local()  # .sending / .adding: what this thread is in the middle of
        # The sending threads (run_pooled): send_lock guards ready, runners, watching and marks.
        # Invariants: a batch is in ``ready`` only while ``runners`` >= 1 (a thread that ends
        # with batches there leaves another running) and ``watching`` (the watch rescues them
        # from threads stuck in sends); runners <= max_concurrent_batches.
        self.send_lock = threading.Lock()
        self.ready: deque[tuple[Hashable, int, list[DispatchJob]]] = deque()  # taken, waiting for a thread
        self.runners = 0  # sending threads running or starting
        self.watching = False  # the watch is running or starting
        self.marks: list[list[float]] = []  # each sending thread's send start (0.0: between sends)
        self.sends_begun = 0  # sends begun since start (by any sending thread): the watch's sign of progress
        self.watch_ends = threading.Event()  # set by the close once drained (or given up): the watch leaves
        self.closed = False
        self.adding = 0  # add_job calls between their job_added event and their put
        self.shutdown_emitted = False
        self.exhausted = 0
        self.cancelled: list[DispatchJob] = []
        self.exhausted_at_close = 0
        # Jobs accepted and not finished (queued, in a batch, or waiting for a retry): never
        # above max_pending_jobs. A job finishes delivered, exhausted, cancelled or dropped.
        self.held = 0
        # Counts of held jobs a sending thread delivered, not yet taken off ``held``: appended
        # without the lock (a list append is atomic), so a batch's send takes no lock of the
        # core; whoever reads ``held`` under the lock takes them off first (_held_now), except
        # admit, which needs them only at the bound (``held`` is then high, never low).
        self.finished: list[int] = []
        self.dropped = 0
        self.room_waiters = 0

    # -- engine hooks ------------------------------------------------------------------------

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
        if self.spool is not None:
            self.settle_spool(jobs, ())  # given up at shutdown: they leave the spool
        _log.warning(
            "%s: shut down with %d job(s) waiting for a retry or their scheduled_at; they were not delivered: %s",
            self.label,
            len(jobs),
            ", ".join(job.id for job in jobs[:10]) + (", ..." if len(jobs) > 10 else ""),
        )

    def deliver(self, endpoint_id: Hashable, jobs: list[DispatchJob], seq: int) -> None:
        """The engine's (self-settling) deliver: hand batch ``seq`` to a sending thread, which settles it.

        With a sending thread running it joins ``ready`` (no wake-up: the running threads take
        it, and the watch starts more if they are stuck); with none it starts one.
        """
        with self.send_lock:
            start = not self.runners
            if start:
                self.runners = 1
            else:
                _queue_in_order(self.ready, (endpoint_id, seq, jobs))
                watch = not self.watching
                self.watching = True
        if not start:
            if watch:
                self._start_watch()
            return
        try:
            self.pool.run(self.pooled_run, (endpoint_id, seq, jobs))
            return
        except DispatcherClosedError:
            # The pool was shut down while the engine still drains: send here rather than lose it.
            batch = WebhookBatch(new_id(), endpoint_id, tuple(jobs), time.time())
        except Exception as exc:  # noqa: BLE001 - e.g. no thread could start: report it, send here
            # The pool raises only for work it did not queue: no sending thread runs this batch.
            batch = WebhookBatch(new_id(), endpoint_id, tuple(jobs), time.time())
            self.processor_failed(exc, batch, "could not hand a batch to a sending thread; sending it here")
        with self.send_lock:
            self.runners -= 1
        try:
            self.run_batch(batch)
        finally:
            self.engine.settle(seq)

    def run_pooled(self, first: tuple[Hashable, int, list[DispatchJob]] | None) -> None:
        """A sending thread: send ``first`` (None: the head of ``ready``), settle it, and go on (a loop).

        The capacity a settle frees goes to the next due batch on this thread
        (:meth:`BatchEngine.settle_and_take`): no hand-off and no wake-up per batch. The batches
        taken wait in ``ready``, first in first out, for whichever sending thread is free. A send
        that was slow (``_QUICK``) with batches waiting starts one more sending thread (sends that
        wait on I/O run side by side, up to the limit); after a quick one the thread ends if
        another is not stuck in a send (sends that return at once gain nothing from more threads,
        and each one more on the GIL makes add_job wait longer). The thread counts as sending,
        with one permit, for the whole loop. What escapes a send (a bug of the machinery) is
        reported and the loop goes on.
        """
        local = self.local
        settle_and_take = self.engine.settle_and_take
        ready = self.ready
        send_lock = self.send_lock
        limit = self.max_concurrent_batches
        clock = time.perf_counter
        # A batch goes without a record (see _sent) when send_batch runs here,
        # untraced, and nobody listens to batch_started (read once per batch: listeners may come and go).
        bare = self.plain_send and self.tracing is None
        listeners = self.events.registered
        send_batch = self.send_batch
        mark = [0.0]  # when this thread's send began; 0.0 between sends (read by the others' quick check)
        counted = True  # this thread is still counted in runners
        self.permits.get()
        local.sending = getattr(local, "sending", 0) + 1
        try:
            with send_lock:
                self.marks.append(mark)
                if first is None:
                    if not ready:
                        self.runners -= 1
                        counted = False
                        return
                    first = ready.popleft()
            endpoint_id, seq, jobs = first
            turn_ends = clock() + _TURN
            while True:
                began = mark[0] = clock()
                self.sends_begun += 1  # the watch's sign of progress
                try:
                    if bare and "batch_started" not in listeners:
                        # A batch with no record yet (see _sent), sent here: once per batch, no frame more.
                        started = time.time()
                        for job in jobs:
                            job.attempts += 1
                            job.status = "processing"
                            job.last_attempt_at = started
                            job.next_retry_at = None
                        mine = tuple(jobs)  # send_batch may change its list
                        try:
                            result = send_batch(endpoint_id, jobs)
                        except BaseException as error:  # noqa: BLE001 - the batch's failure, as in call()
                            self._sent(endpoint_id, mine, started, classify(error))
                        else:
                            if result is None and self.spool is None and not listeners:
                                self._delivered(mine)  # with no spool and no listener, that is all _sent does
                            else:
                                self._sent(
                                    endpoint_id,
                                    mine,
                                    started,
                                    None if result is None else call(resolve, send_batch, result),
                                )
                    else:
                        self._send(WebhookBatch(new_id(), endpoint_id, tuple(jobs), time.time()))
                except Exception as exc:  # noqa: BLE001 - send_batch's errors are handled inside: this is a bug
                    batch = WebhookBatch(new_id(), endpoint_id, tuple(jobs), time.time())
                    self.processor_failed(exc, batch, "sending a batch failed outside send_batch")
                except BaseException:
                    mark[0] = 0.0
                    self.engine.settle(seq)
                    raise
                ended = clock()
                mark[0] = 0.0
                taken = settle_and_take(seq)
                if taken is not None and ended - began < _QUICK and self.runners == 1:
                    # The one sending thread goes on (the usual loop): with ready empty nothing send_lock guards
                    # changes (with a limit of 1, a batch the worker queues meanwhile was taken after this one).
                    if not ready:
                        endpoint_id, seq, jobs = taken
                    else:
                        with send_lock:
                            if not ready or ready[-1][1] < taken[1]:
                                ready.append(taken)  # _queue_in_order's usual case, inline: taken last
                            else:
                                _queue_in_order(ready, taken)
                            endpoint_id, seq, jobs = ready.popleft()
                            watch = bool(ready) and not self.watching
                            if watch:
                                self.watching = True
                        if watch:
                            self._start_watch()
                    if ended >= turn_ends:
                        time.sleep(0)  # see below
                        turn_ends = clock() + _TURN
                    continue
                more = watch = False
                with send_lock:
                    if taken is not None:
                        _queue_in_order(ready, taken)
                    if not ready:
                        self.runners -= 1
                        counted = False
                        return
                    if ended - began < _QUICK:
                        if self.runners > 1 and self._another_moving(mark, ended):
                            self.runners -= 1  # the moving one takes what waits in ready
                            counted = False
                    elif len(ready) > 1 and self.runners < limit:
                        self.runners += 1  # a slow send, and a batch waits once this thread took the next
                        more = True
                    if counted:
                        endpoint_id, seq, jobs = ready.popleft()
                    if ready and not self.watching:
                        self.watching = watch = True
                if watch:
                    self._start_watch()
                if not counted:
                    return
                if more:
                    self._start_runner()
                if ended >= turn_ends:
                    # Sends that return at once keep this loop on the GIL: let the threads waiting
                    # for it (add_job's callers) have it now, not after a switch interval.
                    time.sleep(0)
                    turn_ends = clock() + _TURN
        finally:
            with send_lock:
                self.marks.remove(mark)
                if counted:  # left by a BaseException: the watch rescues what waits in ready
                    self.runners -= 1
                    watch = bool(ready) and not self.watching
                    if watch:
                        self.watching = True
                else:
                    watch = False
            if watch:
                self._start_watch()
            local.sending -= 1
            self.permits.put(None)

    def _another_moving(self, mine: list[float], now: float) -> bool:
        """Whether a sending thread other than ``mine`` is between sends or in a send begun under ``_QUICK`` ago.

        Holds send_lock.
        """
        return any(mark is not mine and (not mark[0] or now - mark[0] < _QUICK) for mark in self.marks)

    def _start_runner(self) -> None:
        """Start a sending thread for the head of ``ready`` (counted in ``runners`` already); on
        failure uncount it (the batches stay in ``ready`` for the running threads or the watch)."""
        try:
            self.pool.run(self.pooled_run, None)
        except Exception:  # noqa: BLE001 - closed, or no thread could start: the others take them
            with self.send_lock:
                self.runners -= 1

    def _start_watch(self) -> None:
        """Start the watch (``watching`` set already); on failure clear it (the next batch that waits tries again)."""
        try:
            self.pool.run(self._watch)
        except Exception:  # noqa: BLE001 - closed, or no thread could start: the sending threads go on
            with self.send_lock:
                self.watching = False

    def _watch(self) -> None:
        """While batches wait in ``ready``: every ``_STALL`` seconds, if no send began meanwhile, start
        a sending thread for each (up to the limit): the running ones are stuck in their sends."""
        seen = -1
        while True:
            with self.send_lock:
                if not self.ready:
                    self.watching = False
                    return
                begun = self.sends_begun
                start = 0
                if begun == seen:
                    start = max(0, min(len(self.ready), self.max_concurrent_batches - self.runners))
                    self.runners += start
                seen = begun
            for _ in range(start):
                self._start_runner()
            if self.watch_ends.wait(_STALL):
                with self.send_lock:
                    self.watching = False
                return

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

    def run_batch(
        self, batch: WebhookBatch, retries: list[tuple[DispatchJob, float]] | None = None
    ) -> BaseException | None:
        """Send one batch on this thread and settle its jobs; events fire here, in order.

        Returns the BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...)
        send_batch raised, if it did: the batch failed with it like with any error, and it was
        logged; the synchronous ``process_*`` calls re-raise it to their caller. The jobs to
        retry are scheduled on the engine's timer, or, given a ``retries`` list, added to it
        for the caller to run (immediate mode).
        """
        local = self.local
        self.permits.get()
        local.sending = getattr(local, "sending", 0) + 1
        try:
            return self._send(batch, retries)
        finally:
            local.sending -= 1
            self.permits.put(None)

    def send_now(self, job: DispatchJob) -> BaseException | None:
        """Immediate mode: send ``job`` as a batch of one on this thread, its retries at once.

        The same events, stats and retry decision as a batch the worker sends; only the
        waits are skipped: a retry (after the backoff or a ``Retry(delay)``) is the next
        attempt, a new batch of one, until the job is delivered or exhausted. Returns the
        BaseException that is not an Exception send_batch raised (the job is then settled
        as for any failure: retried or exhausted), for the caller to re-raise.
        """
        jobs = [job]
        while jobs:
            retries: list[tuple[DispatchJob, float]] = []
            interrupt = self.run_batch(WebhookBatch(new_id(), job.endpoint_id, tuple(jobs), time.time()), retries)
            if interrupt is not None:
                self._requeue_now(job.endpoint_id, [retry for retry, _delay in retries])
                return interrupt
            jobs = [retry for retry, _delay in retries]
        return None

    def _set_immediate(self, on: bool) -> None:
        """The immediate switch (:mod:`threaddispatch._immediate`): ``add_job`` sends on its caller's thread."""
        self.immediate = on

    def _send(
        self, batch: WebhookBatch, inline_retries: list[tuple[DispatchJob, float]] | None = None
    ) -> BaseException | None:
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
        if self.tracing is not None:
            sent = self._traced_send(self.tracing, endpoint_id, jobs)
        elif self.plain_send:
            sent = call(self.send_batch, endpoint_id, list(jobs))  # what caller.call does without a timeout
        else:
            sent = self._call_send(endpoint_id, list(jobs))
        return self._settle_sent(batch, sent, inline_retries)

    def _delivered(self, mine: Sequence[DispatchJob]) -> float:
        """Mark ``mine`` delivered and count them finished (waking an add waiting for room); the time it was."""
        finished = time.time()
        for job in mine:
            job.status = "delivered"
            job.finished_at = finished
            job.last_error = None
        count = len(mine)
        self.finished.append(count)  # no lock: see _init_locks
        if self.room_waiters:
            # Read after the append: a waiter counts itself before it reads held, so either
            # it sees this count or this thread sees it waiting and wakes it.
            with self.lock:
                self._held_now()
                self.room.notify(count)
        return finished

    def _sent(self, endpoint_id: Hashable, mine: tuple[DispatchJob, ...], started: float, sent: Outcome | None) -> None:
        """The end of a batch :meth:`run_pooled` sent with no record yet (a plain send, untraced, with no
        ``batch_started`` listener): ``mine``, its jobs, went to send_batch at ``started`` and it ended
        as ``sent`` (None: it returned None).

        The batch record (:class:`WebhookBatch`) is made only when something reads it: a
        listener of the batch's outcome, or a batch that did not go as a whole (its failures are
        settled by :meth:`_settle_sent`). So a delivered batch costs no id, record or copy; and
        when there is no spool and no listener at all, run_pooled settles it itself (this method's
        first case, inline).
        """
        if sent is None or (sent.kind == OK and sent.value is None):
            finished = self._delivered(mine)
            count = len(mine)
            if self.spool is not None:
                self.settle_spool(mine, ())
            listeners = self.events.registered
            if listeners and ("batch_executed" in listeners or "batch_completed" in listeners):
                batch = WebhookBatch(new_id(), endpoint_id, mine, started, "completed", started, finished, count)
                self._report(batch, [], [], [])
            return
        batch = WebhookBatch(new_id(), endpoint_id, mine, started, "processing", started)
        self._settle_sent(batch, sent, None)

    def _settle_sent(
        self, batch: WebhookBatch, sent: Outcome, inline_retries: list[tuple[DispatchJob, float]] | None
    ) -> BaseException | None:
        """After ``send_batch`` returned ``sent`` for ``batch``: settle its jobs, fire its events, schedule retries."""
        events = self.events
        jobs = batch.jobs
        endpoint_id = batch.endpoint_id
        error: BaseException | None = None
        outcomes: list[object] | None = None  # None: every job delivered (unless error)
        if sent.kind != OK:  # not the property: one Python call less per batch
            error = sent.error
            if sent.kind == BASE:
                _log.error("%s: send_batch raised %s; the batch failed", self.label, show(error), exc_info=error)
        elif sent.value is not None:
            try:
                outcomes = _outcomes(sent.value, len(jobs), endpoint_id)
            except Exception as exc:  # noqa: BLE001 - a bad result fails the batch; reported below
                error = exc
                _log.error("%s: %s; the batch is treated as failed", self.label, exc)

        if error is None and outcomes is None:
            # Every job delivered (the common case): no per-job decision, no retry, one lock.
            finished = self._delivered(jobs)
            batch.successful = len(jobs)
            batch.completed_at = finished
            batch.status = "completed"
            if self.spool is not None:
                self.settle_spool(jobs, ())
            if events.has_listeners("batch_executed") or events.has_listeners("batch_completed"):
                self._report(batch, [], [], [])
            return None
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
            if self.spool is not None:
                self.settle_spool(delivered, exhausted)

        try:
            self._report(batch, failed, retries, exhausted)
        finally:
            # After the events, so a retry never overtakes the report of the attempt before it;
            # in a finally, so no listener can lose a job.
            if inline_retries is not None:
                inline_retries.extend(retries)
            elif retries:
                self._requeue(endpoint_id, retries)
        return error if sent.kind == BASE else None

    def _traced_send(self, tracing: Tracing, endpoint_id: Hashable, jobs: Sequence[DispatchJob]) -> Outcome:
        """``_call_send`` inside a PRODUCER span linked to the spans that added the jobs (messaging conventions)."""
        attributes = {
            "messaging.system": "threaddispatch",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": str(endpoint_id),
            "messaging.batch.message_count": len(jobs),
        }
        contexts = [job._trace_context for job in jobs]
        with tracing.send_span(f"send {self.name}", contexts, attributes) as span:
            sent = self._call_send(endpoint_id, list(jobs))
            if not sent.ok and sent.error is not None:
                from opentelemetry.trace import Status, StatusCode

                span.record_exception(sent.error)
                span.set_status(Status(StatusCode.ERROR, f"send_batch raised {type(sent.error).__name__}"))
        return sent

    def _call_send(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> Outcome:
        """``send_batch(endpoint_id, jobs)`` within send_timeout; never raises."""
        try:
            return self.caller.call(self.send_target, endpoint_id, jobs)
        except DispatcherClosedError as exc:  # shut down (its wait timed out) while this batch still went
            return Outcome(ERROR, None, exc)

    def _send_on_runner(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> object:
        """``send_batch`` on a send_timeout runner thread, which counts as sending meanwhile (so
        shutdown or a blocking add_job inside it does not wait for its own batch); an awaitable
        it returns is wrapped to keep the mark while the runner awaits it (and its value checked
        there, named after send_batch: ``_invoke.settled``)."""
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
            return settled(self.send_batch, awaitable, await awaitable)
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

    def _requeue_now(self, endpoint_id: Hashable, jobs: list[DispatchJob]) -> None:
        """Queue retries for the worker at once (the immediate caller was interrupted); cancel them once closed."""
        for index, job in enumerate(jobs):
            try:
                self.engine.put(job, endpoint_id)
            except DispatcherClosedError:
                self.cancel(jobs[index:])
                return

    def _requeue_failed(self, endpoint_id: Hashable, failed: list[tuple[DispatchJob, Exception]]) -> None:
        finished = time.time()
        for job, _error in failed:
            job.status = "exhausted"
            job.next_retry_at = None
            job.finished_at = finished
        with self.lock:
            self.exhausted += len(failed)
            self._release_held(len(failed))
        if self.spool is not None:
            self.settle_spool((), [job for job, _error in failed])
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

    # -- the spool ---------------------------------------------------------------------------

    def settle_spool(self, done: Sequence[DispatchJob], exhausted: Sequence[DispatchJob]) -> None:
        """Acknowledge finished jobs (``done``) and dead-letter ``exhausted`` ones, each with its error. Nothing held.

        A job without a sequence number (dropped before it was spooled) is skipped. A spool
        closed meanwhile (a shutdown whose drain timed out) leaves them pending: replayed at
        the next start. Any other spool failure is logged; those jobs stay pending too.
        """
        spool = self.spool
        if spool is None:
            return
        acked = [seq for seq in map(_spool_seq, done) if seq is not None]
        dead: dict[str, list[int]] = {}
        for job in exhausted:
            seq = _spool_seq(job)
            if seq is not None:
                error = job.last_error
                text = "exhausted" if error is None else f"{type(error).__qualname__}: {error}"
                dead.setdefault(text, []).append(seq)
        spool.settle(acked, None, self.label)
        for text, seqs in dead.items():
            spool.settle(seqs, text, self.label)

    def close_spool(self) -> None:
        """After the drain: close the spool (what is still unsettled stays in it, for the next start)."""
        spool = self.spool
        if spool is not None:
            spool.close()

    # -- the bound ---------------------------------------------------------------------------

    def _held_now(self) -> int:
        """``held``, with the counts the sending threads left in ``finished`` taken off first. Holds lock."""
        finished = self.finished
        while finished:
            self.held -= finished.pop()
        return self.held

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
            # ``held`` without the counts in ``finished`` is high, never low: below the bound it
            # admits as well, so they are taken off only at the bound, or once there are
            # _FINISHED_SLACK of them (which keeps the list short): not a call per add.
            if self.held >= self.max_pending_jobs or len(self.finished) > _FINISHED_SLACK:
                self._held_now()
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

    def hold(self, count: int) -> None:
        """Count ``count`` replayed spool jobs as held, past the bound if need be (never dropped)."""
        with self.lock:
            if self.closed:
                raise DispatcherClosedError(f"{self.label} is shut down")
            self.held += count

    def room_left(self) -> int:
        """How many more jobs the bound admits now."""
        with self.lock:
            return max(0, self.max_pending_jobs - self._held_now())

    def unadmit(self, count: int = 1) -> None:
        """Admitted jobs' puts failed: they are not held after all."""
        with self.lock:
            self._release_held(count)

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
            while self._held_now() >= self.max_pending_jobs:
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
        if self.spool is not None:
            self.settle_spool((job,), ())  # a drop_oldest victim was spooled; a new job dropped was not
        self.drop_log.dropped()
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

    def add_announced(self, job: DispatchJob, delay: float, *, queue: bool = True) -> None:
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
            if queue:
                self.queue(job, delay)
        finally:
            local.adding -= 1
            with self.lock:
                self.adding -= 1
                if self.closed and not self.adding:
                    self.adds_done.notify_all()

    # -- lifecycle ---------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Refuse adds from now on; wake the adds waiting for room (they are refused too). Never waits."""
        with self.lock:
            self.closed = True
            self.exhausted_at_close = self.exhausted
            self.room.notify_all()

    def finish_close(self, deadline: float | None) -> bool:
        """Deliver what is held and stop the threads by ``deadline``; emit ``shutdown`` once.

        Returns whether every job pending, in flight or waiting was delivered. On a thread
        inside ``send_batch`` or a listener it only starts the drain (it cannot wait for its
        own batch) and returns False.
        """
        local = self.local
        with self.lock:
            # Jobs announced by job_added are accepted: wait for their puts (not our own).
            own = getattr(local, "adding", 0)
            while self.adding > own:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.adds_done.wait(remaining)
        if getattr(local, "sending", 0):
            self.engine.begin_close()
            drained = False
        else:
            drained = self.engine.close(_remaining(deadline))
            self.watch_ends.set()
            self.pool.shutdown(_remaining(deadline))
            self.caller.close(_remaining(deadline))  # abandoned sends are left to end on their own
            self.close_spool()  # after the drain: its acks are written; what is unsettled stays for the next start
        lengths, in_flight, _scheduled = self.engine.snapshot()
        pending = sum(lengths.values())
        with self.lock:
            cancelled = list(self.cancelled)
            exhausted = self.exhausted - self.exhausted_at_close
            emit = not self.shutdown_emitted
            self.shutdown_emitted = True
        delivered = drained and not pending and not in_flight and not cancelled and not exhausted
        if emit and self.events.has_listeners("shutdown"):
            self.events.emit(
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

    def release_threads(self) -> None:
        """After the drain of an unreferenced dispatcher: let the sending and send_timeout threads leave."""
        self.watch_ends.set()
        self.pool.shutdown()
        self.caller.close(0.0)  # a runner busy with a hung send leaves after it
        self.close_spool()

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return 0, 0  # the engine is registered too and drains the jobs

    def _reset_after_fork(self) -> None:
        # A parent thread may have held these locks at fork time; the engine and pool reset themselves.
        closed = self.closed
        self._init_locks()
        self.closed = closed
        self.engine.use_drop_log(self._new_drop_log())
        if self.spool is not None:
            # The parent's spool (connection and lock) stays the parent's: kept, never used nor closed here.
            _forked_spools.append(self.spool)
            self.spool = None


def _not_delivered(job: DispatchJob) -> ThreadDispatchError:
    return ThreadDispatchError(f"send_batch reported job {job.id!r} as not delivered (False)")


def _queue_in_order(
    ready: deque[tuple[Hashable, int, list[DispatchJob]]], batch: tuple[Hashable, int, list[DispatchJob]]
) -> None:
    """Put ``batch`` into ``ready`` in take order (by its seq); caller holds send_lock.

    ``ready`` is oldest first. A sending thread's own next batch usually goes last, but the
    engine's worker may have queued batches taken after it meanwhile (a shutdown's drain
    takes past the limit) before the thread got here: the batch goes ahead of those, so with
    ``max_concurrent_batches=1`` batches are sent in the order they were taken.
    """
    seq = batch[1]
    at = len(ready)
    while at and ready[at - 1][1] > seq:
        at -= 1
    ready.insert(at, batch)


def _spool_seq(job: DispatchJob) -> int | None:
    """The job's spool sequence number; None for a job never spooled (its slot unset)."""
    return getattr(job, "_spool_seq", None)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
