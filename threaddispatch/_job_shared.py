"""What a JobEngine shares with the runtimes it starts: one lock, its conditions, the counters,
and the :class:`Slot` record of a claimed job.

The engine (``jobs.py``) owns one :class:`Shared`; each ``start()`` makes a runtime
(``_job_runtime.py``) that works on it, so counters, pause flags, result waiters and
definitions outlive a run, and a restarted engine still counts the handlers of an earlier
run that are still running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from threaddispatch._job_config import Config, JobDefinition
from threaddispatch._job_context import JobContext
from threaddispatch.backoff import Backoff, RetryPolicy
from threaddispatch.events import EventEmitter
from threaddispatch.stores.base import JobRecord, Store

__all__ = ["STAT_NAMES", "Shared", "Slot"]

#: The counters of ``JobEngine.stats()``, since the engine was made (or forked).
STAT_NAMES = (
    "claimed",
    "completed",
    "failed",
    "dead_lettered",
    "retried",
    "cancelled",
    "timed_out",
    "lost",
    "released",
    "reaped",
    "idle_polls",
)


def _new_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_NAMES, 0)


@dataclass(eq=False)
class Shared:
    """The state an engine and its runtimes share.

    ``lock`` guards ``definitions``, ``stats``, ``paused``, ``waiters`` and every field of the
    runtimes and their slots; ``wake`` (the fetcher), ``maint`` (the heartbeat thread) and
    ``idle`` (stop() waiting for in-flight jobs) are conditions on it. User code (handlers,
    middleware, hooks) and store calls never run with it held. ``policies`` is written
    without it: a lost or repeated insert only builds an equal (immutable) policy again.
    """

    engine: Any  # the JobEngine, handed to handlers as ctx.engine
    store: Store
    config: Config
    logger: logging.Logger
    events: EventEmitter
    steps: tuple[Callable[[JobContext, Callable[[], object]], object], ...]
    definitions: dict[str, JobDefinition] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=_new_stats)
    paused: set[str] = field(default_factory=set)
    paused_version: int = 0  # bumped by every local pause/resume: a store read older than it is stale
    waiters: dict[str, set[threading.Event]] = field(default_factory=dict)
    policies: dict[Backoff, RetryPolicy] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.wake = threading.Condition(self.lock)
        self.maint = threading.Condition(self.lock)
        self.idle = threading.Condition(self.lock)

    def renewed(self) -> Shared:
        """A copy for a forked child: fresh lock and conditions, counters, flags and waiters; same definitions."""
        return Shared(
            self.engine,
            self.store,
            self.config,
            self.logger,
            self.events,
            self.steps,
            definitions=dict(self.definitions),
        )

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a counter (takes the lock)."""
        with self.lock:
            self.stats[name] += amount

    def wake_waiters(self, job_id: str) -> None:
        """Wake the result() calls waiting for ``job_id`` (lock held)."""
        for waiter in self.waiters.get(job_id, ()):
            waiter.set()


class Slot:
    """One claimed job in this process. Fields change under the shared lock."""

    __slots__ = ("abandoned", "ctx", "definition", "job", "settled", "started", "thread")

    def __init__(self, job: JobRecord, ctx: JobContext, definition: JobDefinition | None) -> None:
        self.job = job
        self.ctx = ctx
        self.definition = definition
        self.started = False  # a worker thread began it (else stop may release it)
        self.thread: threading.Thread | None = None  # the worker thread running it, once started
        # settled: its outcome is decided (recorded, timed out, handed back, lost); the
        # handler's own outcome, if it comes later, is discarded.
        self.settled = False
        # abandoned: settled without the handler's outcome (timed out, lost, cancelled, handed
        # back); its thread may still be running the handler.
        self.abandoned = False
