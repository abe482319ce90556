"""One cancel token: what user code polls or waits on to learn that its work should stop.

:class:`CancelToken` is the shared base of JobEngine's ``JobContext`` and
RequestDispatcher's ``CancellationToken``: a ``cancelled`` flag, :meth:`CancelToken.wait`
that wakes on cancellation, :meth:`CancelToken.raise_if_cancelled`, and ``_cancel()``
for the library. A subclass adds its own ``__slots__`` and may override
:meth:`CancelToken._cancelled_message` to name what was cancelled.

The ``threading.Event`` behind ``wait`` is made only when something waits: most work
never does, and a token is then two slots and no lock. ``_lock`` (module-wide, held
for a few instructions) guards the creation of ``_event`` against ``_cancel``: the
flag is set and the event read under it, and a waiter creates the event and re-reads
the flag under it, so a wait never misses a cancel. It is replaced in a forked child,
where a copy held by another parent thread at fork time would never be released.
"""

from __future__ import annotations

import math
import threading

from threaddispatch import _lifecycle
from threaddispatch._validate import show
from threaddispatch.errors import CancelledError, ConfigurationError

__all__ = ["CancelToken"]

_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


_lifecycle.at_fork_child(_new_lock_after_fork)


def _wait_seconds(timeout: float | None) -> float | None:
    """``timeout`` for ``Event.wait``: None or inf waits without limit, a negative number is 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise ConfigurationError(f"timeout must be None or a number of seconds, got {show(timeout)}")
    if timeout == math.inf:
        return None
    return max(0.0, float(timeout))


class CancelToken:
    """Tells running work that it should stop. Thread-safe; only :meth:`wait` blocks.

    Cancellation is one-way: once ``cancelled`` is True it stays True.
    """

    __slots__ = ("_cancelled", "_event")

    def __init__(self) -> None:
        self._cancelled = False
        self._event: threading.Event | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the work was cancelled."""
        return self._cancelled

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled or ``timeout`` seconds pass; return whether it was cancelled.

        ``timeout`` None (or infinity) waits without limit; a negative one is 0, so
        ``wait(deadline - time.monotonic())`` is safe. A non-number raises ConfigurationError.
        """
        seconds = _wait_seconds(timeout)
        if self._cancelled:
            return True
        event = self._event
        if event is None:
            with _lock:
                if self._cancelled:
                    return True
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        return event.wait(seconds)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`threaddispatch.errors.CancelledError` if the work was cancelled."""
        if self._cancelled:
            raise CancelledError(self._cancelled_message())

    def _cancelled_message(self) -> str:
        """The message of the CancelledError that :meth:`raise_if_cancelled` raises."""
        return "the work was cancelled"

    def _cancel(self) -> bool:
        """Set ``cancelled`` and wake every :meth:`wait` (any thread); returns whether this call cancelled it."""
        with _lock:
            first = not self._cancelled
            self._cancelled = True
            event = self._event
        if event is not None:
            event.set()
        return first

    def __repr__(self) -> str:
        return f"<{type(self).__name__} cancelled={self._cancelled}>"
