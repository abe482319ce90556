"""A small thread-safe event emitter shared by every face.

Listeners are called synchronously on the emitting thread, in the order they were
added, never with the emitter's lock held, through :func:`threaddispatch._invoke.call`:
an ``async def`` listener (or one returning an awaitable) is awaited on the emitting
thread's private event loop before the next listener runs. A listener that raises,
whatever it raises (SystemExit and KeyboardInterrupt included, and a coroutine's
exception), is logged and counted; the other listeners still run and the emitter's
caller never sees it.

Fork: every emitter is registered with the :mod:`~threaddispatch._lifecycle` registry,
which gives it a fresh lock in a forked child (a lock held by another parent thread at
fork time would never be released there).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from threaddispatch import _lifecycle
from threaddispatch._invoke import call

__all__ = ["EventEmitter", "Listener"]

Listener = Callable[..., object]

_log = logging.getLogger("threaddispatch.events")


class _Once:
    """Wraps a listener added with ``once``; ``off(fn)`` finds it by ``fn``."""

    __slots__ = ("fired", "fn", "lock")

    def __init__(self, fn: Listener) -> None:
        self.fn = fn
        self.fired = False
        self.lock = threading.Lock()


class EventEmitter:
    """``on``/``once``/``off``/``emit`` with listener errors contained.

    Thread-safe. ``emit`` blocks for as long as the listeners take; nothing else blocks.
    """

    def __init__(self, *, known_events: frozenset[str] | None = None) -> None:
        # _listeners_lock guards _listeners; emit copies the list under it and calls outside it.
        self._listeners_lock = threading.Lock()
        self._listeners: dict[str, list[Listener | _Once]] = {}
        # The same dict, for emitters on a hot path: ``event in registered`` is has_listeners
        # without its call (one C-level test, atomic under the GIL), and an empty dict means no
        # listener of any event. Never replaced, only changed under the lock; read it, never write it.
        self.registered: dict[str, list[Listener | _Once]] = self._listeners
        self._known_events = known_events
        self.listener_errors = 0
        _lifecycle.register(self)  # by weak reference: the fork reset, below

    def _check_event(self, event: str) -> None:
        if not isinstance(event, str) or not event:
            raise TypeError(f"event must be a non-empty str, got {event!r}")
        if self._known_events is not None and event not in self._known_events:
            known = ", ".join(sorted(self._known_events))
            raise ValueError(f"unknown event {event!r}; known events: {known}")

    def on(self, event: str, listener: Listener) -> Callable[[], bool]:
        """Call ``listener(*args)`` on every ``emit(event, *args)``; returns a function that removes it."""
        self._check_event(event)
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {listener!r}")
        with self._listeners_lock:
            self._listeners.setdefault(event, []).append(listener)
        return lambda: self.off(event, listener)

    add_listener = on

    def once(self, event: str, listener: Listener) -> Callable[[], bool]:
        """Like :meth:`on`, but the listener runs at most once."""
        self._check_event(event)
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {listener!r}")
        with self._listeners_lock:
            self._listeners.setdefault(event, []).append(_Once(listener))
        return lambda: self.off(event, listener)

    def off(self, event: str, listener: Listener) -> bool:
        """Remove one registration of ``listener`` for ``event``; returns whether one was found."""
        with self._listeners_lock:
            listeners = self._listeners.get(event, [])
            for index, registered in enumerate(listeners):
                if registered is listener or (isinstance(registered, _Once) and registered.fn is listener):
                    del listeners[index]
                    if not listeners:
                        del self._listeners[event]
                    return True
        return False

    remove_listener = off

    def _remove_registration(self, event: str, registered: _Once) -> None:
        """Remove this very ``once`` wrapper (not another registration of the same function)."""
        with self._listeners_lock:
            listeners = self._listeners.get(event, [])
            for index, candidate in enumerate(listeners):
                if candidate is registered:
                    del listeners[index]
                    if not listeners:
                        del self._listeners[event]
                    return

    def remove_all_listeners(self, event: str | None = None) -> None:
        """Remove every listener of ``event``, or of every event when it is None."""
        with self._listeners_lock:
            if event is None:
                self._listeners.clear()
            else:
                self._listeners.pop(event, None)

    def listener_count(self, event: str) -> int:
        """How many listeners ``event`` has now."""
        with self._listeners_lock:
            return len(self._listeners.get(event, ()))

    def has_listeners(self, event: str) -> bool:
        """Cheap check so emitters can skip building a payload nobody reads."""
        return event in self._listeners

    def emit(self, event: str, *args: Any) -> bool:
        """Call the listeners of ``event`` in order on this thread; returns whether there were any."""
        with self._listeners_lock:
            listeners = self._listeners.get(event)
            if not listeners:
                return False
            snapshot = list(listeners)
        for registered in snapshot:
            if isinstance(registered, _Once):
                with registered.lock:
                    if registered.fired:
                        continue
                    registered.fired = True
                self._remove_registration(event, registered)
                fn = registered.fn
            else:
                fn = registered
            outcome = call(fn, *args)  # never raises: a listener must never break the emitter
            if not outcome.ok:
                self.listener_errors += 1
                _log.error("listener %r for event %r raised", fn, event, exc_info=outcome.error)
        return True

    # -- lifecycle (see threaddispatch._lifecycle) -----------------------------------------------

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return (0, 0)  # an emitter holds no work

    def _reset_after_fork(self) -> None:
        self._listeners_lock = threading.Lock()
