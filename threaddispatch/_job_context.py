"""JobContext: what a job handler gets besides its payload (the job, its attempt, cancellation).

Its own module so that :mod:`threaddispatch.middleware`, whose hooks take a context, depends
on it and not on the engine. The engine builds one per attempt.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from threaddispatch._cancel import CancelToken
from threaddispatch._invoke import settled
from threaddispatch.errors import DispatchTimeoutError
from threaddispatch.stores.base import JobRecord

if TYPE_CHECKING:
    import asyncio

__all__ = ["JobContext"]


class JobContext(CancelToken):
    """What a handler gets besides its payload: the job, its attempt, and cancellation.

    ``ctx.cancelled`` becomes True (a ``threading.Event`` behind :meth:`wait`) when the job times
    out, is cancelled by an operator, is lost to another worker, or the engine hands it
    back at stop. Long handlers should check it, or sleep with :meth:`wait`. ``ctx.engine`` is
    the :class:`~threaddispatch.JobEngine` running the job (to enqueue follow-up jobs, say).
    Thread-safe.
    """

    __slots__ = (
        "_immediate",
        "_on_deadline",
        "_task",
        "_timed_out",
        "attempt",
        "deadline",
        "engine",
        "job",
        "logger",
        "started",
        "timeout",
    )

    def __init__(
        self,
        job: JobRecord,
        engine: Any,
        logger: logging.Logger,
        *,
        immediate: bool = False,
        on_deadline: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__()
        self.job = job
        # The JobEngine; typed Any so this module never imports the engine (no import circle).
        self.engine: Any = engine
        self.attempt = job.attempts
        self.timeout = job.timeout
        self.logger = logger
        self.deadline: float | None = None
        self.started = time.monotonic()
        self._immediate = immediate  # nothing but _guard watches the deadline of an async handler
        self._on_deadline = on_deadline  # told when a deadline is armed (wakes the timeout watcher)
        # The loop and Task of the job's coroutine while one runs (set and cleared on the worker
        # thread, read by _cancel on any thread: set before the flag is read, so no cancel is missed).
        self._task: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None
        self._timed_out = False  # immediate mode: the coroutine was cancelled at the deadline

    @property
    def id(self) -> str:
        """The job's id."""
        return self.job.id

    @property
    def name(self) -> str:
        """The job's name."""
        return self.job.name

    @property
    def queue(self) -> str:
        """The job's queue."""
        return self.job.queue

    @property
    def dependency_results(self) -> list[Any]:
        """The results of the jobs this one depends on, in ``depends_on`` order (``engine.dependency_results``)."""
        return self.engine.dependency_results(self)  # type: ignore[no-any-return]

    @property
    def cancelled(self) -> bool:
        """Whether the job should stop now (timed out, cancelled, lost, or handed back)."""
        return self._cancelled

    def _cancelled_message(self) -> str:
        return f"job {self.job.id} was cancelled"

    def _cancel(self) -> bool:
        """Set ``cancelled``, wake :meth:`wait`, and cancel the job's coroutine if one runs (any thread)."""
        first = super()._cancel()
        running = self._task
        if running is not None:
            loop, task = running
            with contextlib.suppress(RuntimeError):  # the loop closed: the coroutine ended meanwhile
                loop.call_soon_threadsafe(task.cancel)
        return first

    async def _guard(self, awaitable: Awaitable[Any], fn: object = None) -> Any:
        """Await the job's ``awaitable`` (its handler's, ``fn``'s, or async middleware's) as a cancellable task.

        A cancel (timeout on the heartbeat thread, operator cancel, lost claim, stop) cancels
        it. In immediate mode nothing else watches the deadline: it cancels the task itself,
        and the attempt fails with DispatchTimeoutError. Its value is checked here, named
        after ``fn`` (``_invoke.settled``): a forgotten ``await`` names the handler, not this.
        """
        import asyncio  # loaded: an awaitable runs (sync jobs never load asyncio)

        task = asyncio.current_task()
        if task is None:  # not run as a Task (invoke always makes one): nothing to cancel
            return settled(fn, awaitable, await awaitable)
        loop = asyncio.get_running_loop()
        self._task = (loop, task)
        timer = None
        try:
            if self._cancelled:
                if inspect.iscoroutine(awaitable):
                    awaitable.close()
                self.raise_if_cancelled()
            if self._immediate and self.deadline is not None:
                timer = loop.call_at(loop.time() + max(0.0, self.deadline - time.monotonic()), self._time_out_task)
            return settled(fn, awaitable, await awaitable)
        except asyncio.CancelledError:
            if self._timed_out:
                raise self._timeout_error() from None
            raise
        finally:
            self._task = None
            if timer is not None:
                timer.cancel()

    def _time_out_task(self) -> None:
        running = self._task
        if running is not None:
            self._timed_out = True
            running[1].cancel()

    def _timeout_error(self) -> DispatchTimeoutError:
        return DispatchTimeoutError(f"job {self.job.name} {self.job.id} timed out after {self.timeout}s")

    def _arm_deadline(self, deadline: float) -> None:
        self.deadline = deadline
        if self._on_deadline is not None:
            self._on_deadline(deadline)

    def __repr__(self) -> str:
        return f"<JobContext {self.job.name} {self.job.id} attempt={self.attempt}>"
