"""threaddispatch: background and batched dispatching on plain threads.

No event loop, no broker: work leaves the caller's thread in O(1) and is delivered by
daemon threads, in batches where that pays, with bounded memory and a drain at exit.
This module re-exports the public API; it defines nothing itself.
"""

from __future__ import annotations

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
