"""RequestDispatcher: keyed request queues with modes, deduplication, pause/stop/start, offline and retries.

The face of Hyper Fetch's Dispatcher on plain threads, and this module is only that
face: the public API, the validation of every argument, the docstrings. Every request
goes through the dispatcher, grouped by a queue key; ``send(request, token)`` runs on the
shared :class:`~threaddispatch._pool.WorkerPool` (``max_workers`` daemon threads named
``threaddispatch-<name>-<n>``).

What it stands on, one job per module:

- :mod:`threaddispatch._request_scheduler`: the queues' state and every decision on it
  (what may start, what an ended attempt, a stop or a close changes), under one lock.
- :mod:`threaddispatch._request_core`: the threads and the user code around it (the
  pool hand-off, the attempts, the retry timer and connectivity probe, close, exit, fork).
- :mod:`threaddispatch._request_records`: the request, queue, handle and Future records.
- :mod:`threaddispatch._request_events` (listeners), :mod:`threaddispatch._request_cache`
  (the response cache), :mod:`threaddispatch._request_persist` (the storage link),
  :mod:`threaddispatch._request_online` (the connectivity probe),
  :mod:`threaddispatch._request_token` (the attempt's token), :mod:`threaddispatch._request_keys`
  (default key functions), :mod:`threaddispatch._request_types` (the public value types).

The dispatcher holds the core and calls its listeners and cache objects directly
(``on``, ``get_cached``, ``invalidate``); intake and control go through the core, which
owns the lock. Closing is the shared :class:`~threaddispatch._lifecycle.Closing`.

User code is called through :mod:`threaddispatch._invoke`: ``send``, ``retry_on_error``,
``is_online``, ``on_initialization`` and ``on_update_storage`` may be ``async def`` (or
return an awaitable), awaited on the calling thread's private loop. An async send's task
is attached to its attempt's token, so stopping or cancelling the attempt cancels the
task. Whether a failure is retried, and after how long, is asked of a
:class:`~threaddispatch.backoff.RetryPolicy` equivalent to the request's
``retry``/``retry_time`` and the dispatcher's ``retry_on_error`` (``RetryPolicy.next_delay``,
the one retry decision). A BaseException from ``send`` (SystemExit, KeyboardInterrupt,
an ``asyncio.CancelledError`` it let out) fails the attempt like an error, never
retried, and never ends the worker. User code is never called with the core's lock held.

close: drains. It stops intake, lets every request that can run (its queue started,
the dispatcher online) finish, retries included, within its timeout; what is left
after that (requests in paused or stopped queues, requests held while offline, and,
at the timeout, running ones) is cancelled: tokens set, Futures cancelled. Requests
kept in a storage stay in it, so a dispatcher on the same storage re-queues them.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from threaddispatch import _invoke, _lifecycle
from threaddispatch._request_cache import CachedResponse, MemoryResponseCache, RequestCache, ResponseCache
from threaddispatch._request_core import Core
from threaddispatch._request_events import RequestEvents
from threaddispatch._request_keys import default_dedupe_key, default_queue_key
from threaddispatch._request_online import Connectivity, check_offline_on
from threaddispatch._request_records import PAUSED, QUEUE_STOPPED, STARTED, PendingRequest, RequestHandle
from threaddispatch._request_token import CancellationToken
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
from threaddispatch._validate import check_bool, check_int, check_seconds, check_text, check_wait, show
from threaddispatch.errors import ConfigurationError
from threaddispatch.metrics import Metrics, check_metrics

if TYPE_CHECKING:  # loaded only by a dispatcher given storage= (they import sqlite3 and datetime)
    from threaddispatch._request_persist import StorageLink
    from threaddispatch.request_storage import RequestStorage, StoredRequest

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


class RequestDispatcher(_lifecycle.Closing, Generic[RequestT, ResponseT]):
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

    Context: with ``carry_context=True``, ``add`` captures the caller's :mod:`contextvars`
    context (``copy_context()``, about 0.2 µs beside an ``add`` of ~10 µs) and every
    attempt of that request runs ``send`` in a copy of it, so a trace id or a logging
    context in a ContextVar (OpenTelemetry's current span included) reaches ``send``.
    It is not carried to what does not run for one caller: listeners (on the thread
    that caused the event), ``retry_on_error``, ``is_online``, the storage callbacks; nor
    to requests restored from a storage (their context did not survive the process).
    A deduplicated caller joins the request of the first one, in its context. Off by
    default: without it ``send`` runs in the worker thread's own context.

    ``metrics`` (a :class:`~threaddispatch.metrics.Metrics`; None: none) reads
    :meth:`stats` when it collects and times each attempt's ``send``.

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

    :meth:`close` (also on leaving a ``with`` block) stops intake, waits up to its
    ``timeout`` (None: no limit) for every request whose queue is started to finish while
    online, retries included, then cancels what is left (paused, stopped or offline
    requests; at the timeout, running ones too): tokens set, Futures cancelled; a storage
    keeps them for the next dispatcher. It returns within ``timeout`` even if ``send``
    hangs and ignores its token, and returns whether nothing had to be cancelled. Called
    from inside ``send`` it only stops intake and returns False. Idempotent.
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
        metrics: Metrics | None = None,
        carry_context: bool = False,
    ) -> None:
        for label, fn in (("send", send), ("queue_key", queue_key), ("dedupe_key", dedupe_key)):
            if not callable(fn):
                raise ConfigurationError(f"{label} must be callable, got {show(fn)}")
        for label, maybe in (
            ("retry_on_error", retry_on_error),
            ("on_initialization", on_initialization),
            ("on_update_storage", on_update_storage),
        ):
            if maybe is not None and not callable(maybe):
                raise ConfigurationError(f"{label} must be callable or None, got {show(maybe)}")
        checked_metrics = check_metrics(metrics)
        self._carry_context = check_bool("carry_context", carry_context)
        _check_storage(storage)
        name = "requests" if name is None else check_text("name", name)
        self.name = name
        self._queue_key = queue_key
        self._dedupe_key = dedupe_key
        # Checked with or without is_online (a bad value is a bug either way); a probe thread waits it out.
        check_wait("online_check_interval", online_check_interval, allow_zero=False)
        connectivity = None if is_online is None else Connectivity(is_online, online_check_interval, name)
        if cache is None:
            cache = _default_cache(storage)
        self._cache = RequestCache(
            cache,
            cast("Callable[[object], str]", dedupe_key if cache_key is None else cache_key),
            cache_time=cache_time,
            stale_time=stale_time,
            name=name,
        )
        self._events = RequestEvents()
        self._core: Core[RequestT, ResponseT] = Core(
            send,
            max_workers=max_workers,
            name=name,
            dedupe_key=dedupe_key,
            retry_on_error=retry_on_error,
            events=self._events,
            cache=self._cache,
            storage=None if storage is None else _storage_link(storage, on_update_storage, name),
            connectivity=connectivity,
            offline_on=check_offline_on(offline_on),
        )
        # An unreferenced dispatcher stops intake; what can run still runs, then its threads leave.
        # (The finalizer holds the core: a send or listener referring to this object keeps it
        # alive until close, which detaches the finalizer.)
        self._core.recorder = checked_metrics.bind(self)
        self._init_closing(self._core.collect)
        _lifecycle.register(self)  # for the fork reset of the close lock; held weakly
        restored: list[RequestHandle[ResponseT]] = []
        if storage is not None:
            try:
                restored = self._core.restore()
            except BaseException:
                self._core.close(time.monotonic())  # at once: nothing was added yet
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
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(MODES)}; got {show(mode)}")
        if retry.__class__ is not int or retry < 0:
            retry = check_int("retry", retry, 0)
        if retry_time.__class__ is not float or not 0.0 <= retry_time < math.inf:
            retry_time = check_seconds("retry_time", retry_time)  # the exact checks (and int seconds)
        if deduplicate_time is not None:
            deduplicate_time = check_seconds("deduplicate_time", deduplicate_time)
        if deduplicate is not False and deduplicate is not True:  # identity tests: no call on the hot path
            check_bool("deduplicate", deduplicate)
        if offline is not True and offline is not False:
            check_bool("offline", offline)
        if queue_key is None:
            queue_key = self._derived_key(request)
        elif queue_key.__class__ is not str or queue_key not in self._core.queues:  # a queued key was checked
            check_text("queue_key", queue_key)
        dedupe_key = None
        if deduplicate:
            key = self._dedupe_key(request)
            if not isinstance(key, str):
                raise ConfigurationError(f"the dedupe_key function returned {show(key)}; it must return a str")
            dedupe_key = (queue_key, key)
        core = self._core
        request_id = f"{core.id_prefix}-{next(core.ids)}"
        req = PendingRequest(
            request_id, queue_key, request, mode, dedupe_key, deduplicate_time, retry, retry_time, offline
        )
        if core.cache_by_default or not (cache_time is None and stale_time is None and cache_key is None):
            req.cache = self._cache.plan(request, cache_key, cache_time, stale_time)
        if self._carry_context:
            req.context = contextvars.copy_context()
        return core.add(req)

    def _derived_key(self, request: RequestT) -> str:
        """The constructor's ``queue_key(request)``, checked."""
        key = self._queue_key(request)
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"the queue_key function returned {show(key)}; it must return a non-empty str")
        return key

    # -- control ----------------------------------------------------------------------------

    def start(self, queue_key: str) -> None:
        """Start (resume) a queue: its waiting requests may run. Applies to a key with no requests yet too."""
        self._core.set_status(check_text("queue_key", queue_key), STARTED)

    def pause(self, queue_key: str) -> None:
        """Pause a queue: running requests finish, the others wait until :meth:`start`."""
        self._core.set_status(check_text("queue_key", queue_key), PAUSED)

    def stop(self, queue_key: str) -> None:
        """Stop a queue: running requests are cancelled (tokens set) and stay queued.

        Nothing starts until :meth:`start`; their Futures stay pending, and the
        requests are sent again after ``start``.
        """
        self._core.set_status(check_text("queue_key", queue_key), QUEUE_STOPPED)

    def start_request(self, queue_key: str, request_id: str) -> bool:
        """Let a stopped request run again (when its queue allows); returns whether it is queued.

        Raises ConfigurationError unless ``queue_key`` and ``request_id`` are non-empty str
        (a :class:`RequestHandle` is not its ``request_id``).
        """
        return self._core.stop_request(*_checked_ids(queue_key, request_id), stop=False)

    def stop_request(self, queue_key: str, request_id: str) -> bool:
        """Stop one request: cancelled if running, kept queued, not started until :meth:`start_request`.

        Its Future stays pending. Returns whether it is queued. Raises ConfigurationError
        for a bad ``queue_key`` or ``request_id``, as :meth:`start_request`.
        """
        return self._core.stop_request(*_checked_ids(queue_key, request_id), stop=True)

    def delete(self, queue_key: str, request_id: str) -> bool:
        """Remove a request: its token is set if it runs and its Future is cancelled; returns whether it was queued.

        Raises ConfigurationError for a bad ``queue_key`` or ``request_id``, as :meth:`start_request`.
        """
        return self._core.delete(*_checked_ids(queue_key, request_id))

    def clear_queue(self, queue_key: str) -> int:
        """Delete every request of a queue (as :meth:`delete`); returns how many. The queue's status stays."""
        return self._core.clear(check_text("queue_key", queue_key))

    def clear(self) -> int:
        """Delete every request of every queue; returns how many."""
        return self._core.clear(None)

    def flush_queue(self, queue_key: str) -> int:
        """Start what may start now in a queue; returns how many started.

        Scheduling already happens after every change; this is for parity with the
        seed's API and costs one pass over the queue.
        """
        return self._core.flush(check_text("queue_key", queue_key))

    def flush(self) -> int:
        """:meth:`flush_queue` for every queue; returns how many requests started."""
        return self._core.flush(None)

    def set_online(self, online: bool) -> None:
        """Go offline (nothing new starts) or online (every queue is flushed). ``online`` must be a bool."""
        self._core.set_online(check_bool("online", online))

    @property
    def online(self) -> bool:
        """Whether the dispatcher is online (it starts requests)."""
        return self._core.online

    # -- response cache ---------------------------------------------------------------------

    def get_cached(self, key: str) -> CachedResponse | None:
        """The cached response of cache key ``key`` (fresh or stale), or None. Reads the cache on this thread."""
        if not isinstance(key, str):
            raise ConfigurationError(f"key must be a str, got {show(key)}")
        return self._cache.get(key, self._core.wall_clock())

    def invalidate(self, key_or_prefix: str) -> int:
        """Drop the cache entry ``key_or_prefix`` and every entry whose key starts with it; returns how many.

        ``""`` empties the cache. Emits ``cache`` (reason ``"invalidated"``). Does not touch queued requests.
        """
        if not isinstance(key_or_prefix, str):
            raise ConfigurationError(f"key_or_prefix must be a str, got {show(key_or_prefix)}")
        count = self._cache.store.invalidate(key_or_prefix)
        if "cache" in self._events.watched:
            self._events.emit(RequestEvent("cache", "", reason="invalidated", cache_key=key_or_prefix, size=count))
        return count

    # -- inspection -------------------------------------------------------------------------

    def get_queue(self, queue_key: str) -> QueueSnapshot:
        """A snapshot of a queue: status and requests in order (an unknown key: started and empty).

        Raises ConfigurationError unless ``queue_key`` is a non-empty str.
        """
        return self._core.get_queue(check_text("queue_key", queue_key))

    def get_queue_keys(self) -> list[str]:
        """Keys of the queues that hold requests or are paused or stopped."""
        return self._core.get_queue_keys()

    def get_request(self, queue_key: str, request_id: str) -> QueuedRequest | None:
        """A snapshot of one queued request, or None if it is not (or no longer) queued.

        Raises ConfigurationError for a bad ``queue_key`` or ``request_id``, as :meth:`start_request`.
        """
        return self._core.get_request(*_checked_ids(queue_key, request_id))

    def running_requests(self, queue_key: str | None = None) -> list[QueuedRequest]:
        """Snapshots of the running requests, of one queue (a non-empty str) or of all (None)."""
        return self._core.running_requests(None if queue_key is None else check_text("queue_key", queue_key))

    def stats(self, *, per_key: bool = False) -> dict[str, Any]:
        """Counters and gauges, read at one instant (under the dispatcher's lock; kept as it works).

        Counters: added (requests queued, those restored from a storage included),
        delivered (settled with a response), failed (settled with a final error), retried
        (retries scheduled), cancelled (deleted, cleared, replaced by a ``cancelable`` add,
        or cancelled by close), deduplicated (adds that joined an ongoing request) and
        cache_hits (adds answered from the response cache; not counted in added).
        Gauges: pending (requests in queues, whatever their state), waiting, running
        (attempts handed to a worker and not ended), retrying, and queues (queue keys
        held). With ``per_key``, queue_depths maps each key that holds requests to how
        many (one step per key; the rest costs the same whatever the depth).
        """
        return self._core.stats(check_bool("per_key", per_key))

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
        held, before the request's Future is settled; their errors are logged. What follows an
        attempt (its ``response`` or ``error``, the Future settled, the next start) runs on its
        worker, or, when the worker found the dispatcher's lock held, on the thread that held
        it (an ``add``, a control call), as that thread releases it. Returns
        a function that unsubscribes (idempotent). Raises ConfigurationError for an
        unknown event.
        """
        return self._events.on(event, fn, queue_key, request_id)

    # -- lifecycle ----------------------------------------------------------------------------

    def _begin_close(self) -> None:
        self._core.stop_intake()

    def _finish_close(self, deadline: float | None) -> bool:
        return self._core.close(deadline)

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return 0, 0  # the core is registered itself and drains the requests

    def _reset_after_fork(self) -> None:
        """In a forked child: a fresh close lock (the core resets itself)."""
        self._reset_closing_after_fork()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("online" if self.online else "offline")
        return f"<RequestDispatcher {self.name!r} {state}>"


def _checked_ids(queue_key: object, request_id: object) -> tuple[str, str]:
    """``(queue_key, request_id)`` if both are non-empty str (``check_text``); else ConfigurationError naming it."""
    if isinstance(request_id, RequestHandle):  # the commonest slip: the handle add returned, not its id
        raise ConfigurationError(
            f"request_id must be a str, got the handle {show(request_id)}; "
            f"pass its request_id ({request_id.request_id!r})"
        )
    return check_text("queue_key", queue_key), check_text("request_id", request_id)


def _check_storage(storage: object) -> None:
    """ConfigurationError unless ``storage`` is None or a RequestStorage."""
    if storage is None:
        return
    from threaddispatch.request_storage import RequestStorage

    if not isinstance(storage, RequestStorage):
        raise ConfigurationError(f"storage must implement RequestStorage (or be None), got {show(storage)}")


def _default_cache(storage: RequestStorage | None) -> ResponseCache:
    """The response cache when none is given: a SQLiteRequestStorage's own (it persists), else one in memory."""
    if storage is not None:
        from threaddispatch.request_storage import SQLiteRequestStorage

        if isinstance(storage, SQLiteRequestStorage):
            return storage.response_cache()
    return MemoryResponseCache()


def _storage_link(
    storage: RequestStorage, on_update: Callable[[str, list[StoredRequest]], object] | None, name: str
) -> StorageLink:
    from threaddispatch._request_persist import StorageLink

    return StorageLink(storage, on_update, name)
