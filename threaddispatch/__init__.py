"""threaddispatch: background and batched dispatching on plain threads.

No event loop, no broker: work leaves the caller's thread in O(1) and is delivered by
daemon threads, in batches where that pays, with bounded memory and a drain at exit.
This module re-exports the public API; it defines nothing itself.
"""

from __future__ import annotations

from threaddispatch._lifecycle import get_exit_timeout, set_exit_timeout
from threaddispatch.background import BackgroundDispatcher, FailedBatch
from threaddispatch.backoff import Constant, Exponential, ExponentialJitter, Linear, RetryPolicy
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

__version__ = "0.1.0"

__all__ = [
    "BackgroundDispatcher",
    "BatchStats",
    "Cancel",
    "CancelledError",
    "ConfigurationError",
    "Constant",
    "DispatchJob",
    "DispatchTimeoutError",
    "DispatcherClosedError",
    "EndpointBatchDispatcher",
    "EventEmitter",
    "Exponential",
    "ExponentialJitter",
    "FailedBatch",
    "InvalidStateError",
    "JobNotFoundError",
    "Linear",
    "NoStoreError",
    "PayloadError",
    "QueueFullError",
    "Retry",
    "RetryPolicy",
    "StoreError",
    "StoreUnavailableError",
    "ThreadDispatchError",
    "WebhookBatch",
    "__version__",
    "get_exit_timeout",
    "set_exit_timeout",
]
