"""RequestDispatcher's core: the threads and the user code around the scheduler.

:class:`Core` is a :class:`~threaddispatch._request_scheduler.Scheduler` (the state and
every decision, under the lock) plus what may not happen under the lock: it takes the
lock, lets the scheduler decide into an :class:`~threaddispatch._request_records.Outbox`,
releases it and carries the outbox out (:meth:`Core._dispatch`): hands attempts to the
shared :class:`~threaddispatch._pool.WorkerPool`, emits events, settles Futures, writes
the storage and the cache. It runs the attempts on the worker threads, the retry timer
(and connectivity probe) thread, and the close, the exit drain and the fork reset.
Worker and timer threads hold the core, never the public dispatcher, so an unreferenced
dispatcher can be collected. An ended attempt goes through ``finished``
(:meth:`Core._finish_attempt`): applied by its worker when the lock is free, else by the
thread holding it as it releases it (the scheduler's docstring, "Locking"). A plain add
goes through ``intake`` the same way (:meth:`Core._add_to_intake`): queued by its caller
when the lock is free, else by the next thread to take it.

The one thing due by time, a retry after ``retry_time``, is handled by one lazily
started daemon timer thread (``threaddispatch-<name>-timer``) that waits on the retry
:class:`~threaddispatch._timers.DelayQueue` and leaves when it is empty. With an
``is_online`` probe the same thread also polls it and stays until close.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from threaddispatch import _invoke, _lifecycle
from threaddispatch._pool import WorkerPool
from threaddispatch._request_cache import CachedResponse, RequestCache
from threaddispatch._request_events import RequestEvents
from threaddispatch._request_online import Connectivity
from threaddispatch._request_records import (
    QUEUE_STOPPED,
    RUNNING,
    STARTED,
    STOPPED,
    UNQUEUED,
    WAITING,
    Outbox,
    PendingRequest,
    RequestHandle,
    settle,
)
from threaddispatch._request_scheduler import Scheduler
from threaddispatch._request_token import CancellationToken, watched
from threaddispatch._request_types import QueuedRequest, QueueSnapshot, QueueStatus, RequestEvent
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.errors import DispatcherClosedError
from threaddispatch.metrics import FaceRecorder

if TYPE_CHECKING:  # a dispatcher given storage= makes one (sqlite3 and datetime load with it)
    from threaddispatch._request_persist import StorageLink

__all__ = ["Core"]

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

_log = logging.getLogger("threaddispatch.requests")
_local = threading.local()  # .core: the core whose send runs on this thread; .launches: see _launch_guarded
_WINDOW_PER_WORKER = 4  # attempts in flight per worker thread (see Core.window)
_MAX_POLICIES = 64  # retry policies kept, one per distinct retry_time (more are built per failure)
_CARRY_ROUNDS = 4  # rounds of carrying out one caller does before handing the rest to a pool thread


class Core(Scheduler, Generic[RequestT, ResponseT]):
    """The scheduler plus its threads and user code. Thread-safe; user code runs with no lock held."""

    def __init__(
        self,
        send: Callable[[RequestT, CancellationToken], ResponseT],
        *,
        max_workers: int,
        name: str,
        dedupe_key: Callable[[RequestT], str],
        retry_on_error: Callable[[Exception], bool] | None,
        events: RequestEvents,
        cache: RequestCache,
        storage: StorageLink | None = None,
        connectivity: Connectivity | None = None,
        offline_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.send = send
        self.name = name
        self.dedupe_key_fn = dedupe_key
        self.retry_on_error = retry_on_error
        self.events = events
        self.watched = events.watched
        self.cache = cache
        self.cache_by_default = bool(cache.cache_time or cache.stale_time)
        self.wall_clock: Callable[[], float] = time.time  # cache entry times; tests may replace it
        self.storage = storage
        self.persistent = storage is not None and storage.persistent
        self.connectivity = connectivity
        self.offline_on = offline_on
        # RetryPolicy per retry_time (the attempt limit is passed per request). Written without
        # the lock from worker threads: a lost or repeated insert only builds a policy again.
        self.policies: dict[float, RetryPolicy] = {}
        self.pool = WorkerPool(max_workers, name=name)
        # Attempts in flight at most: enough to keep every worker busy with the next one queued,
        # so a scheduling pass (a start() of a deep paused queue) hands the pool a few, not all.
        self.window = _WINDOW_PER_WORKER * max_workers
        # Request ids are f"{id_prefix}-{next(ids)}" (made by the dispatcher's add and by nothing else).
        self.id_prefix = os.urandom(4).hex()
        self.ids = itertools.count(1)
        self.clock: Callable[[], float] = time.monotonic  # ages for deduplicate_time; tests may replace it
        self.recorder: FaceRecorder | None = None  # set by the dispatcher when metrics are on
        self._init_state()
        _lifecycle.register(self)

    # -- intake --------------------------------------------------------------------------------

    def add(self, req: PendingRequest) -> RequestHandle[ResponseT]:
        """Queue ``req``, or join an ongoing duplicate; writes the storage (if any) on this thread.

        Dedupe decides before anything is stored: with a storage, ``req`` is reserved in
        the dedupe index while it is written, so a duplicate added meanwhile joins it and
        the storage only ever sees the request that is queued.
        """
        if req.cache is not None and req.cache[1] > 0:
            hit = self._from_cache(req)
            if hit is not None:
                return hit
        key = req.dedupe_key
        if key is not None:
            req.added_at = self.clock()
        future = req.future  # RequestFuture.own, inline: this is every add's path
        future._queue_key, future._request_id, future._owner = req.queue_key, req.request_id, self
        link = self.storage
        if key is None and link is None and req.mode != "cancelable" and "queue_change" not in self.watched:
            return self._add_to_intake(req)
        out = Outbox()
        with self.lock:
            if self.closing:
                raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")
            joined = None if key is None else self._join(req, out)
            if joined is None:
                if link is None:
                    self._insert(req, out)
                elif key is not None:
                    self.dedupe[key] = req  # reserved: joined, not stored again, while it is written
        if joined is None and link is not None:
            self._store_then_insert(req, link, out)
        self._dispatch(out)
        if joined is not None:
            return cast("RequestHandle[ResponseT]", joined)
        return RequestHandle(self, req.request_id, req.queue_key, req.future, False)

    def _add_to_intake(self, req: PendingRequest) -> RequestHandle[ResponseT]:
        """Queue ``req`` through ``intake``: by this thread if the lock is free, else by its holder as it
        releases it (:class:`~threaddispatch._request_scheduler.CarryingLock`). Never waits for the lock.

        For a request whose queueing decides nothing the caller sees (no dedupe, no storage, not
        cancelable, no ``queue_change`` listener): producers that meet each other no longer queue on
        the lock one by one (a convoy: measured, 4 producers and 8 workers spent 57-75 µs CPU per
        add in it, every worker asleep, against 11-23). Order is kept: ``intake`` is FIFO and every
        acquisition of the lock empties it before anything else. Raises DispatcherClosedError if
        the close refused it (it began before ``req`` was queued and has ended).
        """
        if self.closing:
            raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")
        self.intake.append(req)
        self._apply_finished()
        if self.closing:  # close began meanwhile: learn whether ``req`` was queued before it ended
            with self.lock:
                refused = req.queue is UNQUEUED
            if refused:
                raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")
        return RequestHandle(self, req.request_id, req.queue_key, req.future, False)

    def _store_then_insert(self, req: PendingRequest, link: StorageLink, out: Outbox) -> None:
        """Store ``req`` (no lock held; stored before it is visible), then queue it unless close began meanwhile."""
        try:
            link.keep(req)
        except BaseException as error:
            with self.lock:
                self._unreserve(req)
            # Callers that joined the reservation hold its Future: they learn why it failed.
            settle(req.future, "exception" if isinstance(error, Exception) else "cancel", error)
            raise
        with self.lock:
            closed = self.closing
            if closed or req.future.cancelled():  # a joined caller cancelled the Future meanwhile
                self._unreserve(req)
                queued = False
            else:
                self._insert(req, out)
                queued = True
        if not queued:
            link.forget([(req.queue_key, req.request_id)])
            settle(req.future, "cancel", None)
        if closed:
            raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")

    def _from_cache(self, req: PendingRequest) -> RequestHandle[ResponseT] | None:
        """A settled handle if the cache holds a fresh response for ``req``; reads the cache on this thread."""
        assert req.cache is not None
        if self.closing:
            raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")
        entry = self.cache.lookup(req.cache[0], self.wall_clock())
        if entry is None:
            return None
        with self.lock:
            self.cache_hits += 1
        if "cache" in self.watched:
            self.events.emit(_cache_event(req, entry, "hit"))
        req.future.set_result(entry.response)
        return RequestHandle(self, req.request_id, req.queue_key, req.future, False, cached=True)

    def restore(self) -> list[RequestHandle[ResponseT]]:
        """Queue what the storage holds, in order, without starting any of it (``flush`` does)."""
        assert self.storage is not None
        requests = self.storage.load(cast("Callable[[object], str]", self.dedupe_key_fn))
        now = self.clock()
        out = Outbox()
        with self.lock:
            for req in requests:
                req.added_at = now
                req.future.own(self, req.queue_key, req.request_id)
                self._insert(req, out, schedule=False)
        self._dispatch(out)
        return [RequestHandle(self, r.request_id, r.queue_key, r.future, False) for r in requests]

    # -- the timer thread ------------------------------------------------------------------------

    def _timer_loop(self) -> None:
        """The timer thread: :meth:`_tick` until it leaves, then close the loop an async probe made here."""
        try:
            while self._tick():
                pass
        finally:
            _invoke.close_thread_loop()

    def _tick(self) -> bool:
        """Release due retries or poll the connectivity probe, waiting for either; False: leave."""
        connectivity = self.connectivity
        out = Outbox()
        probe = False
        with self.lock:
            while True:
                next_retry = self.retries.next_due()
                if self.done or not (connectivity is not None or next_retry is not None):
                    if self.timer is threading.current_thread():
                        self.timer = None
                    return False
                now = time.monotonic()
                if next_retry is not None and next_retry <= now:
                    self._release_due(now, out)
                    break
                if connectivity is not None and self.next_poll <= now:
                    self.next_poll = now + connectivity.interval
                    probe = True
                    break
                due = math.inf if next_retry is None else next_retry
                if connectivity is not None:
                    due = min(due, self.next_poll)
                self.timer_wakeup.wait(due - now)
        self._dispatch(out)
        if probe:
            assert connectivity is not None
            online = connectivity.probe()  # user code: no lock held
            if online is not None and online != self.online:
                self.set_online(online)
        return True

    # -- attempts (worker threads) ---------------------------------------------------------------

    def run_attempt(self, req: PendingRequest, token: CancellationToken) -> None:
        """One send of ``req`` on a worker thread, and what follows from its outcome."""
        if token.cancelled:  # stopped or cancelled while it waited for a worker
            self._finish_attempt(req, token, None, None, ending=True)
            return
        if "loading" in self.watched:
            self.events.emit(RequestEvent("loading", req.queue_key, req.request_id, req.request, attempt=req.attempts))
        previous = getattr(_local, "core", None)
        _local.core = self
        recorder = self.recorder
        started = 0.0 if recorder is None else time.perf_counter()
        context = req.context
        try:
            if context is None:
                outcome = _invoke.call(self._send, req.request, token)  # never raises
            else:  # a copy: an attempt stopped but still running may be in the previous one
                outcome = context.copy().run(_invoke.call, self._send, req.request, token)
        finally:
            _local.core = previous
        error = outcome.error
        if recorder is not None:  # metrics on: one duration per attempt (a batch of one)
            recorder.send(1, started, error, req.queue_key)
        delay = None if error is None or token.cancelled else self._retry_delay(req, error)
        self._finish_attempt(req, token, outcome, delay, ending=True)

    def _send(self, request: object, token: CancellationToken) -> object:
        """Call ``send``; a coroutine it returns is awaited with its task attached to ``token``."""
        result = self.send(cast(RequestT, request), token)
        if isinstance(result, CoroutineType):  # inspect.iscoroutine, without its frame
            return watched(result, token)  # _invoke.call awaits it on this thread's loop
        return result

    def progress(
        self, req: PendingRequest, token: CancellationToken, loaded: float, total: float | None, direction: str
    ) -> None:
        """Emit a progress event for ``req`` if ``token`` is its running attempt's (``CancellationToken.progress``)."""
        name = "upload_progress" if direction == "upload" else "download_progress"
        if name not in self.watched:
            return
        with self.lock:
            if req.token is not token or req.state != RUNNING:
                return
            attempt = req.attempts
        self.events.emit(
            RequestEvent(name, req.queue_key, req.request_id, req.request, attempt=attempt, loaded=loaded, total=total)
        )

    def _retry_delay(self, req: PendingRequest, error: BaseException) -> float | None:
        """Seconds before the next attempt after ``error``, or None for no retry: ``RetryPolicy.next_delay``.

        A BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...) is final.
        """
        if not isinstance(error, Exception):
            return None
        policy = self.policies.get(req.retry_time)
        if policy is None:
            backoff = Constant(req.retry_time)
            if self.retry_on_error is None:
                policy = RetryPolicy(backoff=backoff)
            else:
                policy = RetryPolicy(backoff=backoff, retry_on=self._retry_on)
            if len(self.policies) < _MAX_POLICIES:
                self.policies[req.retry_time] = policy
        return policy.next_delay(req.failures + 1, error, max_attempts=req.retry + 1)

    def _retry_on(self, error: BaseException) -> bool:
        """``retry_on_error(error)``, awaited if async; anything it raises means "do not retry" (logged)."""
        assert self.retry_on_error is not None
        outcome = _invoke.call(self.retry_on_error, error)
        if outcome.error is not None:
            _log.error("%s: retry_on_error raised; the failure is final", self.name, exc_info=outcome.error)
            return False
        return bool(outcome.value)

    def _finish_attempt(
        self,
        req: PendingRequest,
        token: CancellationToken,
        outcome: _invoke.Outcome | None,
        delay: float | None,
        *,
        ending: bool = False,
    ) -> None:
        """Apply an ended (or never started: ``outcome`` None) attempt's outcome, then carry out what follows.

        ``ending``: called by the attempt's worker as its task ends (``run_attempt``): the first
        attempt this launches runs next on that worker (``WorkerPool.run_next``), no wake-up.
        """
        token._bind(None, None)
        self.finished.append((req, token, outcome, delay))
        self._apply_finished(ending)

    def _apply_finished(self, ending: bool = False) -> None:
        """Carry out what waits (ended attempts in ``finished``, requests in ``intake``) unless the lock is held.

        Held, the holder's release comes back here (:class:`CarryingLock`): anything appended before
        a failed try is seen by that release, so none is stranded. A caller carries at most
        :data:`_CARRY_ROUNDS` rounds (an ``add`` must return while other producers keep adding);
        what still waits then goes to a pool thread (:meth:`_carry_on`).
        """
        lock, finished, intake = self.lock, self.finished, self.intake
        out: Outbox | None = None
        rounds = 0
        # lock.pending() and lock.acquire(False), inline: this loop is every plain add's path.
        while (finished or intake or lock.outbox is not None) and lock._acquire(False):
            try:
                if intake:
                    self._absorb()
                taken, lock.outbox = lock.outbox, None
                if out is None:
                    out = taken if taken is not None else Outbox()
                elif taken is not None:
                    out.extend(taken)
                if finished:
                    self._settle_finished(out)
            finally:
                lock.release_only()  # this loop looks at what is pending again itself
            rounds += 1
            if rounds >= _CARRY_ROUNDS and lock.pending() and self._carry_on():
                break
        if out is not None:
            self._dispatch(out, ending)

    def _settle_finished(self, out: Outbox) -> None:
        """Apply every ended attempt in ``finished``; the lock is held."""
        finished = self.finished
        while finished:
            req, token, outcome, delay = finished.popleft()
            if outcome is None:
                self._settle_attempt(req, token, None, None, None, out)
            else:
                self._settle_attempt(req, token, outcome.value, outcome.error, delay, out)

    def _carry_on(self) -> bool:
        """Hand what still waits to a pool thread (at most one such task queued); False if the pool is closed."""
        if not self.carrying:
            self.carrying = True  # unlocked: a lost race only queues a second task, which finds less to do
            try:
                self.pool.run(self._carry_task)
            except DispatcherClosedError:
                self.carrying = False
                return False
        return True

    def _carry_task(self) -> None:
        self.carrying = False  # before carrying: what is left after this task's rounds queues another
        self._apply_finished()

    # -- after the lock --------------------------------------------------------------------------

    def _dispatch(self, out: Outbox, ending: bool = False) -> None:
        """Carry out what was decided under the lock. Never called with the lock held.

        ``ending``: on a worker whose attempt ended, returning once this is done (see ``_launch``).
        """
        if out.cached:
            self._save_responses(out.cached)  # before the Future settles: a caller that saw it sees the cache
        if out.unstore:
            assert self.storage is not None
            self.storage.forget(out.unstore)
        for event in out.events:
            self.events.emit(event)
        for future, how, value in out.settle:
            settle(future, how, value)
        if out.launch:
            self._launch(out.launch, ending)
        if out.closed:
            self.pool.shutdown(0)  # its idle threads leave now; close() joins them if it waits
            _lifecycle.unregister(self)

    def _save_responses(self, responses: list[tuple[PendingRequest, object]]) -> None:
        for req, response in responses:
            assert req.cache is not None
            entry = self.cache.save(req.cache, response, self.wall_clock())
            if entry is not None and "cache" in self.watched:
                self.events.emit(_cache_event(req, entry, "stored"))

    def _launch(self, launches: list[tuple[PendingRequest, CancellationToken]], ending: bool = False) -> None:
        """Hand attempts to the pool. Re-entered on one thread, it queues instead of recursing.

        ``ending`` (the caller is a worker about to return from its attempt): the first attempt
        goes to that worker (``run_next``: it runs it next, no thread woken for it and none put
        to sleep), the others to idle threads. Last in ``_dispatch``, after every event and
        done-callback, so nothing runs on that worker between the end of its attempt and this one.

        During the exit drain the pool runs work on the caller when it has no thread
        left; each finished attempt then launches the next from inside the previous
        one, so a long ``queued`` chain would otherwise recurse once per request.
        Before the exit drain the pool never runs work inline: no guard is needed.
        """
        if not _lifecycle.exiting():
            run = self.pool.run
            for index, (req, token) in enumerate(launches):
                try:
                    if ending and not index:
                        self.pool.run_next(self.run_attempt, req, token)
                    else:
                        run(self.run_attempt, req, token)  # run_attempt reports its own outcome
                except DispatcherClosedError:
                    self._launch_guarded(launches[index:])  # each failure may launch the next: guarded
                    return
            return
        self._launch_guarded(launches)

    def _launch_guarded(self, launches: list[tuple[PendingRequest, CancellationToken]]) -> None:
        pending: deque[tuple[PendingRequest, CancellationToken]] | None = getattr(_local, "launches", None)
        if pending is not None:
            pending.extend(launches)
            return
        _local.launches = pending = deque(launches)
        try:
            while pending:
                req, token = pending.popleft()
                try:
                    self.pool.run(self.run_attempt, req, token)  # run_attempt reports its own outcome
                except DispatcherClosedError:
                    token._cancel()  # close gave up on it (its timeout passed)
                    self._finish_attempt(req, token, None, None)
        finally:
            _local.launches = None

    # -- control -------------------------------------------------------------------------------

    def set_status(self, key: str, status: str) -> None:
        """``start``/``pause``/``stop`` a queue; stop also aborts its running requests (they stay queued)."""
        out = Outbox()
        with self.lock:
            queue = self._queue(key)
            if queue.status != status:
                queue.status = status
                if "queue_status" in self.watched:
                    out.events.append(RequestEvent("queue_status", key, status=cast(QueueStatus, status)))
            if status == QUEUE_STOPPED:
                for req in queue.requests.values():
                    if req.state == RUNNING:
                        self._abort(req, out)
                        self._set_state(req, WAITING)
            self._schedule(queue, out)
        self._dispatch(out)

    def stop_request(self, key: str, request_id: str, *, stop: bool) -> bool:
        """Stop one request (``stop``) or let a stopped one run again; returns whether it is queued."""
        out = Outbox()
        with self.lock:
            req = self._find(key, request_id)
            if req is None:
                return False
            if stop and req.state != STOPPED:
                if req.state == RUNNING:
                    self._abort(req, out)
                self._set_state(req, STOPPED)
                self._unreserve(req)  # a stopped request is not joined
            elif not stop and req.state == STOPPED:
                self._set_state(req, WAITING)
                if req.dedupe_key is not None and req.dedupe_key not in self.dedupe:
                    self.dedupe[req.dedupe_key] = req
            else:
                return True
            self._queue_changed(req, out)
            self._schedule(req.queue, out)
        self._dispatch(out)
        return True

    def delete(self, key: str, request_id: str) -> bool:
        """Cancel one request (token set if it runs, Future cancelled); returns whether it was queued."""
        out = Outbox()
        with self.lock:
            req = self._find(key, request_id)
            if req is None:
                return False
            self._cancel(req, out, "cancelled")
            self._schedule(req.queue, out)
        self._dispatch(out)
        return True

    def clear(self, key: str | None) -> int:
        """Cancel every request of one queue (or of all); returns how many."""
        out = Outbox()
        count = 0
        with self.lock:
            for queue in self._selected(key):
                for req in list(queue.requests.values()):
                    self._cancel(req, out, "cancelled")
                    count += 1
                self._schedule(queue, out)
        self._dispatch(out)
        return count

    def flush(self, key: str | None) -> int:
        """Start what may start in one queue (or in all); returns how many started."""
        out = Outbox()
        with self.lock:
            for queue in self._selected(key):
                self._schedule(queue, out)
        self._dispatch(out)
        return len(out.launch)

    def start_probe(self) -> None:
        """Start the timer thread that polls the connectivity probe (first poll at once)."""
        with self.lock:
            self._start_timer()

    def set_online(self, online: bool) -> None:
        """Go offline, or online (every queue is scheduled)."""
        out = Outbox()
        with self.lock:
            self.online = bool(online)
            if self.online:
                for queue in list(self.queues.values()):
                    self._schedule(queue, out)
        self._dispatch(out)

    # -- snapshots -------------------------------------------------------------------------------

    def stats(self, per_key: bool) -> dict[str, Any]:
        with self.lock:
            return self._stats(per_key)

    def get_queue(self, key: str) -> QueueSnapshot:
        with self.lock:
            queue = self.queues.get(key)
            if queue is None:
                return QueueSnapshot(key, STARTED, ())
            requests = tuple(r.snapshot() for r in queue.requests.values())
            return QueueSnapshot(key, cast(QueueStatus, queue.status), requests)

    def get_queue_keys(self) -> list[str]:
        with self.lock:
            return [k for k, q in self.queues.items() if q.requests or q.status != STARTED]

    def get_request(self, key: str, request_id: str) -> QueuedRequest | None:
        with self.lock:
            req = self._find(key, request_id)
            return None if req is None else req.snapshot()

    def running_requests(self, key: str | None) -> list[QueuedRequest]:
        with self.lock:
            return [r.snapshot() for q in self._selected(key) for r in q.requests.values() if r.state == RUNNING]

    # -- close, exit, fork -----------------------------------------------------------------------

    def stop_intake(self) -> None:
        """Refuse further adds; the close finishes once nothing runs (:meth:`close`). Never waits."""
        with self.lock:
            self.closing = True

    def collect(self) -> None:
        """The dispatcher's finalizer: stop intake; what can run still runs, then the threads leave.

        The collector may run it on a thread that holds the lock (a collection inside a
        locked section), so it never waits for the lock: when the lock is taken, a
        short-lived daemon thread ends the close instead. At exit the drain has the core.
        """
        self.closing = True  # unlocked write: any later _schedule finishes the close too
        if not _lifecycle.exiting() and not self._end_if_idle(blocking=False):
            threading.Thread(target=self._end_if_idle, name=f"threaddispatch-{self.name}-close", daemon=True).start()

    def _end_if_idle(self, blocking: bool = True) -> bool:
        """Finish the close if nothing runs nor waits for a retry; False (not ``blocking``) if the lock was not
        free, or if something waits to be carried out (ended attempts, added requests): the collector's
        thread carries out nothing (that runs user code), a close thread does."""
        if not self.lock.acquire(blocking):
            return False
        out = Outbox()
        try:
            if not self.done and not self.running and not self.retrying:
                self._finish(out, forced=False)
        finally:
            if blocking:
                self.lock.release()  # carries out what workers left meanwhile
            else:
                self.lock.release_only()
        self._dispatch(out)
        return blocking or not self.lock.pending()

    def close(self, deadline: float | None) -> bool:
        """Stop intake, drain what can run by ``deadline`` (monotonic), cancel the rest, stop the threads."""
        self.stop_intake()
        if getattr(_local, "core", None) is self:
            return False  # called from send: waiting for our own attempt would never end
        while True:
            out = Outbox()
            with self.lock:
                if self.done:
                    break
                now = time.monotonic()
                self._release_due(now, out)  # the timer may be missing (exit drain)
                if not self.done and not self.running and not self.retrying:
                    self._finish(out, forced=False)
                elif not out:
                    remaining = None if deadline is None else deadline - now
                    if remaining is not None and remaining <= 0:
                        self._finish(out, forced=True)
                    else:
                        due_in = self.retries.timeout(now)
                        if due_in is not None:
                            remaining = due_in if remaining is None else min(remaining, due_in)
                        self.done_changed.wait(remaining)
            self._dispatch(out)
        self._stop_threads(deadline)
        return self.clean

    def _stop_threads(self, deadline: float | None) -> None:
        """Join the pool and the timer by ``deadline``, then close the cache and the storage (errors logged)."""

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.pool.shutdown(left())
        with self.lock:
            timer = self.timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(left())
        try:
            self.cache.store.close()
        except Exception:  # noqa: BLE001 - closing must finish whatever the cache does
            _log.exception("%s: closing the response cache failed", self.name)
        if self.storage is not None:
            self.storage.close()

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        completed = self.completed
        self.close(deadline)
        return self.completed - completed, self.lost

    def _reset_after_fork(self) -> None:
        # The parent delivers its requests; the child starts with none (its pool resets itself)
        # but keeps the configuration: online flag and paused or stopped queues. Its ids get a
        # prefix of their own: the parent goes on counting from the same one.
        self.id_prefix = os.urandom(4).hex()
        closing, done, online = self.closing, self.done, self.online
        statuses = {key: queue.status for key, queue in self.queues.items() if queue.status != STARTED}
        self._init_state()
        self.closing, self.done, self.online = closing, done, online
        for key, status in statuses.items():
            self._queue(key).status = status


def _cache_event(req: PendingRequest, entry: CachedResponse, reason: str) -> RequestEvent:
    return RequestEvent(
        "cache", req.queue_key, req.request_id, req.request, entry.response, reason=reason, cache_key=entry.key
    )
