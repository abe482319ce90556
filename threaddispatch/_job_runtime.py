"""The runtime of a JobEngine run: fetch -> execute -> one completion path, and the stop of it all.

``JobEngine.start()`` makes one :class:`Runtime` (a new one per start), which owns that run's
threads, worker id, in-flight table and group commit:

- the fetcher (``threaddispatch-jobs-fetcher``) claims at most as many jobs as there are
  free worker slots, honouring paused queues and per-queue limits, and hands them to the
  worker pool; before each claim it writes the outcomes queued since the last one, in the
  claim's own transaction (:meth:`Recorder.write <threaddispatch._job_outcomes.Recorder.write>`);
- the worker pool runs each job's handler through the middleware and queues its outcome;
- the heartbeat and upkeep threads (:mod:`threaddispatch._job_maintenance`) and the cron
  thread (:mod:`threaddispatch._job_cron`).

With ``tracer_provider=`` each attempt runs in a CONSUMER span (:meth:`Runtime._traced`), linked
to the span that enqueued the job (its stored ``trace_context``); with ``metrics=`` its start is
counted and its queue wait recorded. Without either, a job pays one ``is None`` test for each.

Every outcome goes through :meth:`Runtime.record`: while the run is running the fetcher
writes it; otherwise (stopping, stopped, or an inline runtime) whoever records it writes it
at once, with any still queued. Immediate mode and ``run_pending`` use an inline runtime,
which starts no thread and runs jobs on the caller's. (About 750 lines: the fetch
loop, the completion path and the stop protocol all work one in-flight table, under one lock.)

A store call that raises anything (a StoreError, a store's bug, a codec error) is logged
with its traceback and handled as a StoreError is: the jobs it concerned are left to the
reaper. Each loop turn of each engine thread also survives any ``Exception``: logged, then
the loop backs off (at most its poll interval, or the next heartbeat) and goes on.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from threaddispatch._job_context import JobContext
from threaddispatch._job_cron import CronRunner
from threaddispatch._job_maintenance import Maintenance
from threaddispatch._job_outcomes import Effects, Outcome, Recorder, encode_result
from threaddispatch._job_plan import ClaimPlanner
from threaddispatch._job_shared import Shared, Slot
from threaddispatch._job_workers import Registration
from threaddispatch._pool import WorkerPool
from threaddispatch._trace import Tracing, make_tracing
from threaddispatch.errors import (
    Cancel,
    ConfigurationError,
    DispatcherClosedError,
    DispatchTimeoutError,
    Retry,
)
from threaddispatch.metrics import job_recorder
from threaddispatch.middleware import HandlerCall
from threaddispatch.stores.base import JobRecord, JobState, QueueLimits

__all__ = ["Runtime", "on_engine_thread"]

# .runtime: the Runtime whose thread this is, while it runs that runtime's loops or work;
# stop() there must not wait for itself. Thread-local: no lock.
_ENGINE_THREAD = threading.local()
_MAX_DUE = 4_096  # due times the fetcher keeps (a later one past it is found by the poll)


def on_engine_thread(runtime: Runtime | None) -> bool:
    """Whether the calling thread is one of ``runtime``'s (a worker, its fetcher, heartbeat or cron thread)."""
    return runtime is not None and getattr(_ENGINE_THREAD, "runtime", None) is runtime


def _new_worker_id() -> str:
    import socket  # here: an engine that never starts its workers never loads socket nor uuid
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def describe_outcome(tracing: Tracing, span: Any, error: BaseException | None) -> None:
    """Set ``threaddispatch.job.outcome`` on a run span; a failure also sets status ERROR, the exception recorded.

    ``Retry`` and ``Cancel`` are the handler's choices, not failures: attributes only.
    """
    if error is None:
        span.set_attribute("threaddispatch.job.outcome", "completed")
    elif isinstance(error, Retry):
        span.set_attribute("threaddispatch.job.outcome", "retry")
        if isinstance(error.delay, (int, float)):
            span.set_attribute("threaddispatch.job.retry_delay", float(error.delay))
    elif isinstance(error, Cancel):
        span.set_attribute("threaddispatch.job.outcome", "cancelled")
    else:
        timed_out = isinstance(error, DispatchTimeoutError)
        span.set_attribute("threaddispatch.job.outcome", "timed_out" if timed_out else "failed")
        tracing.record_error(span, error)


class Runtime:
    """One run of an engine (see the module docstring). Fields are guarded by ``shared.lock``.

    ``previous``: the runtime of the engine's last run, whose abandoned handlers may still
    run; they count against this run's ``concurrency`` until they return.
    """

    def __init__(
        self,
        shared: Shared,
        cron: CronRunner,
        *,
        queues: tuple[str, ...],
        concurrency: int,
        previous: Runtime | None = None,
        inline: bool = False,
    ) -> None:
        config = shared.config
        self.shared = shared
        self.worker_id = _new_worker_id()
        self.queues = queues
        self.concurrency = concurrency
        self._cron = cron
        # Both None unless the engine has metrics / a tracer provider: one test per job each.
        self._meter = None if config.metrics is None else job_recorder(shared.engine)
        self._tracing = make_tracing(config.tracer_provider, "jobs")
        self._recorder = Recorder(shared, self.worker_id, self._meter)
        self.registration = Registration(shared, self.worker_id, queues, concurrency)  # the worker-registry row
        self._previous = previous
        # "inline" (no threads: immediate mode, run_pending) or running -> stopping -> stopped.
        self.state = "inline" if inline else "running"
        self.stop_event = threading.Event()
        self.inflight: dict[str, Slot] = {}
        # Abandoned slots (timed out, cancelled, lost) whose job this process claimed again while
        # their thread still runs: out of inflight (the new claim's slot is there), still counted.
        self.orphans: set[Slot] = set()
        # Slots of a serial lock whose claim ended while their handler still runs (timed out,
        # cancelled, lost, handed back): the store keeps the lock held (a LockHold) until the
        # handler returns, and the heartbeat keeps the hold alive. Value: "making" while this
        # run writes the hold, "held" once it is stored (or the store's cancel made it),
        # "returned" when the handler returned while it was being written (its writer then
        # releases it). A slot leaves when its hold is released.
        self._holds: dict[Slot, str] = {}
        self.queue_running: dict[str, int] = {}
        # Outcomes waiting for the fetcher's group commit (while running), or for the next claim of a
        # run_due on the thread that recorded them (inline).
        self._done: list[Outcome] = []
        # Slots run_due admitted whose outcome is not recorded yet: it waits in _done for run_due's next
        # claim. Only those: a job an immediate enqueue runs inside one of them is written at once.
        self._deferred: set[Slot] = set()
        self._wake_pending = True
        # The run_at (epoch) of every delayed or retrying job this process knows of, as a heap
        # (lock held): the idle fetcher wakes at the earliest; each due time is popped once passed.
        self._due: list[float] = []
        self._threads_stop = False  # set by stop() once the heartbeat/cron threads may leave
        self._unsubscribe: Callable[[], None] | None = None  # the store's wake-ups (LISTEN/NOTIFY)
        self._planner = ClaimPlanner(queues, config.queue_configs)
        # When the fetcher last read the paused queues (monotonic; -inf: read before the next
        # claim). The fetcher reads and writes it without the lock; a store wake-up resets it
        # under the lock: a float store is atomic, and the fetcher's read that follows its own
        # write is after the resume it was woken for committed.
        self._paused_checked = -math.inf
        # Whether the fetcher's read of the paused queues is under way (lock held): a wake-up then
        # may be a resume the read missed, and makes it read again.
        self._paused_reading = False
        self._pool: WorkerPool | None = None
        self._fetcher: threading.Thread | None = None
        self._helpers: list[threading.Thread] = []  # the heartbeat, upkeep and cron threads
        if not inline:
            self._pool = WorkerPool(concurrency, name="jobs-worker")
            self._fetcher = threading.Thread(target=self._fetch_loop, name="threaddispatch-jobs-fetcher", daemon=True)
            maintenance = Maintenance(self)
            self._helpers = [
                threading.Thread(target=self._marked, args=(maintenance.run_heartbeats,),
                                 name="threaddispatch-jobs-heartbeat", daemon=True),
                threading.Thread(target=self._marked, args=(maintenance.run_upkeep,),
                                 name="threaddispatch-jobs-upkeep", daemon=True),
                threading.Thread(target=self._marked, args=(self._run_crons,), name="threaddispatch-jobs-cron",
                                 daemon=True),
            ]  # fmt: skip

    # -- starting --------------------------------------------------------------------------------------

    def start_threads(self) -> None:
        """Start the fetcher, heartbeat and cron threads (shared lock held).

        Started under the lock: a stop() racing this start must never find a thread it
        cannot join yet. Thread.start() only waits for the thread to exist, not for it to
        take the lock, so this cannot deadlock.
        """
        for thread in (self._fetcher, *self._helpers):
            if thread is not None:
                thread.start()

    def subscribe(self) -> None:
        """Register this run in the store's worker registry, and take its wake-ups if it offers them (no lock held)."""
        self.registration.register()
        shared = self.shared
        try:
            unsubscribe = shared.store.subscribe_wakeups(self._store_wakeup)
        except Exception:
            shared.logger.warning("store wake-ups unavailable; polling only", exc_info=True)
            return
        with shared.lock:
            # A stop() that raced this start has already looked for a subscription to end.
            keep = self.state == "running" and self._unsubscribe is None
            if keep:
                self._unsubscribe = unsubscribe
        if not keep:
            unsubscribe()

    def _marked(self, loop: Callable[[], None]) -> None:
        _ENGINE_THREAD.runtime = self
        loop()

    def _run_crons(self) -> None:
        self._cron.run(self.worker_id, self.stop_event, max(self.shared.config.stale_job_threshold, 0.1))

    # -- what the engine tells a run -----------------------------------------------------------------

    def jobs_arrived(self, jobs: Sequence[JobRecord]) -> None:
        """Jobs were enqueued in this process: wake the fetcher if it serves one of them."""
        if self.state != "running" or not any(job.queue in self.queues for job in jobs):
            return
        due = min(job.run_at for job in jobs)
        with self.shared.lock:
            self._wake_fetcher(due)

    def wake(self) -> None:
        """Make the fetcher look at the store again now (a queue was resumed)."""
        with self.shared.lock:
            self._wake_fetcher()

    def _store_wakeup(self, queue: str | None, run_at: float | None) -> None:
        """The store saw jobs arrive on ``queue`` (None: anywhere), due from ``run_at``: wake the fetcher.

        A wake-up for a queue this run believes paused (or for anything: notifications may have
        been missed) may be its resume by another process: the fetcher reads the paused queues
        again before its claim. Jobs due later (a retry another process made, a delayed
        enqueue) only add their due time, waking the idle fetcher only when it is the earliest
        (to shorten its wait): a cluster's retries cost no claim in every idle process. Called
        on a store thread (e.g. PostgresStore's LISTEN thread); takes the lock briefly.
        """
        if queue is not None and queue not in self.queues:
            return
        shared = self.shared
        with shared.lock:
            if self.state != "running":
                return
            later = run_at if run_at is not None and run_at > time.time() else None
            if queue is None or queue in shared.paused or self._paused_reading:
                self._paused_checked = -math.inf
            elif later is not None:
                earliest = self._due[0] if self._due else math.inf
                self._remember_due(later)
                if later < earliest:
                    shared.wake.notify()
                return
            self._wake_fetcher(later)

    def _wake_fetcher(self, due: float | None = None) -> None:
        """Lock held: the fetcher claims again at once (and by ``due``, epoch seconds, when given)."""
        if due is not None:
            self._remember_due(due)
        self._wake_pending = True
        self.shared.wake.notify()

    def _remember_due(self, due: float) -> None:
        """Lock held: wake the idle fetcher at ``due`` (epoch seconds)."""
        heapq.heappush(self._due, due)
        if len(self._due) > _MAX_DUE:
            # Keep the earliest half: a forgotten later one is found by the poll, as any job of another process.
            self._due = heapq.nsmallest(_MAX_DUE // 2, self._due)

    def _until_due(self) -> float:
        """Lock held: seconds until the earliest known due time (0 if one has passed, inf if none);
        due times passed are forgotten (the claim that follows takes their jobs, or they were taken)."""
        due = self._due
        if not due:
            return math.inf
        now = time.time()
        if due[0] > now:
            return due[0] - now
        while due and due[0] <= now:
            heapq.heappop(due)
        return 0.0

    def busy(self) -> int:
        """How many handlers of this run (and earlier runs) hold a slot (lock held)."""
        previous = self._previous
        if previous is not None:
            earlier = previous.busy()
            if earlier:
                return len(self.inflight) + len(self.orphans) + earlier
            self._previous = None  # every earlier handler returned
        return len(self.inflight) + len(self.orphans)

    def cancel_running(self, job_id: str) -> bool:
        """The operator cancelled ``job_id`` in the store: settle its slot here and cancel its ctx.

        The store's cancel kept a running job's serial lock held (a LockHold): this run keeps
        the hold alive until the handler returns, then releases it.
        """
        shared = self.shared
        with shared.lock:
            slot = self.inflight.get(job_id)
            if slot is None or slot.settled:
                return False
            slot.settled = slot.abandoned = True
            if slot.started and slot.job.lock is not None:
                self._holds.setdefault(slot, "held")
        slot.ctx._cancel()
        shared.count("cancelled")
        return True

    # -- inline (immediate mode, run_pending) -------------------------------------------------------

    def claim_one(self, queues: Sequence[str]) -> JobRecord | None:
        """Claim one due job of ``queues`` for this runtime, or None."""
        claimed = self.shared.store.claim(queues, 1, worker_id=self.worker_id, now=time.time())
        return claimed[0] if claimed else None

    def run_due(self, queues: Sequence[str]) -> int:
        """Claim the due jobs of ``queues`` one at a time and run each on this thread; how many ran (inline).

        Each outcome is written with the next claim, in one store call (``complete_and_claim``, as
        the fetcher's group commit), not in a call of its own: one store round trip per job, not two.
        A store error on a claim is raised once the outcomes it carried are settled (they are left
        to the reaper, as the fetcher leaves them); what is still unwritten as this returns or
        raises is written first.
        """
        shared = self.shared
        ran = 0
        try:
            while True:
                with shared.lock:
                    batch, self._done = self._done, []
                effects, jobs = self._recorder.write(batch, (queues, 1))
                self._settle(batch, effects)
                if effects.store_error is not None:  # set with store_failed
                    raise effects.store_error
                if not jobs:
                    if not batch:
                        return ran
                    # Claim once more, alone: a claim sharing its statement with completions does not
                    # see the dependents they released (PostgreSQL's one snapshot per statement).
                    continue
                self.run_claimed(jobs[0], defer=True)
                ran += 1
        finally:
            self._flush()

    def run_claimed(self, job: JobRecord, *, defer: bool = False) -> JobRecord:
        """Run one claimed job on this thread and record its outcome; returns its record as left.

        ``defer``: the outcome is left in ``_done`` for the caller's next write (:meth:`run_due`).
        """
        with self.shared.lock:
            slot = self._admit(job)
            self.shared.stats["claimed"] += 1
            if defer:
                self._deferred.add(slot)
        self._execute(slot)
        return slot.job

    # -- fetching --------------------------------------------------------------------------------------

    def _refresh_paused(self) -> None:
        """Read the paused queues from the store, at most once per poll interval (a second since the last
        read) unless a store wake-up asked for it; again (up to 3 reads) when one arrived during a read."""
        shared = self.shared
        if time.monotonic() - self._paused_checked < max(shared.config.poll_interval, 1.0):
            return
        for _ in range(3):
            self._paused_checked = time.monotonic()
            if not self._read_paused() or self._paused_checked != -math.inf:
                return

    def _read_paused(self) -> bool:
        """One read of the paused queues into ``shared.paused``; False if it failed (logged)."""
        shared = self.shared
        with shared.lock:
            version = shared.paused_version
            self._paused_reading = True
        try:
            paused = shared.store.paused_queues()
        except Exception:
            shared.logger.warning("could not read paused queues", exc_info=True)
            return False
        finally:
            with shared.lock:
                self._paused_reading = False
        with shared.lock:
            if shared.paused_version != version:
                # pause_queue/resume_queue ran here during the read: the local set is newer than
                # what was read, so keep it; the next refresh reads the store again.
                return True
            shared.paused.clear()
            shared.paused.update(paused)
        return True

    def _share_limits(self) -> None:
        """Give the store this run's queue limits, which its claims then hold for the whole cluster (no lock held).

        The planner's per-process buckets stay as this process's own bound. A store that
        cannot take them leaves the per-process limits alone in force (logged).
        """
        shared = self.shared
        limits = [
            QueueLimits(config.name, config.rate_limit, config.rate_burst, config.max_concurrency)
            for config in shared.config.queue_configs
            if config.name in self.queues and (config.rate_limit is not None or config.max_concurrency is not None)
        ]
        if not limits:
            return
        try:
            shared.store.set_queue_limits(limits, now=time.time())
        except Exception:
            shared.logger.warning("could not store the queue limits; they hold per process only", exc_info=True)

    def _fetch_loop(self) -> None:
        _ENGINE_THREAD.runtime = self
        self._share_limits()  # before the first claim
        shared = self.shared
        config = shared.config
        idle = config.poll_interval
        while True:
            try:
                following = self._fetch_turn(idle)
            except Exception:  # the fetcher must outlive any one turn: a store bug, a codec error
                shared.logger.exception("the fetcher's turn failed; it claims again in %.3gs", idle)
                # Back off for the whole interval (a finishing job's wake-up does not end it); stop does.
                until = time.monotonic() + idle
                with shared.lock:
                    while self.state == "running" and (remaining := until - time.monotonic()) > 0:
                        shared.wake.wait(remaining)
                    running = self.state == "running"
                following = min(idle * 2, config.max_poll_interval) if running else None
            if following is None:
                return
            idle = following

    def _fetch_turn(self, idle: float) -> float | None:
        """One turn of the fetcher: write the queued outcomes, claim, hand out, or wait (at most ``idle`` s).

        Returns the next turn's idle wait, or None once the run is no longer running. A
        store call that raises (any error) is logged, and the next claim waits as after a
        StoreError; anything else that raises ends only this turn (see :meth:`_fetch_loop`).
        """
        self._refresh_paused()
        shared = self.shared
        lock = shared.lock
        config = shared.config
        poll = config.poll_interval
        with lock:
            if self.state != "running":
                return None
            batch, self._done = self._done, []
            # Slots of finished jobs in the batch are free once it is written (in the claim's transaction).
            free = self.concurrency - self.busy() + sum(1 for outcome in batch if outcome.ends_slot)
            if free <= 0 and not batch:
                # Woken by a finishing job (or stop); nothing to claim meanwhile.
                shared.wake.wait(poll)
                return idle
            self._wake_pending = False
            plans, rate_wait = (
                self._planner.plan(free, shared.paused, self.queue_running) if free > 0 else ([], math.inf)
            )
        claimed: list[JobRecord] = []
        failed_store = False
        # A limited queue's claim that came back short may be held back by other processes'
        # share of the cluster's limit, which this process cannot see: look again within
        # poll_interval instead of backing off (at worst one claim per poll while it idles).
        held_back = False
        for queues, planned, bucket in plans:
            limit = min(planned, free - len(claimed))
            if limit <= 0:
                if bucket is not None:
                    bucket.give_back(planned)
                continue
            effects, jobs = self._recorder.write(batch, (queues, limit))
            self._settle(batch, effects)
            batch = []
            if effects.store_failed:
                error = effects.store_error
                shared.logger.warning("claiming jobs failed; retrying after %.3gs", idle, exc_info=error)
                failed_store = True
            if bucket is not None:
                bucket.give_back(planned - len(jobs))
            if len(jobs) < limit and self._planner.limited(queues):
                held_back = True
            claimed.extend(jobs)
        if batch:
            self._write(batch)
        if claimed:
            self._dispatch(claimed)
            return poll
        with lock:
            if self.state != "running":
                return None
            if (self._wake_pending or self._done) and not failed_store:
                return idle
            wait = min(idle, rate_wait, self._until_due())
            shared.stats["idle_polls"] += 1
            shared.wake.wait(wait)
            woken = self._wake_pending
        return poll if woken or held_back else min(idle * 2, config.max_poll_interval)

    def _admit(self, job: JobRecord) -> Slot:
        """A slot for the claimed ``job`` in the in-flight table (lock held)."""
        shared = self.shared
        ctx = JobContext(
            job, shared.engine, shared.logger, immediate=shared.config.immediate, on_deadline=self._deadline_armed
        )
        slot = Slot(job, ctx, shared.definitions.get(job.name))
        previous = self.inflight.get(job.id)
        if previous is not None:
            self.orphans.add(previous)  # its handler still runs; the new claim takes its key
        self.inflight[job.id] = slot
        self.queue_running[job.queue] = self.queue_running.get(job.queue, 0) + 1
        return slot

    def _dispatch(self, jobs: list[JobRecord]) -> None:
        shared = self.shared
        with shared.lock:
            stopping = self.state != "running"
            held: list[JobRecord] = []
            if not stopping and shared.paused:
                # A claim planned before pause_queue returned: its paused jobs go back, unstarted.
                held = [job for job in jobs if job.queue in shared.paused]
                jobs = [job for job in jobs if job.queue not in shared.paused]
            slots = [] if stopping else [self._admit(job) for job in jobs]
            if not stopping:
                shared.stats["claimed"] += len(jobs)
            pool = self._pool
        if held:
            try:
                shared.store.release([job.id for job in held], worker_id=self.worker_id, now=time.time())
            except Exception:
                shared.logger.exception("could not hand back %d jobs of paused queues; reaped as stale", len(held))
        if stopping or pool is None:
            # Claimed while stop() began: give them straight back.
            try:
                shared.store.release([job.id for job in jobs], worker_id=self.worker_id, now=time.time())
            except Exception:
                shared.logger.exception("could not release %d jobs at stop; they will be reaped as stale", len(jobs))
            return
        for slot in slots:
            pool.run(self._execute, slot)

    def _deadline_armed(self, deadline: float) -> None:
        with self.shared.lock:
            self.shared.maint.notify()

    # -- executing -------------------------------------------------------------------------------------

    def _execute(self, slot: Slot) -> None:
        # Usually on a pool thread; on the caller in an inline runtime or when the pool runs work inline.
        previous = getattr(_ENGINE_THREAD, "runtime", None)
        _ENGINE_THREAD.runtime = self
        try:
            self._run_slot(slot)
        finally:
            _ENGINE_THREAD.runtime = previous

    def _run_slot(self, slot: Slot) -> None:
        shared = self.shared
        with shared.lock:
            settled = slot.settled
            if settled:
                # Released at stop (already forgotten) or cancelled by an operator before it started:
                # no handler will return to end the slot, so it ends here (with any hold the store made).
                self._forget(slot)
                unhold = self._hold_ended(slot)
            else:
                slot.started = True
                slot.thread = threading.current_thread()
        if settled:
            if unhold:
                self._release_holds([slot])
            return
        tracing = self._tracing
        outcome = self._begin(slot) if tracing is None else self._traced(tracing, slot)
        self.record(outcome, handler_done=True)

    def _begin(self, slot: Slot) -> Outcome:
        """Start the attempt (clock, metrics, the ``job_started`` hooks) and run it (no lock held)."""
        shared = self.shared
        job = slot.job
        slot.ctx.started = time.monotonic()
        meter = self._meter
        if meter is not None:
            meter.started(job)
        if shared.events.has_listeners("job_started"):
            shared.events.emit("job_started", job)
        return self._attempt(slot)

    def _traced(self, tracing: Tracing, slot: Slot) -> Outcome:
        """:meth:`_begin` in the job's CONSUMER span, linked to the span that enqueued it."""
        job = slot.job
        attributes = {
            "messaging.system": "threaddispatch",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": job.queue,
            "messaging.message.id": job.id,
            "threaddispatch.job.name": job.name,
            "threaddispatch.job.attempt": job.attempts,
        }
        with tracing.run_span(f"process {job.queue}", job.trace_context, attributes) as span:
            outcome = self._begin(slot)
            describe_outcome(tracing, span, outcome.error)
            if slot.abandoned:  # read without the lock: set once, before the ctx was cancelled
                span.set_attribute("threaddispatch.job.abandoned", True)
        return outcome

    def _attempt(self, slot: Slot) -> Outcome:
        """Run the job's handler through the middleware; its outcome (no lock held)."""
        job = slot.job
        ctx = slot.ctx
        definition = slot.definition
        if definition is None:
            return Outcome(slot, ConfigurationError(f"no handler registered for job name {job.name!r} in this worker"))
        error: BaseException | None = None
        result: object = None
        try:
            raw = job.payload  # decoded as job.decoded_payload() does; "null" (no payload) without json
            result = self._call_chain(ctx, definition.fn, None if raw == "null" else json.loads(raw))
        except BaseException as caught:  # noqa: BLE001 - every handler outcome is recorded
            error = caught
        if self.shared.config.immediate and ctx.deadline is not None and time.monotonic() > ctx.deadline:
            # Nothing interrupted the caller's thread: the attempt counts as timed out, as it would have.
            return Outcome(slot, ctx._timeout_error())
        if error is not None:
            return Outcome(slot, error)
        text, note = encode_result(self.shared, job, result)
        return Outcome(slot, None, text=text, note=note, result=result)

    def _call_chain(self, ctx: JobContext, fn: Callable[[JobContext, Any], object], payload: Any) -> object:
        # Each step gets ctx and a zero-argument call of the rest; partial objects do it without
        # a Python frame per level.
        call_next: Callable[[], object] = HandlerCall(fn, ctx, payload)
        for step in reversed(self.shared.steps):
            call_next = partial(step, ctx, call_next)
        return call_next()

    # -- the one completion path -------------------------------------------------------------------------

    def record(self, outcome: Outcome, *, handler_done: bool = False) -> None:
        """Record a slot's outcome (any thread, no lock held): the only way an outcome is written.

        ``handler_done``: the outcome is the handler's own, and settles the slot, unless the slot
        was settled meanwhile (timed out, lost or handed back: that outcome stands, this one is
        discarded); otherwise the caller has settled the slot (a timeout). While running, the
        fetcher writes the outcome with its next claim (the group commit), and the slot stays
        in flight (its job running) until then; otherwise it is written here, now, with any
        outcome still queued.
        """
        shared = self.shared
        slot = outcome.slot
        with shared.lock:  # one critical section per outcome: the hot path of every job
            if not (handler_done and slot.settled):
                if handler_done:
                    slot.settled = True
                if self.state == "running":
                    self._done.append(outcome)
                    self._wake_pending = True
                    shared.wake.notify()
                    return
                if self._deferred and slot in self._deferred:
                    self._deferred.discard(slot)
                    self._done.append(outcome)  # run_due writes it with its next claim
                    return
                batch, self._done = [*self._done, outcome], []
            else:
                # Settled meanwhile (timed out, lost, cancelled, handed back): this outcome is discarded.
                self._forget(slot)
                if not self._hold_ended(slot):
                    return
                batch = []
        if batch:
            self._write(batch)
        else:
            self._release_holds([slot])

    def time_out(self, slot: Slot) -> None:
        """``slot`` (settled, abandoned) ran past its deadline: cancel it and record the timeout.

        A job with a serial lock keeps it held (a LockHold, stored before the timeout is) until
        its handler returns: the job is failed or retrying at once, the lock's next job waits.
        """
        with self.shared.lock:
            holding = self._begin_hold(slot)
        if holding:
            self._make_holds([slot])
        slot.ctx._cancel()
        self.shared.count("timed_out")
        error = DispatchTimeoutError(f"job {slot.job.name} {slot.job.id} timed out after {slot.ctx.timeout}s")
        self.shared.logger.warning("%s; its thread keeps running until the handler returns", error)
        self.record(Outcome(slot, error, ends_slot=False))

    def _write(self, batch: list[Outcome]) -> None:
        effects, _ = self._recorder.write(batch)
        self._settle(batch, effects)

    def _flush(self) -> None:
        """Write the outcomes queued for the fetcher (at stop, once it has left)."""
        with self.shared.lock:
            batch, self._done = self._done, []
        if batch:
            self._write(batch)

    def _settle(self, batch: list[Outcome], effects: Effects) -> None:
        """After a batch was written: count, free the slots, report lost claims, emit the events."""
        if not batch:
            return
        shared = self.shared
        with shared.lock:
            stats = shared.stats
            for name, amount in effects.counts.items():
                stats[name] = stats.get(name, 0) + amount
            for outcome in batch:
                job = outcome.slot.job
                if job.state is JobState.RETRYING and job.queue in self.queues and self.state == "running":
                    self._remember_due(job.run_at)
                    shared.wake.notify()
                if outcome.ends_slot:
                    self._forget(outcome.slot)
            pool = self._pool
        unheld: list[Slot] = []
        for slot in effects.lost:
            self.lose(slot)
            if slot.job.lock is not None and any(o.slot is slot and o.ends_slot for o in batch):
                # Its handler returned but the claim had ended (an operator's cancel, whose store
                # call held the lock): the hold goes now.
                unheld.append(slot)
        self._release_holds(unheld)
        if effects.events:
            self._emit(effects.events, pool)

    def _emit(self, events: list[tuple[str, tuple[Any, ...]]], pool: WorkerPool | None) -> None:
        # Hooks are user code: the fetcher hands them to a worker thread; any other writer (a
        # worker, the heartbeat thread, stop(), an inline caller) runs them itself, as it wrote.
        if pool is not None and threading.current_thread() is self._fetcher:
            try:
                pool.run(self._emit_now, events)
                return
            except DispatcherClosedError:
                pass
        self._emit_now(events)

    def _emit_now(self, events: list[tuple[str, tuple[Any, ...]]]) -> None:
        previous = getattr(_ENGINE_THREAD, "runtime", None)
        _ENGINE_THREAD.runtime = self
        try:
            for name, args in events:
                self.shared.events.emit(name, *args)
        finally:
            _ENGINE_THREAD.runtime = previous

    def _forget(self, slot: Slot) -> None:
        """Drop a slot from the in-flight table (lock held); wake the fetcher, stop() and result() waiters."""
        if self._deferred:
            self._deferred.discard(slot)  # a run_due slot that ended with no outcome of its own (lost)
        if self.inflight.get(slot.job.id) is slot:
            del self.inflight[slot.job.id]
        elif slot in self.orphans:
            self.orphans.discard(slot)
        else:
            return
        queue = slot.job.queue
        left = self.queue_running.get(queue, 1) - 1
        if left:
            self.queue_running[queue] = left
        else:
            self.queue_running.pop(queue, None)
        shared = self.shared
        shared.wake.notify()
        if self.state != "running":
            shared.idle.notify_all()
        if shared.waiters:
            shared.wake_waiters(slot.job.id)

    def lose(self, slot: Slot) -> None:
        """The store says the job is no longer our claim (cancelled, reaped, re-claimed).

        A handler still running keeps any lock hold the store made for it (an operator's cancel
        in another process) alive until it returns (a reaped job has none: releasing it is a no-op).
        """
        slot.ctx._cancel()
        with self.shared.lock:
            if slot.started and slot.job.lock is not None and self._in_flight(slot):
                self._holds.setdefault(slot, "held")
        self.shared.count("lost")
        self.shared.logger.info("job %s %s is no longer this worker's claim; its outcome is discarded",
                                slot.job.name, slot.job.id)  # fmt: skip

    # -- lock holds: a serial lock kept past its job's running state while the handler still runs ----------

    def _in_flight(self, slot: Slot) -> bool:
        """Whether ``slot``'s handler has not returned yet (lock held): it is still in the in-flight table."""
        return self.inflight.get(slot.job.id) is slot or slot in self.orphans

    def _begin_hold(self, slot: Slot) -> bool:
        """Lock held: whether ``slot``, whose claim this run is ending with its handler still running,
        needs a hold written (it then is "making": the caller writes it with :meth:`_make_holds`)."""
        if slot.job.lock is None or not slot.started or slot in self._holds or not self._in_flight(slot):
            return False
        self._holds[slot] = "making"
        return True

    def _make_holds(self, slots: list[Slot]) -> None:
        """Store the holds of ``slots`` (each begun by :meth:`_begin_hold`) before their claims end (no lock held).

        A hold that could not be stored is logged: the claim still ends, and the lock's next
        job may then start beside the handler (as without holds). A handler that returned
        while its hold was written has its hold released here.
        """
        if not slots:
            return
        shared = self.shared
        claims = [(slot.job.id, slot.job.attempts) for slot in slots]
        try:
            shared.store.hold_locks(claims, worker_id=self.worker_id, now=time.time())
        except Exception:
            names = ", ".join(f"{slot.job.name} {slot.job.id}" for slot in slots)
            shared.logger.warning("could not keep the serial locks of abandoned jobs held: %s", names, exc_info=True)
        returned: list[Slot] = []
        with shared.lock:
            for slot in slots:
                if self._holds.get(slot) == "returned":
                    del self._holds[slot]
                    returned.append(slot)
                else:
                    self._holds[slot] = "held"
        self._release_holds(returned)

    def _hold_ended(self, slot: Slot) -> bool:
        """Lock held: ``slot``'s handler returned (or will never run); whether its hold must be released now.

        A hold being written is released by its writer; an abandoned slot of a lock with no
        hold known here may still have one the store made (an operator's cancel): released too.
        """
        if slot.job.lock is None:
            return False
        state = self._holds.pop(slot, None)
        if state == "making":
            self._holds[slot] = "returned"
            return False
        return state is not None or slot.abandoned

    def _release_holds(self, slots: list[Slot]) -> None:
        """Delete the holds of ``slots``, whose handlers returned, and wake the fetcher (no lock held).

        A delete that fails is logged; the hold, no longer heartbeaten, is reaped as stale.
        """
        if not slots:
            return
        shared = self.shared
        try:
            shared.store.release_holds([(slot.job.id, slot.job.attempts) for slot in slots], worker_id=self.worker_id)
        except Exception:
            shared.logger.warning("could not release the serial lock holds of %d job(s); they are reaped as stale",
                                  len(slots), exc_info=True)  # fmt: skip
            return
        with shared.lock:
            if self.state == "running":
                self._wake_fetcher()

    def beat_holds(self) -> None:
        """Keep the lock holds of this run's abandoned handlers, and of earlier runs', alive (no lock held).

        One store write per run with holds; a failure is logged (the next heartbeat tries again).
        """
        shared = self.shared
        runtime: Runtime | None = self
        while runtime is not None:
            with shared.lock:
                ids = [slot.job.id for slot in runtime._holds]
                worker_id, runtime = runtime.worker_id, runtime._previous
            if not ids:
                continue
            try:
                shared.store.heartbeat_holds(ids, worker_id=worker_id, now=time.time())
            except Exception:
                shared.logger.warning("heartbeat failed for %d serial lock hold(s)", len(ids), exc_info=True)

    # -- for the maintenance loop ------------------------------------------------------------------------

    def leaving(self) -> bool:
        return self._threads_stop

    def reaped(self, job_ids: list[str], now: float) -> None:
        with self.shared.lock:
            self.shared.stats["reaped"] += len(job_ids)
            self._wake_fetcher(now)

    # -- stopping --------------------------------------------------------------------------------------

    def stop(self, deadline: float) -> bool:
        """Stop this run by ``deadline`` (monotonic); see ``JobEngine.stop`` for the contract."""
        shared = self.shared
        on_own_thread = on_engine_thread(self)
        with shared.lock:
            if self.state != "running":
                if self.state == "stopping":
                    if on_own_thread:
                        return False  # the stopper may be waiting for this very thread
                    # Another thread is stopping: wait for it within our own budget.
                    while self.state == "stopping":
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        shared.idle.wait(remaining)
                return True
            self.state = "stopping"
            self.stop_event.set()
            shared.wake.notify_all()
        if not on_own_thread:
            return self._finish_stop(deadline, None)
        stopper = threading.Thread(
            target=self._finish_stop,
            args=(deadline, threading.current_thread()),
            name="threaddispatch-jobs-stop",
            daemon=True,
        )
        try:
            stopper.start()
        except RuntimeError:  # interpreter shutdown: the exit drain finishes the stop
            shared.logger.warning("stop() on an engine thread during interpreter exit: left to the exit drain")
        return False

    def _finish_stop(self, deadline: float, caller: threading.Thread | None) -> bool:
        """The rest of :meth:`stop` once the state is "stopping"; ``caller``: an engine thread whose job stays."""
        shared = self.shared
        fetcher = self._fetcher
        if fetcher is not None and fetcher is not threading.current_thread():
            fetcher.join(max(0.0, deadline - time.monotonic()))
        with shared.lock:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        self._flush()  # workers queue no more once the state left "running"
        self._release_unstarted()
        clean = self._wait_inflight(deadline)
        handed_back = self._hand_back_running(caller)
        with shared.lock:
            self._threads_stop = True
            shared.maint.notify_all()
        for thread in self._helpers:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self.registration.remove()
        if self._pool is not None:
            self._pool.shutdown(max(0.0, deadline - time.monotonic()))
        self._cron.release_leases(self.worker_id, deadline)
        with shared.lock:
            self.state = "stopped"
            shared.idle.notify_all()
        shared.events.emit("shutdown")
        return clean and not handed_back

    def _release_unstarted(self) -> None:
        shared = self.shared
        with shared.lock:
            slots = [slot for slot in self.inflight.values() if not slot.started and not slot.settled]
            for slot in slots:
                slot.settled = True
                self._forget(slot)
        if slots:
            try:
                shared.store.release([slot.job.id for slot in slots], worker_id=self.worker_id, now=time.time())
            except Exception:
                shared.logger.exception("could not release %d unstarted jobs; they will be reaped as stale", len(slots))
            shared.count("released", len(slots))
            # A job cancelled by an operator in another process meanwhile has a hold from the store's cancel.
            self._release_holds([slot for slot in slots if slot.job.lock is not None])

    def _wait_inflight(self, deadline: float) -> bool:
        shared = self.shared
        with shared.lock:
            while any(not slot.abandoned for slot in self.inflight.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                shared.idle.wait(remaining)
            return not self.inflight and not self.orphans

    def _hand_back_running(self, caller: threading.Thread | None) -> int:
        shared = self.shared
        with shared.lock:
            slots = [
                slot
                for slot in self.inflight.values()
                if not slot.settled and (caller is None or slot.thread is not caller)
            ]
            for slot in slots:
                slot.settled = slot.abandoned = True
                slot.ctx._cancel()
            holding = [slot for slot in slots if self._begin_hold(slot)]
        if not slots:
            return 0
        self._make_holds(holding)  # before the hand-back: a handed-back job's lock stays held while it runs
        shared.logger.warning(
            "stop: %d job(s) still running at the shutdown timeout are handed back: %s",
            len(slots), ", ".join(f"{slot.job.name} {slot.job.id}" for slot in slots),
        )  # fmt: skip
        try:
            shared.store.release(
                [slot.job.id for slot in slots], worker_id=self.worker_id, now=time.time(), refund_attempt=False
            )
        except Exception:
            shared.logger.exception("could not hand back %d running jobs; they will be reaped as stale", len(slots))
        shared.count("released", len(slots))
        return len(slots)
