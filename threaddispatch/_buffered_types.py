"""The interfaces an AsyncDispatcher talks to, and what travels between its parts.

:class:`Dispatcher` and :class:`SubmittingDispatcher` are what the user's dispatcher
implements; :class:`FailedMessage` is what the error handler gets. A buffered message
travels as an ``_Entry``: ``(message, delay_seconds or None, the producer's context or
None)``. :func:`in_context` runs user code in a captured :mod:`contextvars` context on a
TimedCaller's runner (BatchedDispatcher uses it too).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from threaddispatch._invoke import settled
from threaddispatch._validate import check_int

__all__ = ["Dispatcher", "FailedMessage", "SubmittingDispatcher", "in_context"]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

# A buffered message: (message, delay_seconds or None, the producer's context captured at put(),
# or None without carry_context).
_Entry = tuple[T, "int | None", "contextvars.Context | None"]


class _SpooledEntry(tuple[Any, ...]):
    """A buffered message of a spooled AsyncDispatcher: the ``_Entry`` triple, with its spool sequence number.

    A tuple subclass, so every part of the loops that unpacks an entry takes it unchanged;
    only the settle points look for ``seq`` (``type(entry) is _SpooledEntry``).
    """

    seq: int


def _spooled_entry(seq: int, message: T, delay: int | None, context: contextvars.Context | None) -> _Entry[T]:
    entry = _SpooledEntry((message, delay, context))
    entry.seq = seq
    return entry


def _spool_body(message: object, delay: int | None) -> list[object]:
    """What the spool keeps of a message: all that re-creating it needs (the context is not kept)."""
    return [message, delay]


def _from_body(body: object) -> tuple[Any, int | None] | None:
    """``(message, delay)`` from a spooled body; None for a body this face did not write."""
    if not isinstance(body, list) or len(body) != 2:
        return None
    message, delay = body
    if delay is not None and (type(delay) is not int or delay < 0):
        return None
    return message, delay


class Dispatcher(Protocol[T_contra]):
    """Sends one message to a target and returns its id (or None); raises on failure.

    ``dispatch`` is synchronous: it returns once the message was accepted by the target.
    :class:`AsyncDispatcher` passes ``delay_seconds`` only for a message put with one, so a
    ``dispatch(message, target)`` without the keyword keeps working for undelayed messages.
    A dispatcher whose ``accepts_delay_seconds`` attribute is False (a BatchedDispatcher
    without ``envelopes`` or ``hold_delays``) has a delayed ``put`` refused at the call.
    """

    def dispatch(
        self, message: T_contra, target: str, *, delay_seconds: int | None = None
    ) -> str | Awaitable[str | None] | None:
        """Send ``message`` to ``target`` (optionally delayed by ``delay_seconds``); return its id.

        May be ``async def`` (or return an awaitable): it is awaited on the dispatch loop's own event loop.
        """
        ...


class SubmittingDispatcher(Dispatcher[T_contra], Protocol[T_contra]):
    """A :class:`Dispatcher` that can also take a message without waiting for its send.

    :class:`AsyncDispatcher` uses ``submit`` when the dispatcher has it, so the dispatcher
    may batch messages behind it; a ``flush(timeout)`` method, if present, is called by
    :meth:`AsyncDispatcher.stop`.
    """

    def submit(
        self, message: T_contra, target: str, *, delay_seconds: int | None = None
    ) -> Future[str | None] | Awaitable[Future[str | None]]:
        """Take ``message`` for ``target`` and return a Future that gets its id or its error (or an awaitable of it).

        Called with ``delay_seconds`` only for a message put with one (as ``dispatch``).
        """
        ...


@dataclass(frozen=True)
class FailedMessage(Generic[T]):
    """A message that failed for good: the message, the last error, its target and the attempts made.

    ``delay_seconds`` is the delay it was put with (None: none), so a handler can put it
    again as it was; ``context`` the producer's :class:`contextvars.Context` captured at
    ``put()`` (the error handler already runs in a copy of it).
    """

    message: T
    error: BaseException
    target_queue: str
    attempts: int = 1
    delay_seconds: int | None = None
    context: contextvars.Context | None = field(default=None, compare=False, repr=False)


def _check_delay(value: object) -> int | None:
    """``delay_seconds`` as given: None, or whole seconds as an int >= 0 (SQS ``DelaySeconds``), not a bool."""
    return None if value is None else int(check_int("delay_seconds (None or whole seconds)", value, 0))


def in_context(context: contextvars.Context, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in ``context`` on a TimedCaller's runner; an awaitable result sees the context's values.

    The runner awaits what this returns on its own loop, in its own Task (which it cancels
    at the timeout); the Task starts with the runner's context, so the wrapper sets the
    captured values in it first. The awaitable's value is checked in the wrapper, named
    after ``fn`` (``_invoke.settled``), so a forgotten ``await`` names the user's function.
    """
    result = context.run(fn, *args)
    if inspect.isawaitable(result):
        return _with_values(context, fn, result)
    return result


async def _with_values(context: contextvars.Context, fn: object, awaitable: Awaitable[Any]) -> Any:
    for var, value in context.items():
        var.set(value)
    return settled(fn, awaitable, await awaitable)


def _failed(entry: _Entry[T], error: BaseException, target: str, attempts: int) -> FailedMessage[T]:
    message, delay, context = entry
    return FailedMessage(message, error, target, attempts, delay, context)
