"""RequestDispatcher's records: one request, one queue key's queue, the handle and Future a caller holds.

Plain data. Every field of a :class:`PendingRequest` and a :class:`KeyQueue` is guarded
by the scheduler core's lock (:mod:`threaddispatch._request_core`), which is the only
module that changes them; :class:`Outbox` carries what the core decided under that lock
to the code that runs after it is released. :class:`RequestHandle` and
:class:`RequestFuture` reach back to the core only through its ``delete``.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import InvalidStateError as FutureStateError
from typing import Any, Final, Generic, Protocol, TypeVar, cast

from threaddispatch._future import LazyFuture
from threaddispatch._request_token import CancellationToken
from threaddispatch._request_types import Mode, QueuedRequest, RequestEvent, RequestState
from threaddispatch._timers import TimerHandle

__all__ = [
    "DONE",
    "PAUSED",
    "QUEUE_STOPPED",
    "RETRYING",
    "RUNNING",
    "STARTED",
    "STOPPED",
    "WAITING",
    "KeyQueue",
    "Outbox",
    "PendingRequest",
    "RequestFuture",
    "RequestHandle",
    "RequestIndex",
    "settle",
]

ResponseT = TypeVar("ResponseT")

# Request states (RequestState) plus "done" for a request in no queue (not yet, or no longer).
WAITING: Final = "waiting"
RUNNING: Final = "running"
RETRYING: Final = "retrying"
STOPPED: Final = "stopped"
DONE: Final = "done"
# Queue statuses (QueueStatus).
STARTED: Final = "started"
PAUSED: Final = "paused"
QUEUE_STOPPED: Final = "stopped"


class _Deleter(Protocol):
    def delete(self, key: str, request_id: str) -> bool:
        """Delete the request from its queue (token set if it runs, Future cancelled); whether it was queued."""


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
        core: _Deleter,
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


class RequestFuture(LazyFuture):
    """A request's Future: cancelling it (as its holder may) deletes the request from its queue.

    The core settles it through the base class's methods, so its own cancellations
    do not come back here. Its Condition is made only if something waits on it.
    """

    # Set when it is queued (``own``): its core, queue key and request id. Three attributes, not
    # one tuple: a tuple would be one more object per pending request for the collector to track.
    _owner: _Deleter | None = None
    _queue_key: str = ""
    _request_id: str = ""

    def own(self, core: _Deleter, queue_key: str, request_id: str) -> None:
        """From now on, cancelling this Future deletes request ``request_id`` from ``core``'s queue ``queue_key``."""
        self._queue_key = queue_key
        self._request_id = request_id
        self._owner = core

    def cancel(self) -> bool:
        """Cancel the Future and delete its request (setting its token if it runs); see ``Future.cancel``."""
        cancelled = LazyFuture.cancel(self)
        owner = self._owner
        if cancelled and owner is not None:
            owner.delete(self._queue_key, self._request_id)
        return cancelled


class PendingRequest:
    """One request from ``add`` (or the storage) until it is settled; every field is guarded by the core's lock."""

    __slots__ = (
        "added_at",
        "attempts",
        "cache",
        "context",
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
        "shard",
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
        self.queue = UNQUEUED  # set when queued; kept after removal for a late attempt's counters
        self.request = request
        self.mode = mode
        self.dedupe_key = dedupe_key  # (queue key, dedupe key) when it may be joined
        self.deduplicate_time = deduplicate_time
        self.retry = retry
        self.retry_time = retry_time
        self.offline = offline
        self.future = RequestFuture()
        self.state = DONE  # not in a queue yet
        self.token: CancellationToken | None = None  # the current (or last) attempt's
        self.inflight = False  # an attempt runs, or was cancelled and has not returned yet
        self.attempts = 0  # sends started
        self.failures = 0  # failed attempts counted against ``retry``
        self.retry_handle: TimerHandle[PendingRequest] | None = None  # its entry in the core's retries while retrying
        self.added_at = 0.0  # the core's clock at add, for deduplicate_time
        self.stored = False
        self.cache: tuple[str, float, float] | None = None  # (cache key, cache_time, stale_time) when cached
        self.context: contextvars.Context | None = None  # the adder's, with carry_context (each attempt runs in a copy)
        self.shard: dict[str, PendingRequest] | None = None  # the dict of its queue's index that holds it, while queued

    def snapshot(self) -> QueuedRequest:
        """The public, immutable view of this request; caller holds the core's lock."""
        return QueuedRequest(
            request_id=self.request_id,
            queue_key=self.queue_key,
            request=self.request,
            mode=cast(Mode, self.mode),
            state=cast(RequestState, self.state),
            attempts=self.attempts,
            retry=self.retry,
            retry_time=self.retry_time,
            deduplicate=self.dedupe_key is not None,
            offline=self.offline,
            future=self.future,
        )


SHARD = 1 << 14  # requests per dict of a RequestIndex: the most entries one add can make a dict copy (~0.4 ms)


class RequestIndex:
    """One queue's requests by id, in queue order, in dicts of at most ``SHARD``: no add copies them all.

    A single dict resizes as it grows, and the add that crosses its threshold copies every
    entry (24 ms at 700k queued requests). Here new requests go to the ``_tail`` dict; at
    ``SHARD`` entries it is sealed (``_sealed``, oldest first) and a new tail begins, so a
    resize copies one shard at most (2/3 of ``SHARD`` entries). Each queued request knows
    its shard (``shard``), so removal is one dict delete; a lookup by id tries the tail,
    then each sealed shard (one per ``SHARD`` requests). A sealed shard that empties is
    dropped. Iteration is queue order: the sealed shards in order, then the tail, each in
    insertion order. Guarded by the core's lock, like the queue it belongs to.
    """

    __slots__ = ("_sealed", "_size", "_tail")

    def __init__(self) -> None:
        self._sealed: list[dict[str, PendingRequest]] = []
        self._tail: dict[str, PendingRequest] = {}
        self._size = 0

    def add(self, req: PendingRequest) -> None:
        """Put ``req`` at the end (its ``request_id`` must not be in the index)."""
        tail = self._tail
        if len(tail) >= SHARD:
            self._sealed.append(tail)
            tail = self._tail = {}
        tail[req.request_id] = req
        req.shard = tail
        self._size += 1

    def remove(self, req: PendingRequest) -> None:
        """Take ``req`` (which is in the index) out."""
        shard = req.shard
        assert shard is not None
        del shard[req.request_id]
        req.shard = None
        self._size -= 1
        if not shard and shard is not self._tail:
            sealed = self._sealed
            for i, other in enumerate(sealed):  # by identity (list.remove compares dicts by content)
                if other is shard:
                    del sealed[i]  # one step per shard, once per SHARD removals at most
                    break

    def get(self, request_id: str) -> PendingRequest | None:
        req = self._tail.get(request_id)
        if req is None:
            for shard in self._sealed:
                req = shard.get(request_id)
                if req is not None:
                    break
        return req

    def values(self) -> Iterator[PendingRequest]:
        """The requests in queue order; the index must not change while this is consumed."""
        for shard in self._sealed:
            yield from shard.values()
        yield from self._tail.values()

    def shards(self) -> int:
        return len(self._sealed) + 1

    def largest_shard(self) -> int:
        return max(len(shard) for shard in (*self._sealed, self._tail))

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0


class KeyQueue:
    """One queue key's requests in order, its status and counters; guarded by the core's lock."""

    __slots__ = ("inflight", "key", "order", "queued", "requests", "status", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.requests = RequestIndex()  # iteration order is queue order
        # The same requests in queue order, plus removed ("done") ones not dropped yet: the head
        # is popped when it leaves, the rest is compacted once removed entries outnumber the live
        # ones. Scheduling walks this, not the index: a dict drained from the front keeps its holes
        # until it is resized, so walking it from the start costs one step per past removal.
        self.order: deque[PendingRequest] = deque()
        self.status: str = STARTED
        self.waiting = 0  # requests in state "waiting"
        self.queued = 0  # requests of mode "queued"
        self.inflight = 0  # attempts running, cancelled ones that have not returned included


UNQUEUED: Final = KeyQueue("")  # the queue of a request not queued yet


class Outbox:
    """What was decided under the core's lock, carried out after it is released (where user code may run)."""

    __slots__ = ("cached", "closed", "events", "launch", "settle", "unstore")

    def __init__(self) -> None:
        self.launch: list[tuple[PendingRequest, CancellationToken]] = []
        self.events: list[RequestEvent] = []
        self.settle: list[tuple[LazyFuture, str, Any]] = []  # (future, "result" | "exception" | "cancel", value)
        self.unstore: list[tuple[str, str]] = []  # (queue key, request id) to remove from the storage
        self.cached: list[tuple[PendingRequest, object]] | None = None  # responses to cache (made when needed)
        self.closed = False  # the close finished: shut the pool down, leave the lifecycle registry

    def __bool__(self) -> bool:
        return bool(self.launch or self.events or self.settle or self.unstore or self.cached or self.closed)

    def extend(self, other: Outbox) -> None:
        """Append what ``other`` decided after what this one did."""
        self.launch += other.launch
        self.events += other.events
        self.settle += other.settle
        self.unstore += other.unstore
        if other.cached:
            self.cached = [*(self.cached or ()), *other.cached]
        self.closed = self.closed or other.closed


def settle(future: LazyFuture, how: str, value: Any) -> None:
    """Set ``future``'s result or exception, or cancel it (``how``); a Future its holder cancelled stays so."""
    try:
        if how == "result":
            future.set_result(value)
        elif how == "exception":
            future.set_exception(value)
        else:
            LazyFuture.cancel(future)  # not RequestFuture.cancel: the request is already removed
    except FutureStateError:
        pass  # its holder cancelled the Future meanwhile
