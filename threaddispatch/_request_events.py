"""RequestDispatcher's listeners: subscription by event, queue key or request id, and emission.

One :class:`RequestEvents` per dispatcher. A listener may be subscribed to every
request, to one queue key or to one request id; each subscription is an entry in a
:class:`~threaddispatch.events.EventEmitter` under a name that encodes its filter, so an
emission costs one lookup per filter kind, and nothing at all for an event nobody listens
to: :attr:`RequestEvents.watched` counts the listeners per event name, and the core reads
it (without a lock) before building an event.

Locking: the module lock ``_lock`` guards the writes of every ``watched``/``filtered``
count (subscriptions are rare); the counts are read without it, a stale read only
building one event more or one less around a subscription. It is replaced in a forked child.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from threaddispatch import _lifecycle
from threaddispatch._request_types import EVENTS, RequestEvent
from threaddispatch._validate import check_text, show
from threaddispatch.errors import ConfigurationError
from threaddispatch.events import EventEmitter

__all__ = ["RequestEvents"]

_SEP = "\x1f"  # between an event name and its filter in an emitter entry's name
_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


_lifecycle.at_fork_child(_new_lock_after_fork)


class _KeyFilter:
    """A listener subscribed by request id and queue key: passes only the key's events."""

    __slots__ = ("fn", "queue_key")

    def __init__(self, fn: Callable[[RequestEvent], object], queue_key: str) -> None:
        self.fn = fn
        self.queue_key = queue_key

    def __call__(self, event: RequestEvent) -> None:
        if event.queue_key == self.queue_key:
            self.fn(event)


class RequestEvents:
    """The listeners of one dispatcher. Thread-safe; :meth:`emit` blocks as long as the listeners take."""

    __slots__ = ("_emitter", "filtered", "watched")

    def __init__(self) -> None:
        self._emitter = EventEmitter()
        # Listener counts per event name (watched: any listener; filtered: by key or id). The
        # dicts are never replaced, so a holder of a reference reads the current counts.
        self.watched: dict[str, int] = {}
        self.filtered: dict[str, int] = {}

    def on(
        self, event: str, fn: Callable[[RequestEvent], object], queue_key: str | None, request_id: str | None
    ) -> Callable[[], None]:
        """Subscribe ``fn`` to ``event`` (of one queue key and/or request id); returns an idempotent unsubscribe."""
        if event not in EVENTS:
            raise ConfigurationError(f"unknown event {show(event)}; known events: {', '.join(sorted(EVENTS))}")
        if not callable(fn):
            raise ConfigurationError(f"listener must be callable, got {show(fn)}")
        listener: Callable[[RequestEvent], object] = fn
        if request_id is not None:
            name = f"{event}{_SEP}r{_SEP}{check_text('request_id', request_id)}"
            if queue_key is not None:
                listener = _KeyFilter(fn, check_text("queue_key", queue_key))
        elif queue_key is not None:
            name = f"{event}{_SEP}q{_SEP}{check_text('queue_key', queue_key)}"
        else:
            name = event
        filtered = name is not event
        self._emitter.on(name, listener)
        self._count(event, filtered, 1)
        subscribed = [True]

        def unsubscribe() -> None:
            with _lock:
                if not subscribed[0]:
                    return
                subscribed[0] = False
            self._count(event, filtered, -1)
            self._emitter.off(name, listener)

        return unsubscribe

    def _count(self, event: str, filtered: bool, step: int) -> None:
        with _lock:
            for counts, applies in ((self.watched, True), (self.filtered, filtered)):
                if applies:
                    counts[event] = counts.get(event, 0) + step
                    if not counts[event]:
                        del counts[event]

    def emit(self, event: RequestEvent) -> None:
        """Call the listeners of ``event``: those of every request, of its queue key, of its request id."""
        name = event.event
        emitter = self._emitter
        emitter.emit(name, event)
        if name in self.filtered:
            emitter.emit(f"{name}{_SEP}q{_SEP}{event.queue_key}", event)
            if event.request_id is not None:
                emitter.emit(f"{name}{_SEP}r{_SEP}{event.request_id}", event)
