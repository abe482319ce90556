"""threaddispatch: background and batched dispatching on plain threads.

No event loop, no broker: work leaves the caller's thread in O(1) and is delivered by
daemon threads, in batches where that pays, with bounded memory and a drain at exit.
This module re-exports the public API; it defines nothing itself. Every name is
imported on first use (PEP 562), so ``import threaddispatch`` imports no face: a
script that uses :class:`BackgroundDispatcher` never loads the job engine, its stores
or asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from threaddispatch._lazy import lazy_attributes

if TYPE_CHECKING:  # the real names, for type checkers and IDEs; at run time see __getattr__
    from threaddispatch._lifecycle import get_exit_timeout, set_exit_timeout
    from threaddispatch.background import BackgroundDispatcher, FailedBatch
    from threaddispatch.backoff import Constant, Exponential, ExponentialJitter, Linear, RetryPolicy
    from threaddispatch.batched import BatchedDispatcher, Envelope
    from threaddispatch.buffered import AsyncDispatcher, Dispatcher, FailedMessage, Sender, SubmittingDispatcher
    from threaddispatch.endpoint import BatchStats, DispatchJob, EndpointBatchDispatcher, WebhookBatch
    from threaddispatch.errors import (
        Cancel,
        CancelledError,
        ConfigurationError,
        DispatcherClosedError,
        DispatchTimeoutError,
        InvalidStateError,
        JobNotFoundError,
        NoStoreError,
        PayloadError,
        QueueFullError,
        Retry,
        StoreError,
        StoreUnavailableError,
        ThreadDispatchError,
    )
    from threaddispatch.events import EventEmitter
    from threaddispatch.jobs import Config, JobContext, JobDefinition, JobEngine, JobHandle, QueueConfig
    from threaddispatch.middleware import LoggingMiddleware, Middleware, RecoverMiddleware, TimeoutMiddleware
    from threaddispatch.request_storage import (
        MemoryRequestStorage,
        RequestStorage,
        SQLiteRequestStorage,
        SQLiteResponseCache,
        StoredRequest,
    )
    from threaddispatch.requests import (
        CachedResponse,
        CancellationToken,
        MemoryResponseCache,
        QueuedRequest,
        QueueSnapshot,
        RequestDispatcher,
        RequestEvent,
        RequestHandle,
        ResponseCache,
        default_dedupe_key,
        default_queue_key,
    )

__version__ = "0.1.0"

#: Public name -> the submodule (of this package) defining it; ``__getattr__`` imports it on first use.
_EXPORTS: dict[str, str] = {
    "get_exit_timeout": "_lifecycle",
    "set_exit_timeout": "_lifecycle",
    "BackgroundDispatcher": "background",
    "FailedBatch": "background",
    "Constant": "backoff",
    "Exponential": "backoff",
    "ExponentialJitter": "backoff",
    "Linear": "backoff",
    "RetryPolicy": "backoff",
    "BatchedDispatcher": "batched",
    "Envelope": "batched",
    "AsyncDispatcher": "buffered",
    "Dispatcher": "buffered",
    "FailedMessage": "buffered",
    "Sender": "buffered",
    "SubmittingDispatcher": "buffered",
    "BatchStats": "endpoint",
    "DispatchJob": "endpoint",
    "EndpointBatchDispatcher": "endpoint",
    "WebhookBatch": "endpoint",
    "Cancel": "errors",
    "CancelledError": "errors",
    "ConfigurationError": "errors",
    "DispatchTimeoutError": "errors",
    "DispatcherClosedError": "errors",
    "InvalidStateError": "errors",
    "JobNotFoundError": "errors",
    "NoStoreError": "errors",
    "PayloadError": "errors",
    "QueueFullError": "errors",
    "Retry": "errors",
    "StoreError": "errors",
    "StoreUnavailableError": "errors",
    "ThreadDispatchError": "errors",
    "EventEmitter": "events",
    "Config": "jobs",
    "JobContext": "jobs",
    "JobDefinition": "jobs",
    "JobEngine": "jobs",
    "JobHandle": "jobs",
    "QueueConfig": "jobs",
    "LoggingMiddleware": "middleware",
    "Middleware": "middleware",
    "RecoverMiddleware": "middleware",
    "TimeoutMiddleware": "middleware",
    "MemoryRequestStorage": "request_storage",
    "RequestStorage": "request_storage",
    "SQLiteRequestStorage": "request_storage",
    "SQLiteResponseCache": "request_storage",
    "StoredRequest": "request_storage",
    "CachedResponse": "requests",
    "CancellationToken": "requests",
    "MemoryResponseCache": "requests",
    "QueueSnapshot": "requests",
    "QueuedRequest": "requests",
    "RequestDispatcher": "requests",
    "RequestEvent": "requests",
    "RequestHandle": "requests",
    "ResponseCache": "requests",
    "default_dedupe_key": "requests",
    "default_queue_key": "requests",
}

#: The public submodules a bare ``import threaddispatch`` used to load: ``threaddispatch.jobs`` after
#: ``import threaddispatch`` still works (``__getattr__`` imports the submodule).
_SUBMODULES = frozenset({
    "background", "backoff", "batched", "buffered", "cron", "endpoint", "errors",
    "events", "jobs", "metrics", "middleware", "request_storage", "requests", "stores",
})  # fmt: skip

__all__ = [
    "AsyncDispatcher",
    "BackgroundDispatcher",
    "BatchStats",
    "BatchedDispatcher",
    "CachedResponse",
    "Cancel",
    "CancellationToken",
    "CancelledError",
    "Config",
    "ConfigurationError",
    "Constant",
    "DispatchJob",
    "DispatchTimeoutError",
    "Dispatcher",
    "DispatcherClosedError",
    "EndpointBatchDispatcher",
    "Envelope",
    "EventEmitter",
    "Exponential",
    "ExponentialJitter",
    "FailedBatch",
    "FailedMessage",
    "InvalidStateError",
    "JobContext",
    "JobDefinition",
    "JobEngine",
    "JobHandle",
    "JobNotFoundError",
    "Linear",
    "LoggingMiddleware",
    "MemoryRequestStorage",
    "MemoryResponseCache",
    "Middleware",
    "NoStoreError",
    "PayloadError",
    "QueueConfig",
    "QueueFullError",
    "QueueSnapshot",
    "QueuedRequest",
    "RecoverMiddleware",
    "RequestDispatcher",
    "RequestEvent",
    "RequestHandle",
    "RequestStorage",
    "ResponseCache",
    "Retry",
    "RetryPolicy",
    "SQLiteRequestStorage",
    "SQLiteResponseCache",
    "Sender",
    "StoreError",
    "StoreUnavailableError",
    "StoredRequest",
    "SubmittingDispatcher",
    "ThreadDispatchError",
    "TimeoutMiddleware",
    "WebhookBatch",
    "__version__",
    "default_dedupe_key",
    "default_queue_key",
    "get_exit_timeout",
    "set_exit_timeout",
]


if not TYPE_CHECKING:  # hidden from type checkers: an unknown name stays an error for them
    __getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)
