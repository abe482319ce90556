"""A store's wake-up subscribers in one process, and the one worker serving them: its one job.

``Store.subscribe_wakeups`` is implemented by PostgreSQL (a LISTEN thread) and SQLite (a
``PRAGMA data_version`` watcher). Both keep the same book: callbacks by token, an
idempotent unsubscribe, a worker started by the first subscriber and stopped by the last
unsubscribe or by close, a fresh book in a forked child (the worker's thread does not
exist there), and callbacks run with no lock held, each failure logged. That book is
:class:`Subscribers`; a store's subclass says how its worker is made (:meth:`_new_worker`).
MemoryStore keeps the same book with no thread (:class:`InlineSubscribers`): the call that
made jobs ready calls :meth:`Subscribers.wake` itself, once its store lock is released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from threaddispatch.errors import StoreError

__all__ = ["Inline", "InlineSubscribers", "Subscribers", "WakeupCallback", "Worker"]

WakeupCallback = Callable[[str | None, float | None], None]


class Worker(Protocol):
    """What serves the subscribers: started once, asked to stop (waiting up to ``timeout``) once."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...


W = TypeVar("W", bound=Worker)


class Subscribers(Generic[W]):
    """This process's wake-up subscribers on one store, and the worker that runs while there are any.

    ``where`` names the store in messages (never a password). Thread-safe; callbacks run
    on the worker's thread with no lock held.
    """

    #: The store's class name, for messages and the log.
    kind = "store"
    #: How long the last unsubscribe waits for the worker to leave (seconds).
    stop_wait = 0.0

    def __init__(self, *, where: str, log: logging.Logger) -> None:
        self.where = where
        self._log = log
        self._closed = False
        self._init_process_state()

    def _init_process_state(self) -> None:
        # _lock guards _closed, _subscribers, _next_token and _worker (and what subclasses add
        # here). Callbacks never run with it held; a worker's start() never waits for it.
        self._lock = threading.Lock()
        self._generation = getattr(self, "_generation", 0) + 1
        self._subscribers: dict[int, WakeupCallback] = {}
        self._next_token = 0
        self._worker: W | None = None

    def _new_worker(self) -> W:
        raise NotImplementedError

    @property
    def active(self) -> bool:
        """Whether a worker runs (someone is subscribed)."""
        return self._worker is not None

    def reset_after_fork(self) -> None:
        """In a forked child: no subscribers and no worker (its thread does not exist there)."""
        self._init_process_state()

    def subscribe(self, callback: WakeupCallback) -> Callable[[], None]:
        """Add ``callback``, starting the worker if it is the first; returns an idempotent unsubscribe.

        Raises StoreError once the store is closed. Never blocks beyond a thread start.
        """
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.kind} {self.where} is closed")
            token = self._next_token
            self._next_token += 1
            self._subscribers[token] = callback
            generation = self._generation
            if self._worker is None:
                self._worker = self._new_worker()
                self._worker.start()  # only waits for its threads to exist, never for this lock

        def unsubscribe() -> None:
            with self._lock:
                if generation != self._generation:
                    return  # subscribed before a fork: the child's book never held it
                self._subscribers.pop(token, None)
                stop = self._worker if not self._subscribers else None
                if stop is not None:
                    self._worker = None
            if stop is not None:
                stop.stop(self.stop_wait)

        return unsubscribe

    def close(self, timeout: float = 0.0) -> None:
        """Drop every subscriber and stop the worker, waiting up to ``timeout`` for it. Idempotent."""
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
            self._subscribers.clear()
        if worker is not None:
            worker.stop(timeout)

    def is_current(self, worker: W) -> bool:
        """Whether ``worker`` is still the one serving (a stopped or replaced worker leaves)."""
        with self._lock:
            return self._worker is worker

    def has_subscribers(self, worker: W) -> bool:
        """Whether ``worker`` is still the current one and has someone to serve."""
        with self._lock:
            return self._worker is worker and bool(self._subscribers)

    def worker_exited(self, worker: W) -> None:
        """``worker`` left on its own: the next subscriber starts a new one."""
        with self._lock:
            if self._worker is worker:
                self._worker = None

    def wake(self, due: Sequence[tuple[str | None, float | None]]) -> None:
        """Call every subscriber with each ``(queue, run_at)`` of ``due``; a failing one is logged."""
        with self._lock:
            callbacks = list(self._subscribers.values())
        for callback in callbacks:  # no lock held: callbacks take their own
            for queue, run_at in due:
                try:
                    callback(queue, run_at)
                except Exception:  # noqa: BLE001 - one broken subscriber must not stop the others
                    self._log.exception("%s: wake-up callback %r failed", self.kind, callback)


class Inline:
    """The worker of a store whose writers wake the subscribers themselves: no thread, nothing to stop."""

    def start(self) -> None:
        return None

    def stop(self, timeout: float) -> None:
        return None


class InlineSubscribers(Subscribers[Inline]):
    """The book of a store in this process only: ``active`` while someone is subscribed, no thread.

    The store's writer calls :meth:`wake` on its own thread after releasing its lock.
    """

    def _new_worker(self) -> Inline:
        return Inline()
