"""RequestDispatcher's public value types: modes, states, event names, and the event and snapshot records."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["EVENTS", "MODES", "Mode", "QueueSnapshot", "QueueStatus", "QueuedRequest", "RequestEvent", "RequestState"]

Mode = Literal["concurrent", "queued", "cancelable"]
MODES: tuple[str, ...] = ("concurrent", "queued", "cancelable")
QueueStatus = Literal["started", "paused", "stopped"]
RequestState = Literal["waiting", "running", "retrying", "stopped"]
EVENTS: frozenset[str] = frozenset(
    {
        "loading",
        "response",
        "error",
        "abort",
        "deduplicated",
        "remove",
        "queue_change",
        "queue_status",
        "drained",
        "upload_progress",
        "download_progress",
        "cache",
    }
)


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """What a listener receives. Fields that do not apply to an event keep their defaults.

    ``event`` is the event name; ``request_id`` and ``request`` are None for the queue
    events (``queue_status``, ``drained``). ``attempt`` counts the sends started for the
    request so far. ``error`` is set for ``error``; ``final`` says whether that failure
    settled the Future (False: a retry follows, or the request waits to be online).
    ``reason`` says why a request left its queue (``remove``): ``"resolved"``,
    ``"failed"``, ``"cancelled"`` or ``"closed"``. ``status`` is the queue's status
    (``queue_status``); ``size`` the number of requests in the queue (``queue_change``).
    ``loaded`` and ``total`` (None: unknown) are what ``token.progress`` reported
    (``upload_progress``, ``download_progress``). ``cache`` events carry ``cache_key`` and
    a ``reason``: ``"stored"`` (a response entered the cache), ``"hit"`` (an add was
    answered from it) or ``"invalidated"`` (``size`` entries dropped; no request).
    """

    event: str
    queue_key: str
    request_id: str | None = None
    request: object = None
    response: object = None
    error: BaseException | None = None
    attempt: int = 0
    final: bool = True
    reason: str | None = None
    status: QueueStatus | None = None
    size: int = 0
    loaded: float = 0
    total: float | None = None
    cache_key: str | None = None


@dataclass(frozen=True)
class QueuedRequest:
    """A snapshot of one queued request (from ``get_request``, ``get_queue``, ``running_requests``)."""

    request_id: str
    queue_key: str
    request: object
    mode: Mode
    state: RequestState
    attempts: int
    retry: int
    retry_time: float
    deduplicate: bool
    offline: bool
    future: Future[Any]


@dataclass(frozen=True)
class QueueSnapshot:
    """A snapshot of one queue: its status and its requests in queue order; iterating it yields the requests."""

    queue_key: str
    status: QueueStatus
    requests: tuple[QueuedRequest, ...]

    def __iter__(self) -> Iterator[QueuedRequest]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)
