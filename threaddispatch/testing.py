"""Helpers for testing code that uses threaddispatch (and for threaddispatch's own tests).

Public and supported: import them in your own test suite.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from threaddispatch.errors import DispatchTimeoutError

__all__ = ["live_dispatch_threads", "wait_for"]

R = TypeVar("R")


def wait_for(
    predicate: Callable[[], R], timeout: float = 5.0, *, interval: float = 0.002, message: str = ""
) -> R:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Blocks up to ``timeout`` seconds, then raises DispatchTimeoutError (a TimeoutError)
    naming ``message``. Use it instead of ``sleep()``-then-assert.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DispatchTimeoutError(f"condition not met within {timeout}s: {message or predicate!r}")
        time.sleep(min(interval, remaining))


def live_dispatch_threads() -> list[threading.Thread]:
    """Threads started by threaddispatch (named ``threaddispatch-*``) that are still alive."""
    return [t for t in threading.enumerate() if t.name.startswith("threaddispatch-") and t.is_alive()]
