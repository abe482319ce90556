"""The worker registry: each running JobEngine's row in its store, and the listing of them.

A run (:class:`~threaddispatch._job_runtime.Runtime`) registers at start, its heartbeat
thread (:mod:`threaddispatch._job_maintenance`) refreshes the row at every heartbeat (one
store call, with the count of jobs running) and the run removes it at stop. A worker is
**stale** once its last heartbeat is older than ``stale_job_threshold`` (default 30 s, three
default heartbeat intervals; config requires it above ``heartbeat_interval``): the very
threshold past which its running jobs are reaped, so a worker is listed exactly as long as
its claims are honoured. Stale rows are not listed, and every engine's reaper deletes them.
A store call here that raises anything (not only a StoreError) is logged and skipped: the
row is written again at the next heartbeat, or expires.
"""

from __future__ import annotations

import os
import threading
import time

from threaddispatch._job_shared import Shared
from threaddispatch._validate import check_seconds
from threaddispatch.stores.base import Store, WorkerInfo

__all__ = ["DEFAULT_STALE_AFTER", "Registration", "list_workers"]

#: The stale threshold of a reader without an engine's config (the admin app, the CLI):
#: the default ``stale_job_threshold``.
DEFAULT_STALE_AFTER = 30.0


def list_workers(
    store: Store, *, stale_after: float = DEFAULT_STALE_AFTER, now: float | None = None
) -> list[WorkerInfo]:
    """The live workers of ``store`` (heartbeat within ``stale_after`` seconds of ``now``), oldest start first.

    ``now`` defaults to the clock. Raises ConfigurationError for a ``stale_after`` that is
    not a positive number of seconds; blocks for one store read.
    """
    stale_after = check_seconds("stale_after", stale_after, allow_zero=False)
    return store.list_workers(now=time.time() if now is None else now, stale_after=stale_after)


class Registration:
    """One run's row in the registry. ``_lock`` guards ``_removed``; store calls run without it.

    Once :meth:`remove` has run nothing registers the row again: a registration that raced
    the removal deletes its own row after writing it.
    """

    def __init__(self, shared: Shared, worker_id: str, queues: tuple[str, ...], concurrency: int) -> None:
        self._shared = shared
        self._id = worker_id
        self._queues = queues
        self._concurrency = concurrency
        self._started = time.time()
        self._lock = threading.Lock()
        self._removed = False

    def register(self, running: int = 0) -> None:
        """Write this run's row (again, if it was reaped). Blocks for one store write; logs a failure."""
        with self._lock:
            if self._removed:
                return
        import socket  # here: an engine whose workers never run never loads socket

        now = time.time()
        info = WorkerInfo(self._id, socket.gethostname(), os.getpid(), self._queues, self._concurrency,
                          self._started, now, running)  # fmt: skip
        try:
            self._shared.store.register_worker(info)
        except Exception:
            self._shared.logger.warning("registering worker %s failed", self._id, exc_info=True)
            return
        with self._lock:
            raced = self._removed
        if raced:
            self._delete()

    def beat(self, running: int) -> None:
        """Refresh the row's heartbeat and ``running`` (one store call); write it again if it is gone."""
        with self._lock:
            if self._removed:
                return
        try:
            alive = self._shared.store.heartbeat_worker(self._id, running=running, now=time.time())
        except Exception:
            self._shared.logger.warning("heartbeat of worker %s failed", self._id, exc_info=True)
            return
        if not alive:
            self.register(running)

    def remove(self) -> None:
        """Delete the row (once); later calls do nothing. Blocks for one store write; logs a failure."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
        self._delete()

    def _delete(self) -> None:
        try:
            self._shared.store.remove_worker(self._id)
        except Exception:
            self._shared.logger.warning(
                "removing worker %s failed; its row expires after stale_job_threshold", self._id, exc_info=True
            )
