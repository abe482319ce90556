"""Immediate mode's one shared piece: calling user code on the caller's thread, timeout checked on return.

In a ``threaddispatch.testing.immediate()`` block the batching faces run their sends on
the thread that gave the work. That thread cannot be interrupted, so a per-call timeout
is checked once the call returns, as ``JobEngine(immediate=True)`` checks a job's: a
call that ran past it is a failure (DispatchTimeoutError), its result dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from threaddispatch._invoke import TIMEOUT, Outcome, call
from threaddispatch.errors import DispatchTimeoutError

__all__ = ["call_here"]


def call_here(timeout: float | None, what: str, fn: Callable[..., Any], *args: Any) -> Outcome:
    """``fn(*args)`` on this thread, an awaitable result awaited on its private loop; never raises.

    Blocks for as long as ``fn`` runs. A call that returned after ``timeout`` seconds
    (None: no limit) is a timeout naming ``what``; one that raised keeps its error.
    """
    started = time.monotonic()
    outcome = call(fn, *args)
    if timeout is not None and outcome.ok and time.monotonic() - started > timeout:
        error = DispatchTimeoutError(
            f"{what} ran past its {timeout:g}s timeout (immediate mode: checked when it returned; its result dropped)"
        )
        return Outcome(TIMEOUT, None, error)
    return outcome
