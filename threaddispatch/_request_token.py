"""CancellationToken: handed to RequestDispatcher's ``send`` to learn of cancellation and to report progress.

One token per attempt, a :class:`threaddispatch._cancel.CancelToken` (its lock, lazy
event and fork handling are the shared ones). The dispatcher binds it to the attempt
(``_bind``) so that :meth:`CancellationToken.progress` reaches the dispatcher's
listeners; a token made by hand (in a test) is bound to nothing and its progress goes
nowhere.

An ``async def`` send: while its coroutine runs, the task running it on the worker's
private loop is attached to the token (``_attach``/``_detach``, on that loop's thread);
``_cancel`` from any thread then schedules ``task.cancel()`` on that loop with
``call_soon_threadsafe``, so the coroutine sees ``asyncio.CancelledError`` at its next
``await``. No lock: ``_attach`` stores the task and then reads ``cancelled``, and
``_cancel`` sets ``cancelled`` and then reads the task; whichever runs second sees the
other's write, so a cancel racing the attach is never lost (at worst the task is
cancelled twice, which is harmless). A cancel scheduled for a task that finished
meanwhile is a no-op, and one whose loop was closed meanwhile is dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from threaddispatch._cancel import CancelToken
from threaddispatch._invoke import settled
from threaddispatch.errors import ConfigurationError

if TYPE_CHECKING:
    import asyncio

__all__ = ["CancellationToken", "watched"]

DIRECTIONS: tuple[str, ...] = ("upload", "download")

T = TypeVar("T")


class _ProgressSink(Protocol):
    def progress(self, req: Any, token: CancellationToken, loaded: float, total: float | None, direction: str) -> None:
        """Report one progress step of ``req``'s attempt ``token`` (called with no lock held)."""


class CancellationToken(CancelToken):
    """Tells a running ``send`` that its attempt was stopped or cancelled.

    Set by ``stop``, ``stop_request``, ``delete``, ``clear*``, a newer request in
    ``cancelable`` mode, and ``close`` at its timeout. Each attempt gets a new token.
    Thread-safe; only :meth:`wait` blocks. An async send's task is cancelled with it.
    """

    __slots__ = ("_req", "_sink", "_task")

    def __init__(self) -> None:
        super().__init__()
        self._sink: _ProgressSink | None = None  # the dispatcher core, once bound
        self._req: Any = None
        self._task: asyncio.Task[Any] | None = None  # the running async send's task (see the module docstring)

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

    def _cancelled_message(self) -> str:
        return "the request was cancelled"

    def _cancel(self) -> bool:
        first = super()._cancel()
        task = self._task
        if task is not None:
            with contextlib.suppress(RuntimeError):  # its loop was closed meanwhile: nothing runs to cancel
                task.get_loop().call_soon_threadsafe(task.cancel)
        return first

    def _attach(self, task: asyncio.Task[Any] | None) -> None:
        """On the send's loop: ``task`` runs the send now (None: it ended). Cancels it if already cancelled."""
        self._task = task
        if task is not None and self._cancelled:
            task.cancel()


async def watched(awaitable: Awaitable[T], token: CancellationToken) -> T:
    """Await ``awaitable`` with its task attached to ``token``, so cancelling the token cancels it."""
    import asyncio  # loaded: an awaitable runs (sync sends never load asyncio)

    token._attach(asyncio.current_task())
    try:
        # Checked here, where the send's own coroutine is known, so the TypeError names it.
        return cast(T, settled(None, awaitable, await awaitable))
    finally:
        token._attach(None)
