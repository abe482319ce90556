"""RequestDispatcher's scheduler: the queues' state and every decision taken on it, all under one lock.

:class:`Scheduler` is the state machine of the dispatcher: which requests are queued,
in which state, which may start, what a finished attempt, a stop or a close changes.
Every method here is called with ``lock`` held, never calls user code, never waits and
never releases the lock: what it decides that must happen outside the lock (hand an
attempt to the pool, emit an event, settle a Future, touch the storage or the cache) is
appended to an :class:`~threaddispatch._request_records.Outbox`, which the caller
(:class:`~threaddispatch._request_core.Core`, the subclass that owns the threads) carries
out after releasing the lock.

The one scheduling function is :meth:`Scheduler._schedule`: every change that can let a
request start calls it (an add, a completion, a status change, a retry coming due,
going online), so no thread has to loop over the queues to find startable work.

Locking: ``lock`` guards every field set in :meth:`Scheduler._init_state` and every
field of every queue and request; ``timer_wakeup`` and ``done_changed`` are conditions
on it. ``closing`` is also written without it, once, by a finalizer (see the core).
``finished`` and ``intake`` are the two exceptions, both appended to without the lock and
emptied only under it. Worker threads append ended attempts to ``finished``
(:meth:`~threaddispatch._request_core.Core._finish_attempt`); a worker that finds the lock
held leaves its attempt there and goes back to work: every release of ``lock`` (a
:class:`CarryingLock`) then checks ``finished``, so the thread that held it carries the
attempt out. With the lock busy (workers ending attempts while producers add), the workers
no longer queue on it one by one: measured, a producer's ``add`` with 8 workers running
cost 23 µs CPU and 68 µs wall, against 6.6 and 10. Producers append plain requests to
``intake`` (:meth:`~threaddispatch._request_core.Core._add_to_intake`) and never wait for
the lock either: every acquisition of ``lock`` first queues what ``intake`` holds
(:meth:`Scheduler._absorb`), so whoever holds the lock sees every request added before it
took it, in the order they were added.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from threaddispatch import _lifecycle
from threaddispatch._request_online import Connectivity
from threaddispatch._request_records import (
    DONE,
    RETRYING,
    RUNNING,
    STARTED,
    STOPPED,
    WAITING,
    KeyQueue,
    Outbox,
    PendingRequest,
    RequestHandle,
)
from threaddispatch._request_token import CancellationToken
from threaddispatch._request_types import RequestEvent
from threaddispatch._timers import DelayQueue
from threaddispatch.errors import Cancel

__all__ = ["CarryingLock", "Scheduler"]

#: An ended attempt waiting in ``finished``: the request, its token, its outcome (None: never
#: started) and the retry delay decided on the worker (None: no retry).
Finished = tuple[PendingRequest, CancellationToken, Any, "float | None"]


class CarryingLock:
    """The scheduler's lock: a ``threading.Lock`` that takes in ``intake`` as it is acquired and carries
    out ``finished`` and what that intake decided as it is released.

    Every acquisition (``with``, :meth:`acquire`, a Condition's wait returning) first calls
    ``absorb`` (the scheduler's ``_absorb``: queues the requests producers left in
    ``intake``, deciding into ``outbox``), so whoever holds the lock sees every request
    added before it took it. Each release checks ``finished`` (the attempts workers left
    while it was held), ``intake`` and ``outbox`` and, when any is pending, calls ``carry``
    (the core's ``_apply_finished``) with the lock free. A Condition made on it works as
    on a Lock: its ``wait`` releases through :meth:`release` and re-acquires through
    :meth:`acquire`, so nothing left before a wait is stranded by it.
    """

    __slots__ = ("_acquire", "_release", "absorb", "carry", "finished", "intake", "locked", "outbox")

    def __init__(self, finished: deque[Finished], intake: deque[PendingRequest]) -> None:
        lock = threading.Lock()
        self._acquire = lock.acquire
        self.locked = lock.locked
        self._release = lock.release
        self.finished = finished
        self.intake = intake
        #: What absorbing ``intake`` decided, carried out after a release; guarded by the lock.
        self.outbox: Outbox | None = None
        self.absorb: Callable[[], None] | None = None  # set by the scheduler
        self.carry: Callable[[], None] | None = None  # set by the core

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (as ``threading.Lock.acquire``), then absorb ``intake``."""
        if not self._acquire(blocking, timeout):
            return False
        if self.intake and self.absorb is not None:
            self.absorb()
        return True

    def release(self) -> None:
        """Release the lock, then carry out what is pending (no lock held)."""
        self._release()
        if (self.finished or self.intake or self.outbox is not None) and self.carry is not None:
            self.carry()

    def release_only(self) -> None:
        """Release the lock without looking at what is pending (the caller looks itself)."""
        self._release()

    def pending(self) -> bool:
        """Whether anything waits to be carried out (read without the lock: a hint, re-checked under it)."""
        return bool(self.finished or self.intake) or self.outbox is not None

    # A Condition's wait releases and re-acquires through these (threading.Condition looks them up).
    def _release_save(self) -> None:
        self.release()

    def _acquire_restore(self, _state: None) -> None:
        self.acquire()

    def _is_owned(self) -> bool:
        return bool(self.locked())

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self._release()
        if (self.finished or self.intake or self.outbox is not None) and self.carry is not None:
            self.carry()


class Scheduler:
    """The dispatcher's state and its transitions. Not thread-safe by itself: every method needs ``lock`` held."""

    name: str
    watched: dict[str, int]  # listener counts per event name (see _request_events): read without lock
    connectivity: Connectivity | None
    offline_on: tuple[type[BaseException], ...]
    persistent: bool  # whether the storage keeps what close cancels
    window: int  # the most attempts in flight (handed to the pool, not ended), all queues together

    def _init_state(self) -> None:
        # Ended attempts left by workers that found the lock held (see the module docstring).
        self.finished: deque[Finished] = deque()
        # Requests added without taking the lock (``Core.add`` when it is held), oldest first:
        # appended by producers, emptied only under the lock, as it is acquired (``_absorb``).
        self.intake: deque[PendingRequest] = deque()
        self.lock = CarryingLock(self.finished, self.intake)
        self.lock.absorb = self._absorb
        self.lock.carry = self._apply_finished
        self.carrying = False  # a pool task carrying out what waits is queued (Core._carry_on)
        # A Condition uses only acquire/release of its lock (typeshed names the stdlib types only).
        lock = cast("threading.Lock", self.lock)
        self.timer_wakeup = threading.Condition(lock)
        self.done_changed = threading.Condition(lock)
        self.queues: dict[str, KeyQueue] = {}
        # Queues refused by a full window (``running == window``) that may have more to start, in
        # the order they were refused; served as attempts end. A queue is here at most once.
        self.held: OrderedDict[str, KeyQueue] = OrderedDict()
        # Ongoing requests that may be joined, by (queue key, dedupe key); with a storage, a
        # request is here from before it is stored (reserved), so a racing duplicate joins it.
        self.dedupe: dict[tuple[str, str], PendingRequest] = {}
        self.retries: DelayQueue[PendingRequest] = DelayQueue(self.timer_wakeup)  # exactly the "retrying" requests
        self.timer: threading.Thread | None = None
        self.next_poll = 0.0  # monotonic time the connectivity probe is due (with a connectivity)
        self.online = True
        self.closing = False  # intake stopped
        self.done = False  # nothing starts any more; what was left has been cancelled
        self.clean = True  # close cancelled nothing
        self.running = 0  # attempts in flight, all queues
        self.retrying = 0  # requests in state "retrying"
        self.completed = 0  # requests settled by their send (response or final error)
        self.lost = 0  # requests close cancelled that no storage keeps
        # stats(): counters (since construction, or since the fork in a child) and totals over all queues.
        self.added = 0  # requests queued (restored ones included)
        self.delivered = 0  # settled with a response
        self.failed = 0  # settled with a final error
        self.retried = 0  # retries scheduled (one per failed attempt that is retried)
        self.cancelled = 0  # requests removed by a delete, a clear, a cancelable add or the close
        self.deduplicated = 0  # adds that joined an ongoing request
        self.cache_hits = 0  # adds answered from the response cache
        self.pending = 0  # requests in queues (any state)
        self.waiting = 0  # requests in state "waiting"

    def delete(self, key: str, request_id: str) -> bool:
        raise NotImplementedError  # the core's: it carries out the outbox

    def _timer_loop(self) -> None:
        raise NotImplementedError  # the core's: the timer thread's body

    def _apply_finished(self) -> None:
        raise NotImplementedError  # the core's: applies ``finished`` and carries out what follows

    def progress(
        self, req: PendingRequest, token: CancellationToken, loaded: float, total: float | None, direction: str
    ) -> None:
        raise NotImplementedError  # the core's: a token bound here reports its progress through it

    # -- intake --------------------------------------------------------------------------------

    def _join(self, req: PendingRequest, out: Outbox) -> RequestHandle[object] | None:
        """A handle on an ongoing (or reserved) duplicate of ``req`` if there is one to join."""
        assert req.dedupe_key is not None
        ongoing = self.dedupe.get(req.dedupe_key)
        if ongoing is None:
            return None
        if req.deduplicate_time is not None and req.added_at - ongoing.added_at >= req.deduplicate_time:
            return None
        if "deduplicated" in self.watched:
            out.events.append(
                RequestEvent("deduplicated", req.queue_key, ongoing.request_id, req.request, attempt=ongoing.attempts)
            )
        self.deduplicated += 1
        return RequestHandle(self, ongoing.request_id, req.queue_key, ongoing.future, True)

    def _absorb(self) -> None:
        """Queue the requests in ``intake`` (as many as it holds now), in order, deciding into the lock's outbox.

        After the close ended (``done``) nothing is queued: a request found then is refused, its Future
        cancelled and ``queue`` left unset, and its ``add`` raises (it looks, see ``Core.add``).
        """
        intake, lock = self.intake, self.lock
        out = lock.outbox
        if out is None:
            out = lock.outbox = Outbox()
        for _ in range(len(intake)):
            req = intake.popleft()
            if self.done:
                out.settle.append((req.future, "cancel", None))
            else:
                self._insert(req, out)

    def _unreserve(self, req: PendingRequest) -> None:
        """Drop ``req`` from the dedupe index (it was reserved and is not queued after all)."""
        if req.dedupe_key is not None and self.dedupe.get(req.dedupe_key) is req:
            del self.dedupe[req.dedupe_key]

    def _insert(self, req: PendingRequest, out: Outbox, *, schedule: bool = True) -> None:
        """Put ``req`` at the end of its queue (a cancelable one first empties it)."""
        key = req.queue_key
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = KeyQueue(key)
        if req.mode == "cancelable":
            for other in list(queue.requests.values()):
                self._cancel(other, out, "cancelled", refilled=True)
        req.queue = queue
        queue.requests.add(req)
        queue.order.append(req)
        self.added += 1
        self.pending += 1
        if self.timer is None and self.connectivity is not None:
            self._start_timer()  # a forked child's first request brings the probe back
        self._set_state(req, WAITING)
        if req.mode == "queued":
            queue.queued += 1
        if req.dedupe_key is not None:
            self.dedupe[req.dedupe_key] = req
        if "queue_change" in self.watched:
            out.events.append(RequestEvent("queue_change", key, req.request_id, req.request, size=len(queue.requests)))
        if schedule:
            self._schedule(queue, out, req)

    # -- scheduling ----------------------------------------------------------------------------

    def _set_state(self, req: PendingRequest, state: str) -> None:
        """Change ``req``'s state and the counters that follow it."""
        old = req.state
        if old == WAITING:
            req.queue.waiting -= 1
            self.waiting -= 1
        elif old == RETRYING:
            self.retrying -= 1
            handle = req.retry_handle
            if handle is not None:  # stopped, deleted or closed while it waited: unschedule it
                req.retry_handle = None
                self.retries.cancel(handle)
        if state == WAITING:
            req.queue.waiting += 1
            self.waiting += 1
        elif state == RETRYING:
            self.retrying += 1
        req.state = state

    def _schedule(self, queue: KeyQueue, out: Outbox, hint: PendingRequest | None = None) -> None:
        """The scheduling function: start what may start in ``queue``, then tidy up.

        Called after every state change. It marks what starts as running (so the
        decision holds once the lock is released) and leaves the hand-off to the pool
        to the outbox. At most ``window`` attempts are in flight (all queues). A queue
        the full window refused waits in ``held``; while any queue waits there, one that
        was not refused joins the end of the line instead of starting, and the line is
        served once in-flight attempts fell to half the window (a refill of half a window
        at a time, not one hand-off per ended attempt), the free slots shared among the
        queues in line in the order they were refused. It also drops an empty, started,
        idle queue, and finishes a close once nothing runs and no retry is pending.
        """
        if self.held:
            if queue.waiting:
                self.held.setdefault(queue.key, queue)
            if self.running <= self.window >> 1:
                self._serve_held(out)
        else:
            self._start(queue, out, hint, self.window - self.running)
        self._tidy(queue, out)

    def _start(self, queue: KeyQueue, out: Outbox, hint: PendingRequest | None, room: int) -> None:
        """Start what may start in ``queue``, at most ``room``; hold the queue back if that cut it short."""
        if room <= 0:
            if queue.waiting:
                self.held.setdefault(queue.key, queue)
            return
        ready = self._startable(queue, hint, room)
        for req in ready:
            token = CancellationToken()
            token._bind(self, req)  # unbound when the attempt ends (the pair is a reference cycle)
            req.token = token
            self._set_state(req, RUNNING)
            req.inflight = True
            req.attempts += 1
            queue.inflight += 1
            self.running += 1
            out.launch.append((req, token))
        if len(ready) == room and queue.waiting:
            self.held.setdefault(queue.key, queue)  # maybe more could start: served when slots free

    def _serve_held(self, out: Outbox) -> None:
        """Share the free window among the held-back queues, longest held first (each may be held again)."""
        held = self.held
        while held and self.running < self.window:
            key, queue = held.popitem(last=False)
            if self.queues.get(key) is queue:
                free = self.window - self.running
                self._start(queue, out, None, max(1, free // (len(held) + 1)))
                self._tidy(queue, out)

    def _tidy(self, queue: KeyQueue, out: Outbox) -> None:
        """Drop ``queue`` if it is empty, started and idle; finish a close once nothing runs or waits to retry."""
        if not (queue.requests or queue.inflight or queue.status != STARTED) and self.queues.get(queue.key) is queue:
            del self.queues[queue.key]
            if self.held.get(queue.key) is queue:
                del self.held[queue.key]
        if self.closing and not self.done and not self.running and not self.retrying:
            self._finish(out, forced=False)

    def _startable(self, queue: KeyQueue, hint: PendingRequest | None, room: int) -> Sequence[PendingRequest]:
        """Which waiting requests of ``queue`` may start now, in queue order; at most ``room`` of them.

        Nothing starts in a paused or stopped queue, while offline, or after close.
        ``concurrent`` and ``cancelable`` requests start at once. A ``queued`` request
        runs alone: it waits until nothing of its queue is in flight, and the requests
        behind it wait for it (retries included: a scheduled retry keeps its place).
        A request stopped on its own neither runs nor holds its place.
        """
        if self.done or not queue.waiting or queue.status != STARTED or not self.online:
            return ()
        if hint is not None and queue.waiting == 1 and not queue.queued and hint.state == WAITING:
            return (hint,)  # the common add: nothing else waits, no queued-mode request in the way
        ready: list[PendingRequest] = []
        unseen = queue.waiting  # once every waiting request was seen, nothing further can start
        for req in queue.order:
            state = req.state
            if state == DONE:
                continue
            if state == WAITING:
                unseen -= 1
            if req.mode == "queued":
                if state == STOPPED:
                    continue
                if state == WAITING and not req.inflight and not queue.inflight and not ready:
                    ready.append(req)
                break
            if state == WAITING and not req.inflight:
                ready.append(req)
                if len(ready) == room:
                    break
            if not unseen:
                break
        return ready

    def _remove(self, req: PendingRequest, out: Outbox, reason: str, *, refilled: bool = False) -> None:
        """Take ``req`` out of its queue (the caller settles its Future).

        ``refilled``: a request is about to take its place, so the queue does not drain.
        """
        queue = req.queue
        queue.requests.remove(req)
        self.pending -= 1
        self._set_state(req, DONE)
        order = queue.order
        if order[0] is req:
            order.popleft()
            while order and order[0].state == DONE:
                order.popleft()
        elif len(order) > 2 * len(queue.requests) + 64:
            queue.order = deque(queue.requests.values())  # amortised: after as many removals as it copies
        if req.mode == "queued":
            queue.queued -= 1
        if req.dedupe_key is not None and self.dedupe.get(req.dedupe_key) is req:
            del self.dedupe[req.dedupe_key]
        if req.stored and reason != "closed":
            out.unstore.append((queue.key, req.request_id))
        watched = self.watched
        if "remove" in watched:
            out.events.append(
                RequestEvent("remove", queue.key, req.request_id, req.request, attempt=req.attempts, reason=reason)
            )
        if "queue_change" in watched:
            out.events.append(
                RequestEvent("queue_change", queue.key, req.request_id, req.request, size=len(queue.requests))
            )
        if not queue.requests and not refilled and "drained" in watched:
            out.events.append(RequestEvent("drained", queue.key))

    def _abort(self, req: PendingRequest, out: Outbox) -> None:
        """Set a running request's token and report the abort."""
        if req.state == RUNNING:
            assert req.token is not None
            req.token._cancel()
        if "abort" in self.watched:
            out.events.append(RequestEvent("abort", req.queue_key, req.request_id, req.request, attempt=req.attempts))

    def _cancel(self, req: PendingRequest, out: Outbox, reason: str, *, refilled: bool = False) -> None:
        """Abort ``req``, take it out of its queue and cancel its Future."""
        self._abort(req, out)
        self._remove(req, out, reason, refilled=refilled)
        self.cancelled += 1
        out.settle.append((req.future, "cancel", None))

    def _finish(self, out: Outbox, *, forced: bool) -> None:
        """End the close: cancel what is left (storages keep it), stop the timer."""
        self.done = True
        for queue in list(self.queues.values()):
            for req in list(queue.requests.values()):
                self._cancel(req, out, "closed")
                self.clean = False
                if not (req.stored and self.persistent):
                    self.lost += 1
        if forced:
            self.clean = False
        self.retries.clear()
        self.held.clear()
        self.timer_wakeup.notify_all()
        self.done_changed.notify_all()
        out.closed = True

    # -- retries and the timer -------------------------------------------------------------------

    def _push_retry(self, req: PendingRequest, delay: float) -> None:
        """Schedule a retry of ``req`` in ``delay`` seconds (push wakes the timer if it is the earliest)."""
        self._set_state(req, RETRYING)
        handle = req.retry_handle = self.retries.push(req, delay)
        if self.closing and self.retries.next_due() == handle.due:
            self.done_changed.notify_all()  # close releases retries itself during the exit drain
        self._start_timer()

    def _start_timer(self) -> None:
        """Start the timer thread unless it runs (or the exit drain began)."""
        if self.timer is None and not self.done and not _lifecycle.exiting():
            thread = threading.Thread(target=self._timer_loop, name=f"threaddispatch-{self.name}-timer", daemon=True)
            self.timer = thread
            thread.start()

    def _release_due(self, now: float, out: Outbox) -> None:
        """Make the retries due by ``now`` waiting again and schedule their queues."""
        touched: dict[int, KeyQueue] = {}
        for req in self.retries.pop_due(now):  # all "retrying": leaving that state unschedules
            req.retry_handle = None
            self._set_state(req, WAITING)
            touched[id(req.queue)] = req.queue
        for queue in touched.values():
            self._schedule(queue, out)

    # -- attempts ------------------------------------------------------------------------------

    def _settle_attempt(  # noqa: PLR0917 - positional: once per attempt
        self,
        req: PendingRequest,
        token: CancellationToken,
        response: object,
        error: BaseException | None,
        delay: float | None,
        out: Outbox,
    ) -> None:
        """Apply an ended attempt's outcome: response, retry after ``delay``, wait offline, or final failure."""
        queue = req.queue
        req.inflight = False
        queue.inflight -= 1
        self.running -= 1
        if error is not None and self.offline_on and isinstance(error, self.offline_on) and not token.cancelled:
            self.online = False  # the connection is lost: until the probe or set_online brings it back
        if token.cancelled or req.token is not token or req.state != RUNNING:
            # Stopped or cancelled while it ran: the outcome is dropped.
            if req.state == RUNNING:
                self._set_state(req, WAITING)
        elif error is None:
            self.completed += 1
            self.delivered += 1
            if "response" in self.watched:
                out.events.append(
                    RequestEvent("response", queue.key, req.request_id, req.request, response, attempt=req.attempts)
                )
            self._remove(req, out, "resolved")
            if req.cache is not None:
                if out.cached is None:
                    out.cached = []
                out.cached.append((req, response))
            out.settle.append((req.future, "result", response))
        elif req.offline and not self.online and not isinstance(error, Cancel):
            self._error_event(req, error, out, final=False)
            self._set_state(req, WAITING)  # offline: it waits to be online; not a counted failure
        elif delay is not None:
            req.failures += 1
            self.retried += 1
            self._error_event(req, error, out, final=False)
            if delay > 0:
                self._push_retry(req, delay)
            else:
                self._set_state(req, WAITING)
        else:
            self.completed += 1
            self.failed += 1
            self._error_event(req, error, out, final=True)
            self._remove(req, out, "failed")
            out.settle.append((req.future, "exception", error))
        self._schedule(queue, out)

    def _error_event(self, req: PendingRequest, error: BaseException, out: Outbox, *, final: bool) -> None:
        if "error" in self.watched:
            out.events.append(
                RequestEvent(
                    "error", req.queue_key, req.request_id, req.request, error=error, attempt=req.attempts, final=final
                )
            )

    # -- stats -----------------------------------------------------------------------------------

    def _stats(self, per_key: bool) -> dict[str, Any]:
        """The counters and totals, and with ``per_key`` each queue's depth (one step per queue)."""
        stats: dict[str, Any] = {
            "added": self.added,
            "delivered": self.delivered,
            "failed": self.failed,
            "retried": self.retried,
            "cancelled": self.cancelled,
            "deduplicated": self.deduplicated,
            "cache_hits": self.cache_hits,
            "pending": self.pending,
            "waiting": self.waiting,
            "running": self.running,
            "retrying": self.retrying,
            "queues": len(self.queues),
        }
        if per_key:
            stats["queue_depths"] = {key: len(queue.requests) for key, queue in self.queues.items() if queue.requests}
        return stats

    # -- control -------------------------------------------------------------------------------

    def _find(self, key: str, request_id: str) -> PendingRequest | None:
        queue = self.queues.get(key)
        return None if queue is None else queue.requests.get(request_id)

    def _queue(self, key: str) -> KeyQueue:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = KeyQueue(key)
        return queue

    def _selected(self, key: str | None) -> list[KeyQueue]:
        """Every queue (``key`` None) or the queue of ``key`` if it exists."""
        if key is None:
            return list(self.queues.values())
        queue = self.queues.get(key)
        return [] if queue is None else [queue]

    def _queue_changed(self, req: PendingRequest, out: Outbox) -> None:
        if "queue_change" in self.watched:
            out.events.append(
                RequestEvent("queue_change", req.queue_key, req.request_id, req.request, size=len(req.queue.requests))
            )
