"""JobHandle: what ``@engine.job(...)`` returns, a typed way to enqueue one registered job.

The handle is generic over the handler's payload and result types, read from its
annotations: ``handle.enqueue(payload)`` takes only a payload of the handler's type, so
``mypy --strict`` flags a wrong one, and no job name is spelled at the call. It forwards
to :meth:`JobEngine.enqueue` / :meth:`JobEngine.enqueue_many` with the same keywords
(and the same checks and errors), and it stays callable like the handler it wraps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from threaddispatch._job_config import JobDefinition
from threaddispatch._job_context import JobContext

__all__ = ["JobHandle", "JobSpec"]

PayloadT = TypeVar("PayloadT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class JobSpec:
    """One job to enqueue later, as a step of :meth:`JobEngine.chain`: its name, payload and
    :meth:`JobEngine.enqueue` keywords (checked when chained)."""

    name: str
    payload: object = None
    options: Mapping[str, Any] = field(default_factory=dict)


class JobHandle(Generic[PayloadT, ResultT]):
    """A registered job: ``enqueue``/``enqueue_many`` it by handle; calling it calls the handler.

    ``name``, ``queue`` and ``definition`` are those of the registration that made the
    handle (registering the name again replaces what the engine runs, not this record).
    Keeps its engine alive. Thread-safe: it holds no state of its own.
    """

    def __init__(
        self,
        definition: JobDefinition,
        fn: Callable[[JobContext, PayloadT], ResultT],
        enqueue: Callable[..., str],
        enqueue_many: Callable[..., list[str]],
    ) -> None:
        functools.update_wrapper(self, fn)  # __name__, __doc__, __wrapped__ (so inspect.signature is fn's)
        # The engine's bound enqueue methods, not the engine: this module does not import jobs.py.
        self._enqueue = enqueue
        self._enqueue_many = enqueue_many
        self._fn = fn
        self._definition = definition

    @property
    def definition(self) -> JobDefinition:
        """The registration that made the handle: handler, default queue, priority, retries, timeout."""
        return self._definition

    @property
    def name(self) -> str:
        """The job name the handle enqueues."""
        return self._definition.name

    @property
    def queue(self) -> str:
        """The job's default queue."""
        return self._definition.queue

    def __call__(self, ctx: JobContext, payload: PayloadT) -> ResultT:
        """Call the handler directly (no store, no middleware), as the undecorated function."""
        return self._fn(ctx, payload)

    def enqueue(
        self,
        payload: PayloadT,
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | float | None = None,
        delay: float | None = None,
        max_retries: int | None = None,
        unique_key: str | None = None,
        depends_on: Sequence[str] | None = None,
        on_dependency_failure: str = "cancel",
        lock: str | None = None,
    ) -> str:
        """Store one job with ``payload``; returns its id. Same options, checks and blocking as
        :meth:`JobEngine.enqueue`."""
        return self._enqueue(
            self.name, payload, queue=queue, priority=priority, run_at=run_at, delay=delay,
            max_retries=max_retries, unique_key=unique_key, depends_on=depends_on,
            on_dependency_failure=on_dependency_failure, lock=lock,
        )  # fmt: skip

    def enqueue_many(
        self,
        payloads: Iterable[PayloadT],
        *,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | float | None = None,
        delay: float | None = None,
        max_retries: int | None = None,
        depends_on: Sequence[str] | None = None,
        on_dependency_failure: str = "cancel",
        lock: str | None = None,
    ) -> list[str]:
        """Store one job per payload in one store transaction; returns their ids in order. Same as
        :meth:`JobEngine.enqueue_many`."""
        return self._enqueue_many(
            self.name, payloads, queue=queue, priority=priority, run_at=run_at, delay=delay, max_retries=max_retries,
            depends_on=depends_on, on_dependency_failure=on_dependency_failure, lock=lock,
        )  # fmt: skip

    def spec(self, payload: PayloadT, **options: Any) -> JobSpec:
        """This job with ``payload`` as a step of :meth:`JobEngine.chain` (``options``: enqueue's keywords)."""
        return JobSpec(self.name, payload, dict(options))

    def __repr__(self) -> str:
        return f"<JobHandle {self.name!r} queue={self.queue!r} fn={self._fn!r}>"
