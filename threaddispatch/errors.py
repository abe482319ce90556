"""Exceptions raised by threaddispatch, and the flow signals user code may raise.

Every class here derives from :class:`ThreadDispatchError` and, where a built-in
category fits, from that built-in too, so ``except ValueError`` keeps working for
bad configuration and ``except TimeoutError`` for timeouts. The exceptions:
``CancelledError`` is the standard library's ``concurrent.futures.CancelledError``
(what a cancelled Future raises), and the flow signals ``Retry`` and ``Cancel`` are
plain ``Exception`` subclasses that user code raises.
"""

from __future__ import annotations

import concurrent.futures
import math

from threaddispatch._show import show

__all__ = [
    "Cancel",
    "CancelledError",
    "ConfigurationError",
    "DispatchTimeoutError",
    "DispatcherClosedError",
    "InvalidStateError",
    "JobNotFoundError",
    "NoStoreError",
    "PayloadError",
    "QueueFullError",
    "Retry",
    "SpoolOwnedError",
    "StoreError",
    "StoreUnavailableError",
    "ThreadDispatchError",
]


class ThreadDispatchError(Exception):
    """Root of every exception threaddispatch raises on its own account."""


class ConfigurationError(ThreadDispatchError, ValueError):
    """A constructor or method received a bad value; the message names it."""


class DispatcherClosedError(ThreadDispatchError, RuntimeError):
    """Work was offered to a dispatcher after ``close()``/``stop()``/``shutdown()``."""


class QueueFullError(ThreadDispatchError):
    """A bounded buffer had no room (``overflow="raise"``, or a ``put`` timed out)."""


class DispatchTimeoutError(ThreadDispatchError, TimeoutError):
    """A wait for a result ran past its timeout."""


#: Work was cancelled. This is :class:`concurrent.futures.CancelledError` itself (not a
#: subclass), so ``except threaddispatch.CancelledError`` also catches what a cancelled
#: ``Future.result()`` raises. The one class here that is not a ThreadDispatchError.
CancelledError = concurrent.futures.CancelledError


class NoStoreError(ThreadDispatchError, ValueError):
    """A :class:`~threaddispatch.JobEngine` was built without a store."""


class StoreError(ThreadDispatchError):
    """A job store failed to carry out an operation."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached (server down, file locked); callers may retry."""


class SpoolOwnedError(StoreUnavailableError):
    """A dispatcher's spool file is owned by another dispatcher (this process or another); the message names its pid."""


class JobNotFoundError(ThreadDispatchError, LookupError):
    """No job (or dead letter, or cron entry) has the given id."""


class InvalidStateError(ThreadDispatchError):
    """The operation does not apply to the object's current state."""


class PayloadError(ThreadDispatchError, ValueError):
    """A payload cannot be stored: not serialisable, or too large."""


def _check_retry_delay(delay: object) -> None:
    """``_validate.check_seconds("Retry delay", delay)``, inline: ``_validate`` imports this module,
    so this one must not import it (the package has no import cycle). Same rule, same wording."""
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise ConfigurationError(f"Retry delay must be a number of seconds, got {show(delay)}")
    try:
        seconds = float(delay)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"Retry delay must be a finite number >= 0, got {show(delay)}")


class Retry(Exception):  # noqa: N818 - a flow signal, named for what user code asks for
    """Raised by user code to ask for another attempt, optionally after ``delay`` seconds.

    ``delay`` must be None or a finite number >= 0: anything else raises ConfigurationError
    here, at construction (inside a handler, that is simply the attempt failing with it).
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None:
            _check_retry_delay(delay)
        super().__init__(reason or (f"retry requested after {delay}s" if delay is not None else "retry requested"))
        self.delay = delay


class Cancel(Exception):  # noqa: N818 - a flow signal, named for what user code asks for
    """Raised by user code to stop the work for good: no further attempt is made."""
