"""CancellationToken: handed to RequestDispatcher's ``send`` to learn of cancellation and to report progress.

One token per attempt. The dispatcher binds it to the attempt (``_bind``) so that
:meth:`CancellationToken.progress` reaches the dispatcher's listeners; a token made
by hand (in a test) is bound to nothing and its progress goes nowhere.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol

from threaddispatch.errors import CancelledError, ConfigurationError

__all__ = ["CancellationToken"]

DIRECTIONS: tuple[str, ...] = ("upload", "download")


class _ProgressSink(Protocol):
    def progress(self, req: Any, token: CancellationToken, loaded: float, total: float | None, direction: str) -> None:
        """Report one progress step of ``req``'s attempt ``token`` (called with no lock held)."""


# Guards the lazy creation of CancellationToken events (rare: only when send waits on one).
_token_lock = threading.Lock()


def _new_token_lock_after_fork() -> None:
    # A thread of the parent may have held it at fork time; the child's copy would stay held.
    global _token_lock
    _token_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_token_lock_after_fork)


class CancellationToken:
    """Tells a running ``send`` that its attempt was stopped or cancelled.

    Set by ``stop``, ``stop_request``, ``delete``, ``clear*``, a newer request in
    ``cancelable`` mode, and ``close`` at its timeout. Each attempt gets a new token.
    Thread-safe; only :meth:`wait` blocks. Its ``threading.Event`` is made only when
    something waits on it: most sends never do, and an attempt is then cheaper.
    """

    __slots__ = ("_cancelled", "_event", "_req", "_sink")

    def __init__(self) -> None:
        self._cancelled = False
        self._event: threading.Event | None = None
        self._sink: _ProgressSink | None = None  # the dispatcher core, once bound
        self._req: Any = None

    def _bind(self, sink: _ProgressSink | None, req: object) -> None:
        self._sink = sink
        self._req = req

    def progress(self, loaded: float, total: float | None = None, *, direction: str = "download") -> None:
        """Report how far the attempt got: ``loaded`` of ``total`` (None: unknown) units, bytes say.

        Emits ``download_progress`` (or ``upload_progress`` with ``direction="upload"``)
        to the dispatcher's listeners, on this thread, before returning; dropped once the
        attempt was cancelled. Raises ConfigurationError for a negative or non-numeric
        ``loaded``/``total`` or an unknown ``direction``. Thread-safe.
        """
        if direction not in DIRECTIONS:
            raise ConfigurationError(f"direction must be 'upload' or 'download', got {direction!r}")
        for label, value in (("loaded", loaded), ("total", total)):
            if value is None and label == "total":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigurationError(f"progress {label} must be a number >= 0, got {value!r}")
        sink = self._sink
        if sink is not None and not self._cancelled:
            sink.progress(self._req, self, loaded, total, direction)

    @property
    def cancelled(self) -> bool:
        """Whether the attempt was cancelled."""
        return self._cancelled

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the attempt is cancelled or ``timeout`` seconds pass; return whether it was cancelled."""
        with _token_lock:
            if self._cancelled:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`threaddispatch.errors.CancelledError` if the attempt was cancelled."""
        if self._cancelled:
            raise CancelledError("the request was cancelled")

    def _cancel(self) -> None:
        with _token_lock:
            self._cancelled = True
            event = self._event
        if event is not None:
            event.set()

    def __repr__(self) -> str:
        return f"<CancellationToken cancelled={self.cancelled}>"
