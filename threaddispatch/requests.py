"""RequestDispatcher: keyed request queues with modes, deduplication, pause/stop/start, offline and retries.

The face of Hyper Fetch's Dispatcher on plain threads. Every request goes through
the dispatcher, grouped by a queue key; ``send(request, token)`` runs on the shared
:class:`~threaddispatch._pool.WorkerPool` (``max_workers`` daemon threads named
``threaddispatch-<name>-<n>``).

Why there is no loop here (and no BatchEngine): this face schedules per-key queues,
it does not batch. Nothing becomes startable by itself except a retry coming due;
everything else that can let a request start is a call on this object or the end of
an attempt: ``add``, a completion, ``start``/``pause``/``stop`` (of a queue or one
request), ``delete``/``clear``, ``set_online``. Each of those calls the one scheduling
function, :meth:`_Core._schedule`, under the lock; it decides what may start and
marks it running, and the caller hands it to the pool after releasing the lock. A
thread looping over the queues would only re-discover what those calls already know.
The one thing that is due by time, a retry after ``retry_time``, is handled by one
lazily started daemon timer thread (``threaddispatch-<name>-timer``) that waits on the
retry :class:`~threaddispatch._timers.DelayQueue` (under the core's lock) and leaves
when it is empty. With an ``is_online`` probe the same thread also polls it
(:mod:`threaddispatch._request_online`) and stays until close.

User code is called through :mod:`threaddispatch._invoke`: ``send``, ``retry_on_error``,
``is_online``, ``on_initialization`` and ``on_update_storage`` may be ``async def`` (or
return an awaitable), awaited on the calling thread's private loop. An async send's task
is attached to its attempt's token, so stopping or cancelling the attempt cancels the
task (:mod:`threaddispatch._request_token`). Whether a failure is retried, and after how
long, is asked of a :class:`~threaddispatch.backoff.RetryPolicy` equivalent to the
request's ``retry``/``retry_time`` and the dispatcher's ``retry_on_error``
(``RetryPolicy.next_delay``, the one retry decision). A BaseException from ``send``
(SystemExit, KeyboardInterrupt, an ``asyncio.CancelledError`` it let out) fails the
attempt like an error, never retried, and never ends the worker.

Per-request extras live in their own modules: the request Future
(:mod:`threaddispatch._future`), the attempt's token and its progress reports
(:mod:`threaddispatch._request_token`), the response cache
(:mod:`threaddispatch._request_cache`).

Locking: ``_Core.lock`` guards every field of the core, of its queues and of its
requests (counters, states, the dedupe index, the retry queue). User code (``send``,
``retry_on_error``, the key functions, listeners, the storage, ``on_*`` callbacks and
Future callbacks) is only ever called with it released: work decided under the lock
is collected in an :class:`_Outbox` and carried out after it is released.

close: drains. It stops intake, lets every request that can run (its queue started,
the dispatcher online) finish, retries included, within its timeout; what is left
after that (requests in paused or stopped queues, requests held while offline, and,
at the timeout, running ones) is cancelled: tokens set, Futures cancelled. Requests
kept in a storage stay in it, so a dispatcher on the same storage re-queues them.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import InvalidStateError as FutureStateError
from types import CoroutineType, TracebackType
from typing import Any, Final, Generic, TypeVar, cast

from threaddispatch import _invoke, _lifecycle
from threaddispatch._future import LazyFuture
from threaddispatch._pool import WorkerPool
from threaddispatch._request_cache import CachedResponse, MemoryResponseCache, RequestCache, ResponseCache
from threaddispatch._request_keys import default_dedupe_key, default_queue_key
from threaddispatch._request_online import Connectivity, check_offline_on
from threaddispatch._request_token import CancellationToken, watched
from threaddispatch._request_types import (
    EVENTS,
    MODES,
    Mode,
    QueuedRequest,
    QueueSnapshot,
    QueueStatus,
    RequestEvent,
    RequestState,
)
from threaddispatch._timers import DelayQueue, TimerHandle
from threaddispatch._validate import check_seconds
from threaddispatch.backoff import Constant, RetryPolicy
from threaddispatch.errors import Cancel, ConfigurationError, DispatcherClosedError
from threaddispatch.events import EventEmitter
from threaddispatch.request_storage import RequestStorage, SQLiteRequestStorage, StoredRequest

__all__ = [
    "EVENTS",
    "MODES",
    "CachedResponse",
    "CancellationToken",
    "MemoryResponseCache",
    "Mode",
    "QueueSnapshot",
    "QueueStatus",
    "QueuedRequest",
    "RequestDispatcher",
    "RequestEvent",
    "RequestHandle",
    "RequestState",
    "ResponseCache",
    "default_dedupe_key",
    "default_queue_key",
]

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

_log = logging.getLogger("threaddispatch.requests")

# Request states (RequestState) plus "done" for a request no longer in its queue.
_WAITING: Final = "waiting"
_RUNNING: Final = "running"
_RETRYING: Final = "retrying"
_STOPPED: Final = "stopped"
_DONE: Final = "done"
_STARTED: Final = "started"
_PAUSED: Final = "paused"
_QUEUE_STOPPED: Final = "stopped"

_local = threading.local()
# The retry policies a core keeps, one per distinct retry_time, at most (more are built per failure).
_MAX_POLICIES = 64


class RequestHandle(Generic[ResponseT]):
    """What ``add`` returns: the request id, the Future of the response, and ``cancel()``.

    Callers deduplicated onto one request get handles with the same ``request_id``
    and the same ``future`` (``deduplicated`` is True for all but the first). A
    handle answered from the response cache has ``cached`` True and a settled Future.
    Thread-safe.
    """

    __slots__ = ("_core", "cached", "deduplicated", "future", "queue_key", "request_id")

    def __init__(
        self,
        core: _Core[Any, Any],
        request_id: str,
        queue_key: str,
        future: Future[ResponseT],
        deduplicated: bool,
        *,
        cached: bool = False,
    ) -> None:
        self._core = core
        self.request_id = request_id
        self.queue_key = queue_key
        self.future = future
        self.deduplicated = deduplicated
        self.cached = cached  # answered from the response cache: nothing was queued

    def cancel(self) -> bool:
        """Delete the request from its queue: its token is set if it runs, its Future is cancelled.

        Shared by every deduplicated caller (they share the call). Never blocks beyond
        the dispatcher's lock; returns whether the request was still queued.
        """
        return self._core.delete(self.queue_key, self.request_id)

    def __repr__(self) -> str:
        future = self.future
        state = "cancelled" if future.cancelled() else "done" if future.done() else "pending"
        return f"<RequestHandle {self.request_id} queue_key={self.queue_key!r} {state}>"


class _Request:
    """One queued request; every field is guarded by the core's lock."""

    __slots__ = (
        "added_at",
        "attempts",
        "cache",
        "dedupe_key",
        "deduplicate_time",
        "failures",
        "future",
        "inflight",
        "mode",
        "offline",
        "queue",
        "queue_key",
        "request",
        "request_id",
        "retry",
        "retry_handle",
        "retry_time",
        "state",
        "stored",
        "token",
    )

    def __init__(  # noqa: PLR0917 - positional: one per add
        self,
        request_id: str,
        queue_key: str,
        request: object,
        mode: str,
        dedupe_key: tuple[str, str] | None,
        deduplicate_time: float | None,
        retry: int,
        retry_time: float,
        offline: bool,
    ) -> None:
        self.request_id = request_id
        self.queue_key = queue_key
        self.queue = _UNQUEUED  # set when queued; kept after removal for a late attempt's counters
        self.request = request
        self.mode = mode
        self.dedupe_key = dedupe_key
        self.deduplicate_time = deduplicate_time
        self.retry = retry
        self.retry_time = retry_time
        self.offline = offline
        self.future = _RequestFuture()
        self.state = _DONE  # not in a queue yet
        self.token: CancellationToken | None = None  # the current (or last) attempt's
        self.inflight = False  # an attempt runs, or was cancelled and has not returned yet
        self.attempts = 0  # sends started
        self.failures = 0  # failed attempts counted against ``retry``
        self.retry_handle: TimerHandle[_Request] | None = None  # its entry in core.retries while retrying
        self.added_at = 0.0  # core.clock() at add, for deduplicate_time
        self.stored = False
        self.cache: tuple[str, float, float] | None = None  # (cache key, cache_time, stale_time) when cached


class _Queue:
    """One queue key's requests in order, its status and counters; guarded by the core's lock."""

    __slots__ = ("inflight", "key", "order", "queued", "requests", "status", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.requests: dict[str, _Request] = {}  # insertion order is queue order
        # The same requests in queue order, plus removed ("done") ones not dropped yet: the head
        # is popped when it leaves, the rest is compacted once removed entries outnumber the live
        # ones. Scheduling walks this, not the dict: a dict drained from the front keeps its holes
        # until it is resized, so walking it from the start costs one step per past removal.
        self.order: deque[_Request] = deque()
        self.status: str = _STARTED
        self.waiting = 0  # requests in state "waiting"
        self.queued = 0  # requests of mode "queued"
        self.inflight = 0  # attempts running, cancelled ones that have not returned included


_UNQUEUED = _Queue("")  # the queue of a request not queued yet


class _Outbox:
    """What was decided under the lock, carried out after it is released (where user code may run)."""

    __slots__ = ("cached", "closed", "events", "launch", "settle", "unstore")

    def __init__(self) -> None:
        self.launch: list[tuple[_Request, CancellationToken]] = []
        self.events: list[RequestEvent] = []
        self.settle: list[tuple[LazyFuture, str, Any]] = []
        self.unstore: list[tuple[str, str]] = []
        self.cached: list[tuple[_Request, object]] | None = None  # responses to cache (made when needed)
        self.closed = False

    def __bool__(self) -> bool:
        return bool(self.launch or self.events or self.settle or self.unstore or self.cached or self.closed)


class _RequestFuture(LazyFuture):
    """A request's Future: cancelling it (as its holder may) deletes the request from its queue.

    The dispatcher settles it through the base class's methods, so its own cancellations
    do not come back here. Its Condition is made only if something waits on it.
    """

    _owner: tuple[_Core[Any, Any], str, str] | None = None  # (core, queue key, request id)

    def cancel(self) -> bool:
        """Cancel the Future and delete its request (setting its token if it runs); see ``Future.cancel``."""
        cancelled = LazyFuture.cancel(self)
        owner = self._owner
        if cancelled and owner is not None:
            owner[0].delete(owner[1], owner[2])
        return cancelled


class _KeyFilter:
    """A listener subscribed by request id and queue key: passes only the key's events."""

    __slots__ = ("fn", "queue_key")

    def __init__(self, fn: Callable[[RequestEvent], object], queue_key: str) -> None:
        self.fn = fn
        self.queue_key = queue_key

    def __call__(self, event: RequestEvent) -> None:
        if event.queue_key == self.queue_key:
            self.fn(event)


def _check_key(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be a non-empty str, got {value!r}")
    return value


class _Core(Generic[RequestT, ResponseT]):
    """The dispatcher's state and logic. Worker and timer threads hold this, never the public object."""

    def __init__(
        self,
        send: Callable[[RequestT, CancellationToken], ResponseT],
        *,
        max_workers: int,
        name: str,
        storage: RequestStorage | None,
        queue_key: Callable[[RequestT], str],
        dedupe_key: Callable[[RequestT], str],
        retry_on_error: Callable[[Exception], bool] | None,
        on_update_storage: Callable[[str, list[StoredRequest]], object] | None,
        connectivity: Connectivity | None = None,
        offline_on: tuple[type[BaseException], ...] = (),
        cache: RequestCache | None = None,
    ) -> None:
        self.send = send
        self.cache = cache
        self.cache_by_default = cache is not None and bool(cache.cache_time or cache.stale_time)
        self.wall_clock: Callable[[], float] = time.time  # cache entry times; tests may replace it
        self.connectivity = connectivity
        self.offline_on = offline_on
        self.name = name
        self.storage = storage
        self.queue_key_fn = queue_key
        self.dedupe_key_fn = dedupe_key
        self.retry_on_error = retry_on_error
        self.on_update_storage = on_update_storage
        # RetryPolicy per retry_time (the attempt limit is passed per request). Written without
        # the lock from worker threads: a lost or repeated insert only builds a policy again.
        self.policies: dict[float, RetryPolicy] = {}
        self.pool = WorkerPool(max_workers, name=name)
        self.emitter = EventEmitter()
        self.id_prefix = secrets.token_hex(4)
        self.ids = itertools.count(1)
        self.clock: Callable[[], float] = time.monotonic  # ages for deduplicate_time; tests may replace it
        # Listener counts per event name (watched: any listener; filtered: by key or id), kept
        # under lock, read without it: events nobody listens to are not even built.
        self.watched: dict[str, int] = {}
        self.filtered: dict[str, int] = {}
        self._init_state()
        _lifecycle.register(self)

    def _init_state(self) -> None:
        # lock guards every field set here and every field of every _Queue and _Request.
        self.lock = threading.Lock()
        self.timer_wakeup = threading.Condition(self.lock)
        self.done_changed = threading.Condition(self.lock)
        self.queues: dict[str, _Queue] = {}
        self.dedupe: dict[tuple[str, str], _Request] = {}  # ongoing requests that may be joined
        self.retries: DelayQueue[_Request] = DelayQueue(self.timer_wakeup)  # exactly the requests "retrying"
        self.timer: threading.Thread | None = None
        self.next_poll = 0.0  # monotonic time the connectivity probe is due (with a connectivity)
        self.online = True
        self.closing = False  # intake stopped (the one field also written without lock: see begin_close)
        self.done = False  # nothing starts any more; what was left has been cancelled
        self.clean = True  # close cancelled nothing
        self.running = 0  # attempts in flight, all queues
        self.retrying = 0  # requests in state "retrying"
        self.completed = 0  # requests settled by their send (response or final error)
        self.lost = 0  # requests close cancelled that no storage keeps

    # -- intake -----------------------------------------------------------------------------

    def new_request(  # noqa: PLR0917 - positional: this runs once per add, and keywords cost
        self,
        request: RequestT,
        queue_key: str | None,
        mode: str,
        deduplicate: bool,
        deduplicate_time: float | None,
        retry: int,
        retry_time: float,
        offline: bool,
        cache_key: str | None,
        cache_time: float | None,
        stale_time: float | None,
    ) -> _Request:
        """Validate ``add``'s arguments and build the request; the key functions run here, unlocked."""
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if retry.__class__ is not int or retry < 0:
            raise ConfigurationError(f"retry must be an int >= 0, got {retry!r}")
        if retry_time.__class__ is not float or not 0.0 <= retry_time < math.inf:
            retry_time = check_seconds("retry_time", retry_time)  # the exact checks (and int seconds)
        if deduplicate_time is not None:
            deduplicate_time = check_seconds("deduplicate_time", deduplicate_time)
        if queue_key is None:
            derived = self.queue_key_fn(request)
            if not isinstance(derived, str) or not derived:
                raise ConfigurationError(f"the queue_key function returned {derived!r}; it must return a non-empty str")
            queue_key = derived
        else:
            _check_key("queue_key", queue_key)
        dedupe_key = None
        if deduplicate:
            key = self.dedupe_key_fn(request)
            if not isinstance(key, str):
                raise ConfigurationError(f"the dedupe_key function returned {key!r}; it must return a str")
            dedupe_key = (queue_key, key)
        plan = None
        if self.cache_by_default or not (cache_time is None and stale_time is None and cache_key is None):
            assert self.cache is not None
            plan = self.cache.plan(request, cache_key, cache_time, stale_time)
        request_id = f"{self.id_prefix}-{next(self.ids)}"
        req = _Request(
            request_id, queue_key, request, mode, dedupe_key, deduplicate_time, retry, retry_time, bool(offline)
        )
        req.cache = plan
        return req

    def add(self, req: _Request) -> RequestHandle[ResponseT]:
        """Queue ``req``, or join an ongoing duplicate; writes the storage (if any) on this thread."""
        if req.cache is not None and req.cache[1] > 0:
            hit = self._from_cache(req)
            if hit is not None:
                return hit
        out = _Outbox()
        if req.dedupe_key is not None:
            req.added_at = self.clock()
            with self.lock:
                if self.closing:
                    raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")
                joined = self._join(req, out)
            if joined is not None:
                self._dispatch(out)
                return joined
        if self.storage is not None:
            # Stored before it is visible: its removal, on completion, always comes after.
            self._store(req)
        req.future._owner = (self, req.queue_key, req.request_id)
        with self.lock:
            closed = self.closing
            joined = None
            if not closed:
                if req.dedupe_key is not None:
                    joined = self._join(req, out)  # a duplicate queued while we were storing
                if joined is None:
                    self._insert(req, out)
        if req.stored and (closed or joined is not None):
            self._unstore([(req.queue_key, req.request_id)])
        if closed:
            raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")
        self._dispatch(out)
        if joined is not None:
            return joined
        return RequestHandle(self, req.request_id, req.queue_key, req.future, False)

    def _from_cache(self, req: _Request) -> RequestHandle[ResponseT] | None:
        """A settled handle if the cache holds a fresh response for ``req``; reads the cache on this thread."""
        assert self.cache is not None and req.cache is not None
        if self.closing:
            raise DispatcherClosedError(f"RequestDispatcher {self.name!r} is closed")
        entry = self.cache.lookup(req.cache[0], self.wall_clock())
        if entry is None:
            return None
        if "cache" in self.watched:
            self._emit(self._cache_event(req, entry, "hit"))
        req.future.set_result(entry.response)
        return RequestHandle(self, req.request_id, req.queue_key, req.future, False, cached=True)

    @staticmethod
    def _cache_event(req: _Request, entry: CachedResponse, reason: str) -> RequestEvent:
        return RequestEvent(
            "cache", req.queue_key, req.request_id, req.request, entry.response, reason=reason, cache_key=entry.key
        )

    def get_cached(self, key: str) -> CachedResponse | None:
        """The cached entry of ``key``, fresh or stale, or None; store errors propagate."""
        if not isinstance(key, str):
            raise ConfigurationError(f"key must be a str, got {key!r}")
        return self._cache().get(key, self.wall_clock())

    def invalidate(self, prefix: str) -> int:
        """Drop the cache entries whose key starts with ``prefix``; emits ``cache`` (reason "invalidated")."""
        if not isinstance(prefix, str):
            raise ConfigurationError(f"key_or_prefix must be a str, got {prefix!r}")
        count = self._cache().store.invalidate(prefix)
        if "cache" in self.watched:
            self._emit(RequestEvent("cache", "", reason="invalidated", cache_key=prefix, size=count))
        return count

    def _cache(self) -> RequestCache:
        assert self.cache is not None  # the public dispatcher always makes one
        return self.cache

    def _join(self, req: _Request, out: _Outbox) -> RequestHandle[ResponseT] | None:
        """A handle on an ongoing duplicate of ``req`` if there is one to join; caller holds lock."""
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
        return RequestHandle(self, ongoing.request_id, req.queue_key, ongoing.future, True)

    def _store(self, req: _Request) -> None:
        storage = self.storage
        assert storage is not None
        storage.add(
            StoredRequest(
                request_id=req.request_id,
                queue_key=req.queue_key,
                request=req.request,
                mode=req.mode,
                deduplicate=req.dedupe_key is not None,
                deduplicate_time=req.deduplicate_time,
                retry=req.retry,
                retry_time=req.retry_time,
                offline=req.offline,
                created_at=time.time(),
            )
        )
        req.stored = True
        self._storage_updated({req.queue_key})

    def _insert(self, req: _Request, out: _Outbox, *, schedule: bool = True) -> None:
        """Put ``req`` at the end of its queue (a cancelable one first empties it); caller holds lock."""
        key = req.queue_key
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = _Queue(key)
        if req.mode == "cancelable":
            for other in list(queue.requests.values()):
                self._cancel(other, out, "cancelled", refilled=True)
        req.queue = queue
        queue.requests[req.request_id] = req
        queue.order.append(req)
        if self.timer is None and self.connectivity is not None:
            self._start_timer()  # a forked child's first request brings the probe back
        self._set_state(req, _WAITING)
        if req.mode == "queued":
            queue.queued += 1
        if req.dedupe_key is not None:
            self.dedupe[req.dedupe_key] = req
        if "queue_change" in self.watched:
            out.events.append(RequestEvent("queue_change", key, req.request_id, req.request, size=len(queue.requests)))
        if schedule:
            self._schedule(queue, out, req)

    def restore(self) -> list[RequestHandle[ResponseT]]:
        """Queue what the storage holds, in order, without starting any of it (``flush`` does)."""
        assert self.storage is not None
        entries = self.storage.load()
        requests: list[_Request] = []
        for entry in entries:
            if entry.mode not in MODES:
                _log.error("%s: stored request %s has unknown mode %r", self.name, entry.request_id, entry.mode)
                continue
            dedupe_key = None
            if entry.deduplicate:
                try:
                    dedupe_key = (entry.queue_key, self.dedupe_key_fn(cast(RequestT, entry.request)))
                except Exception:  # noqa: BLE001 - a key function failing on old data must not block the rest
                    _log.exception("%s: dedupe_key failed on stored request %s", self.name, entry.request_id)
            req = _Request(
                entry.request_id,
                entry.queue_key,
                entry.request,
                mode=entry.mode,
                dedupe_key=dedupe_key,
                deduplicate_time=entry.deduplicate_time,
                retry=entry.retry,
                retry_time=entry.retry_time,
                offline=entry.offline,
            )
            req.stored = True
            req.added_at = self.clock()
            req.future._owner = (self, req.queue_key, req.request_id)
            requests.append(req)
        out = _Outbox()
        with self.lock:
            for req in requests:
                self._insert(req, out, schedule=False)
        self._dispatch(out)
        return [RequestHandle(self, r.request_id, r.queue_key, r.future, False) for r in requests]

    # -- scheduling (all under lock) ---------------------------------------------------------

    def _set_state(self, req: _Request, state: str) -> None:
        """Change ``req``'s state and the counters that follow it; caller holds lock."""
        old = req.state
        if old == _WAITING:
            req.queue.waiting -= 1
        elif old == _RETRYING:
            self.retrying -= 1
            handle = req.retry_handle
            if handle is not None:  # stopped, deleted or closed while it waited: unschedule it
                req.retry_handle = None
                self.retries.cancel(handle)
        if state == _WAITING:
            req.queue.waiting += 1
        elif state == _RETRYING:
            self.retrying += 1
        req.state = state

    def _schedule(self, queue: _Queue, out: _Outbox, hint: _Request | None = None) -> None:
        """The scheduling function: start what may start in ``queue``, then tidy up; caller holds lock.

        Called after every state change. It marks what starts as running (so the
        decision holds once the lock is released) and leaves the hand-off to the pool
        to :meth:`_dispatch`. It also drops an empty, started, idle queue, and finishes
        a close once nothing runs and no retry is pending.
        """
        for req in self._startable(queue, hint):
            token = CancellationToken()
            token._bind(self, req)  # unbound when the attempt ends (the pair is a reference cycle)
            req.token = token
            self._set_state(req, _RUNNING)
            req.inflight = True
            req.attempts += 1
            queue.inflight += 1
            self.running += 1
            out.launch.append((req, token))
        if not (queue.requests or queue.inflight or queue.status != _STARTED) and self.queues.get(queue.key) is queue:
            del self.queues[queue.key]
        if self.closing and not self.done and not self.running and not self.retrying:
            self._finish(out, forced=False)

    def _startable(self, queue: _Queue, hint: _Request | None) -> Sequence[_Request]:
        """Which waiting requests of ``queue`` may start now, in queue order; caller holds lock.

        Nothing starts in a paused or stopped queue, while offline, or after close.
        ``concurrent`` and ``cancelable`` requests start at once. A ``queued`` request
        runs alone: it waits until nothing of its queue is in flight, and the requests
        behind it wait for it (retries included: a scheduled retry keeps its place).
        A request stopped on its own neither runs nor holds its place.
        """
        if self.done or not queue.waiting or queue.status != _STARTED or not self.online:
            return ()
        if hint is not None and queue.waiting == 1 and not queue.queued and hint.state == _WAITING:
            return (hint,)  # the common add: nothing else waits, no queued-mode request in the way
        ready: list[_Request] = []
        unseen = queue.waiting  # once every waiting request was seen, nothing further can start
        for req in queue.order:
            state = req.state
            if state == _DONE:
                continue
            if state == _WAITING:
                unseen -= 1
            if req.mode == "queued":
                if state == _STOPPED:
                    continue
                if state == _WAITING and not req.inflight and not queue.inflight and not ready:
                    ready.append(req)
                break
            if state == _WAITING and not req.inflight:
                ready.append(req)
            if not unseen:
                break
        return ready

    def _remove(self, req: _Request, out: _Outbox, reason: str, *, refilled: bool = False) -> None:
        """Take ``req`` out of its queue (the caller settles its Future); caller holds lock.

        ``refilled``: a request is about to take its place, so the queue does not drain.
        """
        queue = req.queue
        del queue.requests[req.request_id]
        self._set_state(req, _DONE)
        order = queue.order
        if order[0] is req:
            order.popleft()
            while order and order[0].state == _DONE:
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

    def _abort(self, req: _Request, out: _Outbox) -> None:
        """Set a running request's token and report the abort; caller holds lock."""
        if req.state == _RUNNING:
            assert req.token is not None
            req.token._cancel()
        if "abort" in self.watched:
            out.events.append(RequestEvent("abort", req.queue_key, req.request_id, req.request, attempt=req.attempts))

    def _cancel(self, req: _Request, out: _Outbox, reason: str, *, refilled: bool = False) -> None:
        """Abort ``req``, take it out of its queue and cancel its Future; caller holds lock."""
        self._abort(req, out)
        self._remove(req, out, reason, refilled=refilled)
        out.settle.append((req.future, "cancel", None))

    def _finish(self, out: _Outbox, *, forced: bool) -> None:
        """End the close: cancel what is left (storages keep it), stop the timer; caller holds lock."""
        self.done = True
        persistent = self.storage is not None and self.storage.persistent
        for queue in list(self.queues.values()):
            for req in list(queue.requests.values()):
                self._cancel(req, out, "closed")
                self.clean = False
                if not (req.stored and persistent):
                    self.lost += 1
        if forced:
            self.clean = False
        self.retries.clear()
        self.timer_wakeup.notify_all()
        self.done_changed.notify_all()
        out.closed = True

    def _push_retry(self, req: _Request, delay: float) -> None:
        """Schedule a retry of ``req`` in ``delay`` seconds (push wakes the timer if earliest); caller holds lock."""
        self._set_state(req, _RETRYING)
        handle = req.retry_handle = self.retries.push(req, delay)
        if self.closing and self.retries.next_due() == handle.due:
            self.done_changed.notify_all()  # close releases retries itself during the exit drain
        self._start_timer()

    def _start_timer(self) -> None:
        """Start the timer thread unless it runs (or the exit drain began); caller holds lock."""
        if self.timer is None and not self.done and not _lifecycle.exiting():
            thread = threading.Thread(target=self._timer_loop, name=f"threaddispatch-{self.name}-timer", daemon=True)
            self.timer = thread
            thread.start()

    def _release_due(self, now: float, out: _Outbox) -> None:
        """Make the retries due by ``now`` waiting again and schedule their queues; caller holds lock."""
        touched: dict[int, _Queue] = {}
        for req in self.retries.pop_due(now):  # all "retrying": leaving that state unschedules
            req.retry_handle = None
            self._set_state(req, _WAITING)
            touched[id(req.queue)] = req.queue
        for queue in touched.values():
            self._schedule(queue, out)

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
        out = _Outbox()
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

    # -- attempts (worker threads) -----------------------------------------------------------

    def run_attempt(self, req: _Request, token: CancellationToken) -> None:
        """One send of ``req`` on a worker thread, and what follows from its outcome."""
        if token.cancelled:  # stopped or cancelled while it waited for a worker
            self._finish_attempt(req, token, None, None, None)
            return
        if "loading" in self.watched:
            self._emit(RequestEvent("loading", req.queue_key, req.request_id, req.request, attempt=req.attempts))
        previous = getattr(_local, "core", None)
        _local.core = self
        try:
            outcome = _invoke.call(self._send, req.request, token)  # never raises
        finally:
            _local.core = previous
        error = outcome.error
        delay = None if error is None or token.cancelled else self._retry_delay(req, error)
        self._finish_attempt(req, token, outcome.value, error, delay)

    def _send(self, request: object, token: CancellationToken) -> object:
        """Call ``send``; a coroutine it returns is awaited with its task attached to ``token``."""
        result = self.send(cast(RequestT, request), token)
        if isinstance(result, CoroutineType):  # inspect.iscoroutine, without its frame
            return watched(result, token)  # _invoke.call awaits it on this thread's loop
        return result

    def progress(
        self, req: _Request, token: CancellationToken, loaded: float, total: float | None, direction: str
    ) -> None:
        """Emit a progress event for ``req`` if ``token`` is its running attempt's (``CancellationToken.progress``)."""
        name = "upload_progress" if direction == "upload" else "download_progress"
        if name not in self.watched:
            return
        with self.lock:
            if req.token is not token or req.state != _RUNNING:
                return
            attempt = req.attempts
        self._emit(
            RequestEvent(name, req.queue_key, req.request_id, req.request, attempt=attempt, loaded=loaded, total=total)
        )

    def _retry_delay(self, req: _Request, error: BaseException) -> float | None:
        """Seconds before the next attempt after ``error``, or None for no retry: ``RetryPolicy.next_delay``.

        A BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...) is final.
        """
        if not isinstance(error, Exception):
            return None
        return self._policy(req.retry_time).next_delay(req.failures + 1, error, max_attempts=req.retry + 1)

    def _policy(self, retry_time: float) -> RetryPolicy:
        """The policy for ``retry_time``: a constant backoff, ``retry_on_error`` as its predicate."""
        policy = self.policies.get(retry_time)
        if policy is None:
            backoff = Constant(retry_time)
            if self.retry_on_error is None:
                policy = RetryPolicy(backoff=backoff)
            else:
                policy = RetryPolicy(backoff=backoff, retry_on=self._retry_on)
            if len(self.policies) < _MAX_POLICIES:
                self.policies[retry_time] = policy
        return policy

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
        req: _Request,
        token: CancellationToken,
        response: object,
        error: BaseException | None,
        delay: float | None,
    ) -> None:
        token._bind(None, None)
        out = _Outbox()
        with self.lock:
            queue = req.queue
            req.inflight = False
            queue.inflight -= 1
            self.running -= 1
            if error is not None and self.offline_on and isinstance(error, self.offline_on) and not token.cancelled:
                self.online = False  # the connection is lost: until the probe or set_online brings it back
            if token.cancelled or req.token is not token or req.state != _RUNNING:
                # Stopped or cancelled while it ran: the outcome is dropped.
                if req.state == _RUNNING:
                    self._set_state(req, _WAITING)
            elif error is None:
                self.completed += 1
                if "response" in self.watched:
                    out.events.append(
                        RequestEvent("response", queue.key, req.request_id, req.request, response, attempt=req.attempts)
                    )
                self._remove(req, out, "resolved")
                if req.cache is not None:
                    out.cached = [(req, response)]
                out.settle.append((req.future, "result", response))
            elif req.offline and not self.online and not isinstance(error, Cancel):
                self._error_event(req, error, out, final=False)
                self._set_state(req, _WAITING)  # offline: it waits to be online; not a counted failure
            elif delay is not None:
                req.failures += 1
                self._error_event(req, error, out, final=False)
                if delay > 0:
                    self._push_retry(req, delay)
                else:
                    self._set_state(req, _WAITING)
            else:
                self.completed += 1
                self._error_event(req, error, out, final=True)
                self._remove(req, out, "failed")
                out.settle.append((req.future, "exception", error))
            self._schedule(queue, out)
        self._dispatch(out)

    def _error_event(self, req: _Request, error: BaseException, out: _Outbox, *, final: bool) -> None:
        if "error" in self.watched:
            out.events.append(
                RequestEvent(
                    "error", req.queue_key, req.request_id, req.request, error=error, attempt=req.attempts, final=final
                )
            )

    # -- after the lock ----------------------------------------------------------------------

    def _dispatch(self, out: _Outbox) -> None:
        """Carry out what was decided under the lock. Never called with the lock held."""
        if out.cached:
            self._save_responses(out.cached)  # before the Future settles: a caller that saw it sees the cache
        if out.unstore:
            self._unstore(out.unstore)
        for event in out.events:
            self._emit(event)
        for future, how, value in out.settle:
            try:
                if how == "result":
                    future.set_result(value)
                elif how == "exception":
                    future.set_exception(value)
                else:
                    LazyFuture.cancel(future)  # not _RequestFuture.cancel: the request is already removed
            except FutureStateError:
                pass  # its holder cancelled the Future meanwhile
        if out.launch:
            self._launch(out.launch)
        if out.closed:
            self.pool.shutdown(0)  # its idle threads leave now; close() joins them if it waits
            _lifecycle.unregister(self)

    def _save_responses(self, responses: list[tuple[_Request, object]]) -> None:
        cache = self._cache()
        for req, response in responses:
            assert req.cache is not None
            entry = cache.save(req.cache, response, self.wall_clock())
            if entry is not None and "cache" in self.watched:
                self._emit(self._cache_event(req, entry, "stored"))

    def _launch(self, launches: list[tuple[_Request, CancellationToken]]) -> None:
        """Hand attempts to the pool. Re-entered on one thread, it queues instead of recursing.

        During the exit drain the pool runs work on the caller when it has no thread
        left; each finished attempt then launches the next from inside the previous
        one, so a long ``queued`` chain would otherwise recurse once per request.
        Before the exit drain the pool never runs work inline: no guard is needed.
        """
        if not _lifecycle.exiting():
            run = self.pool.run
            for index, (req, token) in enumerate(launches):
                try:
                    run(self.run_attempt, req, token)  # run_attempt reports its own outcome
                except DispatcherClosedError:
                    self._launch_guarded(launches[index:])  # each failure may launch the next: guarded
                    return
            return
        self._launch_guarded(launches)

    def _launch_guarded(self, launches: list[tuple[_Request, CancellationToken]]) -> None:
        pending: deque[tuple[_Request, CancellationToken]] | None = getattr(_local, "launches", None)
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
                    self._finish_attempt(req, token, None, None, None)
        finally:
            _local.launches = None

    def _emit(self, event: RequestEvent) -> None:
        name = event.event
        self.emitter.emit(name, event)
        if name in self.filtered:
            self.emitter.emit(f"{name}\x1fq\x1f{event.queue_key}", event)
            if event.request_id is not None:
                self.emitter.emit(f"{name}\x1fr\x1f{event.request_id}", event)

    def _unstore(self, pairs: list[tuple[str, str]]) -> None:
        storage = self.storage
        assert storage is not None
        try:
            storage.remove([request_id for _key, request_id in pairs])
        except Exception:  # noqa: BLE001 - a failing storage must not break delivery; it is logged
            _log.exception("%s: removing %d settled request(s) from the storage failed", self.name, len(pairs))
        self._storage_updated({key for key, _id in pairs})

    def _storage_updated(self, keys: set[str]) -> None:
        callback = self.on_update_storage
        if callback is None:
            return
        assert self.storage is not None
        for key in keys:
            try:
                entries = self.storage.get_queue(key)
            except Exception:  # noqa: BLE001 - a failing storage must not break delivery; it is logged
                _log.exception("%s: reading queue %r from the storage failed", self.name, key)
                continue
            outcome = _invoke.call(callback, key, entries)  # never raises; async callbacks are awaited
            if outcome.error is not None:
                _log.error("%s: on_update_storage raised for queue %r", self.name, key, exc_info=outcome.error)

    # -- control ------------------------------------------------------------------------------

    def _queue(self, key: str) -> _Queue:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = _Queue(key)
        return queue

    def _find(self, key: str, request_id: str) -> _Request | None:
        queue = self.queues.get(key)
        return None if queue is None else queue.requests.get(request_id)

    def set_status(self, key: str, status: str) -> None:
        """``start``/``pause``/``stop`` a queue; stop also aborts its running requests (they stay queued)."""
        _check_key("queue_key", key)
        out = _Outbox()
        with self.lock:
            queue = self._queue(key)
            if queue.status != status:
                queue.status = status
                if "queue_status" in self.watched:
                    out.events.append(RequestEvent("queue_status", key, status=cast(QueueStatus, status)))
            if status == _QUEUE_STOPPED:
                for req in queue.requests.values():
                    if req.state == _RUNNING:
                        self._abort(req, out)
                        self._set_state(req, _WAITING)
            self._schedule(queue, out)
        self._dispatch(out)

    def stop_request(self, key: str, request_id: str) -> bool:
        out = _Outbox()
        with self.lock:
            req = self._find(key, request_id)
            if req is None:
                return False
            if req.state != _STOPPED:
                if req.state == _RUNNING:
                    self._abort(req, out)
                self._set_state(req, _STOPPED)
                if req.dedupe_key is not None and self.dedupe.get(req.dedupe_key) is req:
                    del self.dedupe[req.dedupe_key]  # a stopped request is not joined
                self._queue_changed(req, out)
                self._schedule(req.queue, out)
        self._dispatch(out)
        return True

    def start_request(self, key: str, request_id: str) -> bool:
        out = _Outbox()
        with self.lock:
            req = self._find(key, request_id)
            if req is None:
                return False
            if req.state == _STOPPED:
                self._set_state(req, _WAITING)
                if req.dedupe_key is not None and req.dedupe_key not in self.dedupe:
                    self.dedupe[req.dedupe_key] = req
                self._queue_changed(req, out)
                self._schedule(req.queue, out)
        self._dispatch(out)
        return True

    def _queue_changed(self, req: _Request, out: _Outbox) -> None:
        if "queue_change" in self.watched:
            out.events.append(
                RequestEvent("queue_change", req.queue_key, req.request_id, req.request, size=len(req.queue.requests))
            )

    def delete(self, key: str, request_id: str) -> bool:
        out = _Outbox()
        with self.lock:
            req = self._find(key, request_id)
            if req is None:
                return False
            self._cancel(req, out, "cancelled")
            self._schedule(req.queue, out)
        self._dispatch(out)
        return True

    def clear(self, key: str | None) -> int:
        out = _Outbox()
        count = 0
        with self.lock:
            queues = list(self.queues.values()) if key is None else [q for q in [self.queues.get(key)] if q]
            for queue in queues:
                for req in list(queue.requests.values()):
                    self._cancel(req, out, "cancelled")
                    count += 1
                self._schedule(queue, out)
        self._dispatch(out)
        return count

    def flush(self, key: str | None) -> int:
        out = _Outbox()
        with self.lock:
            queues = list(self.queues.values()) if key is None else [q for q in [self.queues.get(key)] if q]
            for queue in queues:
                self._schedule(queue, out)
        self._dispatch(out)
        return len(out.launch)

    def start_probe(self) -> None:
        """Start the timer thread that polls the connectivity probe (first poll at once)."""
        with self.lock:
            self._start_timer()

    def set_online(self, online: bool) -> None:
        out = _Outbox()
        with self.lock:
            self.online = bool(online)
            if self.online:
                for queue in list(self.queues.values()):
                    self._schedule(queue, out)
        self._dispatch(out)

    # -- snapshots -----------------------------------------------------------------------------

    @staticmethod
    def _snapshot(req: _Request) -> QueuedRequest:
        return QueuedRequest(
            request_id=req.request_id,
            queue_key=req.queue_key,
            request=req.request,
            mode=cast(Mode, req.mode),
            state=cast(RequestState, req.state),
            attempts=req.attempts,
            retry=req.retry,
            retry_time=req.retry_time,
            deduplicate=req.dedupe_key is not None,
            offline=req.offline,
            future=req.future,
        )

    def get_queue(self, key: str) -> QueueSnapshot:
        with self.lock:
            queue = self.queues.get(key)
            if queue is None:
                return QueueSnapshot(key, _STARTED, ())
            return QueueSnapshot(
                key, cast(QueueStatus, queue.status), tuple(self._snapshot(r) for r in queue.requests.values())
            )

    def get_queue_keys(self) -> list[str]:
        with self.lock:
            return [k for k, q in self.queues.items() if q.requests or q.status != _STARTED]

    def get_request(self, key: str, request_id: str) -> QueuedRequest | None:
        with self.lock:
            req = self._find(key, request_id)
            return None if req is None else self._snapshot(req)

    def running_requests(self, key: str | None) -> list[QueuedRequest]:
        with self.lock:
            queues = list(self.queues.values()) if key is None else [q for q in [self.queues.get(key)] if q]
            return [self._snapshot(r) for q in queues for r in q.requests.values() if r.state == _RUNNING]

    # -- events ---------------------------------------------------------------------------------

    def on(
        self, event: str, fn: Callable[[RequestEvent], object], queue_key: str | None, request_id: str | None
    ) -> Callable[[], None]:
        if event not in EVENTS:
            raise ConfigurationError(f"unknown event {event!r}; known events: {', '.join(sorted(EVENTS))}")
        if not callable(fn):
            raise ConfigurationError(f"listener must be callable, got {fn!r}")
        listener: Callable[[RequestEvent], object] = fn
        if request_id is not None:
            name = f"{event}\x1fr\x1f{_check_key('request_id', request_id)}"
            if queue_key is not None:
                listener = _KeyFilter(fn, _check_key("queue_key", queue_key))
        elif queue_key is not None:
            name = f"{event}\x1fq\x1f{_check_key('queue_key', queue_key)}"
        else:
            name = event
        filtered = name is not event
        self.emitter.on(name, listener)
        with self.lock:
            self.watched[event] = self.watched.get(event, 0) + 1
            if filtered:
                self.filtered[event] = self.filtered.get(event, 0) + 1
        subscribed = [True]

        def unsubscribe() -> None:
            with self.lock:
                if not subscribed[0]:
                    return
                subscribed[0] = False
                for counts, applies in ((self.watched, True), (self.filtered, filtered)):
                    if applies:
                        counts[event] -= 1
                        if not counts[event]:
                            del counts[event]
            self.emitter.off(name, listener)

        return unsubscribe

    # -- close, exit, fork --------------------------------------------------------------------

    def begin_close(self) -> None:
        """Stop intake; the close finishes when nothing runs. Returns at once; safe from a finalizer."""
        # A finalizer may run on a thread that holds the lock (a collection inside a locked
        # section): then only the flag is set, and the next _schedule finishes the close.
        self.closing = True
        if not self.lock.acquire(timeout=0.1):
            return
        out = _Outbox()
        try:
            if not self.done and not self.running and not self.retrying:
                self._finish(out, forced=False)
        finally:
            self.lock.release()
        self._dispatch(out)

    def close(self, timeout: float | None) -> bool:
        """Stop intake, drain what can run within ``timeout``, cancel the rest, stop the threads."""
        deadline = None if timeout is None else time.monotonic() + check_seconds("timeout", timeout)
        self.begin_close()
        if getattr(_local, "core", None) is self:
            return False  # called from send: waiting for our own attempt would never end
        while True:
            out = _Outbox()
            with self.lock:
                if self.done:
                    break
                now = time.monotonic()
                self._release_due(now, out)  # the timer may be missing (exit drain)
                if not out and not self.done:
                    remaining = None if deadline is None else deadline - now
                    if remaining is not None and remaining <= 0:
                        self._finish(out, forced=True)
                    else:
                        due_in = self.retries.timeout(now)
                        if due_in is not None:
                            remaining = due_in if remaining is None else min(remaining, due_in)
                        self.done_changed.wait(remaining)
            self._dispatch(out)

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        self.pool.shutdown(left())
        with self.lock:
            timer = self.timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(left())
        if self.cache is not None:
            try:
                self.cache.store.close()
            except Exception:  # noqa: BLE001 - closing must finish whatever the cache does
                _log.exception("%s: closing the response cache failed", self.name)
        if self.storage is not None:
            try:
                self.storage.close()
            except Exception:  # noqa: BLE001 - closing must finish whatever the storage does
                _log.exception("%s: closing the storage failed", self.name)
        return self.clean

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        completed = self.completed
        self.close(max(0.0, deadline - time.monotonic()))
        return self.completed - completed, self.lost

    def _reset_after_fork(self) -> None:
        # The parent delivers its requests; the child starts with none (its pool resets itself)
        # but keeps the configuration: online flag and paused or stopped queues.
        closing, done, online = self.closing, self.done, self.online
        statuses = {key: queue.status for key, queue in self.queues.items() if queue.status != _STARTED}
        self._init_state()
        self.closing, self.done, self.online = closing, done, online
        for key, status in statuses.items():
            self._queue(key).status = status


class RequestDispatcher(Generic[RequestT, ResponseT]):
    """Keyed request queues run on a pool of worker threads: modes, deduplication, control, offline, retries.

    ``send(request, token)`` runs on a worker thread (at most ``max_workers`` at once)
    and returns the response; ``token`` is a :class:`CancellationToken` that ``stop``
    and cancellation set. Requests are grouped by a queue key (``queue_key=``, default
    :func:`default_queue_key`); each queue can be started, paused or stopped.

    ``storage`` (default None: requests live in this object only) keeps queued
    requests: a dispatcher on a storage that holds some re-queues them at
    construction, calls ``on_initialization(dispatcher, handles)`` with their handles
    before any of them starts, then starts them. ``on_update_storage(queue_key,
    entries)`` is called after the storage content of a queue changed. The dispatcher
    owns its storage and closes it in :meth:`close`. ``retry_on_error(exc)`` decides
    whether a failed attempt is retried (default: every ``Exception``; ``Retry`` and
    ``Cancel`` raised by ``send`` force a retry or forbid one; a ``Retry`` whose delay is
    not a finite number >= 0 makes the failure final, logged). A BaseException from
    ``send`` (SystemExit, KeyboardInterrupt) fails the request, is never retried, and
    leaves the worker running. ``send`` and every callback may be ``async def``: it is
    awaited on the calling worker's private event loop, and stopping or cancelling the
    attempt cancels an async send's task there. ``dedupe_key``
    (default :func:`default_dedupe_key`) says which requests of a queue are the same call.

    Response cache: ``cache_time``/``stale_time`` (defaults for every ``add``; 0: no
    caching) and ``cache_key`` (default: the ``dedupe_key`` function) say what is cached
    and for how long; ``cache`` is the store (default: the SQLite storage's file when
    ``storage`` is a :class:`~threaddispatch.request_storage.SQLiteRequestStorage`, else
    memory). Connectivity: ``is_online()`` is polled every ``online_check_interval``
    seconds on the timer thread and sets :attr:`online`; a send failing with one of
    ``offline_on`` (exception classes) takes the dispatcher offline until then.

    Every method is thread-safe and returns without waiting for ``send``, except
    :meth:`close`. User code (``send``, listeners, key functions, callbacks, the
    storage) is never called with the dispatcher's lock held. Worker threads are
    daemons named ``threaddispatch-<name>-<n>``, the retry timer
    ``threaddispatch-<name>-timer``. A dispatcher nobody references any more is
    collected: intake stops, what can run still runs (handles keep their Futures),
    then its threads leave; a ``send`` or listener that refers to the dispatcher
    keeps it alive until :meth:`close`. Pending requests are drained at interpreter
    exit within ``threaddispatch.set_exit_timeout``; a forked child starts with no
    requests (the parent sends them) but keeps its queues' paused/stopped status.
    """

    def __init__(
        self,
        send: Callable[[RequestT, CancellationToken], ResponseT],
        *,
        max_workers: int = 8,
        storage: RequestStorage | None = None,
        queue_key: Callable[[RequestT], str] = default_queue_key,
        dedupe_key: Callable[[RequestT], str] = default_dedupe_key,
        retry_on_error: Callable[[Exception], bool] | None = None,
        on_initialization: Callable[[RequestDispatcher[RequestT, ResponseT], list[RequestHandle[ResponseT]]], object]
        | None = None,
        on_update_storage: Callable[[str, list[StoredRequest]], object] | None = None,
        is_online: Callable[[], object] | None = None,
        online_check_interval: float = 5.0,
        offline_on: tuple[type[BaseException], ...] = (),
        cache: ResponseCache | None = None,
        cache_key: Callable[[RequestT], str] | None = None,
        cache_time: float = 0.0,
        stale_time: float = 0.0,
        name: str | None = None,
    ) -> None:
        for label, fn in (("send", send), ("queue_key", queue_key), ("dedupe_key", dedupe_key)):
            if not callable(fn):
                raise ConfigurationError(f"{label} must be callable, got {fn!r}")
        for label, maybe in (
            ("retry_on_error", retry_on_error),
            ("on_initialization", on_initialization),
            ("on_update_storage", on_update_storage),
        ):
            if maybe is not None and not callable(maybe):
                raise ConfigurationError(f"{label} must be callable or None, got {maybe!r}")
        if storage is not None and not isinstance(storage, RequestStorage):
            raise ConfigurationError(f"storage must implement RequestStorage (or be None), got {storage!r}")
        if name is None:
            name = "requests"
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str, got {name!r}")
        self.name = name
        connectivity = None if is_online is None else Connectivity(is_online, online_check_interval, name)
        if cache is None:
            cache = storage.response_cache() if isinstance(storage, SQLiteRequestStorage) else MemoryResponseCache()
        request_cache = RequestCache(
            cache,
            cast("Callable[[object], str]", dedupe_key if cache_key is None else cache_key),
            cache_time=cache_time,
            stale_time=stale_time,
            name=name,
        )
        self._core: _Core[RequestT, ResponseT] = _Core(
            send,
            max_workers=max_workers,
            name=name,
            storage=storage,
            queue_key=queue_key,
            dedupe_key=dedupe_key,
            retry_on_error=retry_on_error,
            on_update_storage=on_update_storage,
            connectivity=connectivity,
            offline_on=check_offline_on(offline_on),
            cache=request_cache,
        )
        # An unreferenced dispatcher stops intake; what can run still runs, then its threads leave.
        # (The finalizer holds the core: a send or listener referring to this object keeps it
        # alive until close, which detaches the finalizer.)
        self._finalizer = weakref.finalize(self, self._core.begin_close)
        restored: list[RequestHandle[ResponseT]] = []
        if storage is not None:
            try:
                restored = self._core.restore()
            except BaseException:
                self._core.close(0)
                raise
        if on_initialization is not None:
            outcome = _invoke.call(on_initialization, self, restored)  # never raises; awaited if async
            if outcome.error is not None:  # contained: the requests still start
                _log.error("%s: on_initialization raised", name, exc_info=outcome.error)
        self._core.flush(None)
        if connectivity is not None:
            self._core.start_probe()

    # -- intake ---------------------------------------------------------------------------

    def add(
        self,
        request: RequestT,
        *,
        queue_key: str | None = None,
        mode: Mode = "concurrent",
        deduplicate: bool = False,
        deduplicate_time: float | None = None,
        retry: int = 0,
        retry_time: float = 0.5,
        offline: bool = True,
        cache_key: str | None = None,
        cache_time: float | None = None,
        stale_time: float | None = None,
    ) -> RequestHandle[ResponseT]:
        """Queue ``request`` and return its handle; ``send`` runs later on a worker thread.

        ``queue_key`` defaults to the constructor's ``queue_key(request)``. ``mode``:
        ``"concurrent"`` (starts at once), ``"queued"`` (one at a time per key, in
        order), ``"cancelable"`` (cancels every other request of the key first). With
        ``deduplicate``, a request of the same queue and dedupe key that is ongoing
        (queued, running or retrying; not stopped; added less than ``deduplicate_time``
        seconds ago if given) is joined instead: the handle has its id and Future and
        nothing new is sent. A failure is retried ``retry`` times, ``retry_time``
        seconds apart; while offline, a failure with ``offline=True`` waits in the
        queue instead. Does not wait for ``send``; with a storage, writes it on this
        thread. With ``cache_time`` > 0 (default: the constructor's), a fresh cached
        response for the request's cache key (``cache_key``, default the constructor's
        ``cache_key(request)``) answers it at once: the handle has ``cached`` True and a
        settled Future, nothing is queued. A response is cached for ``cache_time`` seconds,
        then kept stale ``stale_time`` seconds more. Raises ConfigurationError for a bad
        argument, PayloadError if a persistent storage cannot keep the request,
        DispatcherClosedError after close.
        """
        core = self._core
        return core.add(
            core.new_request(
                request,
                queue_key,
                mode,
                deduplicate,
                deduplicate_time,
                retry,
                retry_time,
                offline,
                cache_key,
                cache_time,
                stale_time,
            )
        )

    # -- control ----------------------------------------------------------------------------

    def start(self, queue_key: str) -> None:
        """Start (resume) a queue: its waiting requests may run. Applies to a key with no requests yet too."""
        self._core.set_status(queue_key, _STARTED)

    def pause(self, queue_key: str) -> None:
        """Pause a queue: running requests finish, the others wait until :meth:`start`."""
        self._core.set_status(queue_key, _PAUSED)

    def stop(self, queue_key: str) -> None:
        """Stop a queue: running requests are cancelled (tokens set) and stay queued.

        Nothing starts until :meth:`start`; their Futures stay pending, and the
        requests are sent again after ``start``.
        """
        self._core.set_status(queue_key, _QUEUE_STOPPED)

    def start_request(self, queue_key: str, request_id: str) -> bool:
        """Let a stopped request run again (when its queue allows); returns whether it is queued."""
        return self._core.start_request(queue_key, request_id)

    def stop_request(self, queue_key: str, request_id: str) -> bool:
        """Stop one request: cancelled if running, kept queued, not started until :meth:`start_request`.

        Its Future stays pending. Returns whether it is queued.
        """
        return self._core.stop_request(queue_key, request_id)

    def delete(self, queue_key: str, request_id: str) -> bool:
        """Remove a request: its token is set if it runs and its Future is cancelled; returns whether it was queued."""
        return self._core.delete(queue_key, request_id)

    def clear_queue(self, queue_key: str) -> int:
        """Delete every request of a queue (as :meth:`delete`); returns how many. The queue's status stays."""
        return self._core.clear(_check_key("queue_key", queue_key))

    def clear(self) -> int:
        """Delete every request of every queue; returns how many."""
        return self._core.clear(None)

    def flush_queue(self, queue_key: str) -> int:
        """Start what may start now in a queue; returns how many started.

        Scheduling already happens after every change; this is for parity with the
        seed's API and costs one pass over the queue.
        """
        return self._core.flush(_check_key("queue_key", queue_key))

    def flush(self) -> int:
        """:meth:`flush_queue` for every queue; returns how many requests started."""
        return self._core.flush(None)

    def set_online(self, online: bool) -> None:
        """Go offline (nothing new starts) or online (every queue is flushed)."""
        self._core.set_online(online)

    @property
    def online(self) -> bool:
        """Whether the dispatcher is online (it starts requests)."""
        return self._core.online

    # -- response cache ---------------------------------------------------------------------

    def get_cached(self, key: str) -> CachedResponse | None:
        """The cached response of cache key ``key`` (fresh or stale), or None. Reads the cache on this thread."""
        return self._core.get_cached(key)

    def invalidate(self, key_or_prefix: str) -> int:
        """Drop the cache entry ``key_or_prefix`` and every entry whose key starts with it; returns how many.

        ``""`` empties the cache. Emits ``cache`` (reason ``"invalidated"``). Does not touch queued requests.
        """
        return self._core.invalidate(key_or_prefix)

    # -- inspection -------------------------------------------------------------------------

    def get_queue(self, queue_key: str) -> QueueSnapshot:
        """A snapshot of a queue: status and requests in order (an unknown key: started and empty)."""
        return self._core.get_queue(queue_key)

    def get_queue_keys(self) -> list[str]:
        """Keys of the queues that hold requests or are paused or stopped."""
        return self._core.get_queue_keys()

    def get_request(self, queue_key: str, request_id: str) -> QueuedRequest | None:
        """A snapshot of one queued request, or None if it is not (or no longer) queued."""
        return self._core.get_request(queue_key, request_id)

    def running_requests(self, queue_key: str | None = None) -> list[QueuedRequest]:
        """Snapshots of the running requests, of one queue or of all."""
        return self._core.running_requests(queue_key)

    # -- events -------------------------------------------------------------------------------

    def on(
        self,
        event: str,
        fn: Callable[[RequestEvent], object],
        *,
        queue_key: str | None = None,
        request_id: str | None = None,
    ) -> Callable[[], None]:
        """Call ``fn(RequestEvent)`` on ``event``, for every request or only one queue key / request id.

        Events: ``loading`` (a send starts; on the worker), ``response``, ``error``
        (every failed attempt; ``final`` tells whether it settled the Future),
        ``abort`` (a running attempt stopped, or a request cancelled), ``deduplicated``
        (a caller joined a request), ``remove`` (a request left its queue),
        ``queue_change``, ``queue_status`` and ``drained`` (a queue became empty, once
        each time), ``upload_progress``/``download_progress`` (``token.progress`` in
        ``send``), ``cache`` (stored, hit, invalidated). Listeners run on the thread that caused the event, with no lock
        held, before the request's Future is settled; their errors are logged. Returns
        a function that unsubscribes (idempotent). Raises ConfigurationError for an
        unknown event.
        """
        return self._core.on(event, fn, queue_key, request_id)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> bool:
        """Stop intake, let what can run finish, cancel the rest, stop the threads. Idempotent.

        Waits, up to ``timeout`` seconds (None: no limit), for every request whose queue
        is started to finish while online, retries included. Then what is left
        (paused, stopped or offline requests; at the timeout, running ones too) is
        cancelled: tokens set, Futures cancelled; a storage keeps it for the next
        dispatcher. Returns within ``timeout`` even if ``send`` hangs and ignores its
        token. Returns whether nothing had to be cancelled. Called from inside ``send``
        it only stops intake and returns False.
        """
        self._finalizer.detach()
        return self._core.close(timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the dispatcher was collected)."""
        return self._core.closing

    def __enter__(self) -> RequestDispatcher[RequestT, ResponseT]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("online" if self.online else "offline")
        return f"<RequestDispatcher {self.name!r} {state}>"
