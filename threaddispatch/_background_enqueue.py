"""The ``enqueue`` functions a BackgroundDispatcher binds: its one job is the hot path of accepting an entry.

The dispatcher binds one closure per instance, chosen at construction by its options, so
an option that is off costs nothing: :func:`_lock_free_enqueue` (the drop policies: an
append and a length check, no lock), the engine's ``lossless_enqueue`` (``block`` and
``raise``), :func:`_lock_free_traced_enqueue` / :func:`_traced_enqueue` (with tracing on,
each entry put with the producer's context) and :func:`_spooled_enqueue` (with a spool,
wrapping whichever of those, the entry made durable first). Each has the signature
``(entry, *, timeout=None)`` (:data:`ENQUEUE_SIGNATURE`); the dispatcher gives it its docstring.

Every one checks a given ``timeout`` with :func:`~threaddispatch._validate.check_wait` (a
number from 0 to ``MAX_WAIT``, as ``flush`` and ``close`` do), under every policy, and only
when one is given: the usual call (no timeout) pays one ``is not None`` test for it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from threaddispatch._background_sender import _Spooled, _Submitted
from threaddispatch._lanes import ClosedFifoLane, FifoLane
from threaddispatch._spool import Spool
from threaddispatch._validate import check_wait
from threaddispatch.errors import DispatcherClosedError, StoreError

#: What every bound enqueue shows: ``(entry, *, timeout=None)``.
ENQUEUE_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("entry", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=None),
    ],
    return_annotation=None,
)


def _positional_timeout() -> TypeError:
    return TypeError(
        "enqueue() takes 1 positional argument (the entry); timeout is keyword-only: enqueue(entry, timeout=...)"
    )


def _lock_free_enqueue(lane: FifoLane, kick: Callable[[FifoLane], None]) -> Callable[..., None]:
    """The hot path of ``enqueue``: an append and a length check, no lock.

    Locals come in as positional defaults, the cheapest variable access CPython has;
    this measured about 15% cheaper per call than the equivalent method. A keyword-only
    ``timeout`` would cost about as much again (CPython 3.11 does not specialize calls
    to functions with keyword-only parameters), so ``timeout`` comes last instead and a
    stray positional argument lands in ``_lane``: an object without the lane's
    ``lock_free_append`` (the same C method as ``append``, under a name nothing else
    has), which raises the AttributeError turned into TypeError here. The ``try`` costs
    nothing on 3.11 until it catches. ``__signature__`` shows ``(entry, *, timeout=None)``.

    ``lock_free_append`` is looked up on each call so that closing (a class swap of the
    lane) takes effect here too. The engine re-arms ``lane.trigger`` before reading the
    length, so an entry is either seen by the worker or followed by a kick. ``timeout``
    is never waited on under the drop policies, but a bad one is refused all the same:
    the usual call passes none and pays one ``is not None`` test for it.
    """

    def enqueue(
        entry: object,
        _lane: FifoLane = lane,
        _len: Callable[[FifoLane], int] = len,
        _kick: Callable[[FifoLane], None] = kick,
        timeout: float | None = None,
    ) -> None:
        if timeout is not None:
            check_wait("timeout", timeout)
        try:
            _lane.lock_free_append(entry)
        except AttributeError:
            raise _positional_timeout() from None
        if _len(_lane) >= _lane.trigger:
            _kick(_lane)

    enqueue.__signature__ = ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
    return enqueue


def _traced_enqueue(enqueue: Callable[..., None], capture: Callable[[], Any], lane: FifoLane) -> Callable[..., None]:
    """``enqueue`` with each entry put as ``(entry, the caller's OpenTelemetry context)`` (tracing on only).

    A dispatcher without a ``tracer_provider`` never binds this: its ``enqueue`` stays the
    untraced closure, paying nothing for tracing. A tuple, not an object: about 30 ns to
    make instead of several hundred. As in :func:`_lock_free_enqueue`, the locals are
    positional defaults; a stray positional argument lands in ``_enqueue`` (then not
    ``_real``) and raises the keyword-only TypeError.
    """

    def traced(
        entry: object,
        _enqueue: Callable[..., None] = enqueue,
        _capture: Callable[[], Any] = capture,
        _real: Callable[..., None] = enqueue,
        timeout: float | None = None,
    ) -> None:
        if _enqueue is not _real:
            raise _positional_timeout()
        try:
            if timeout is None:
                _enqueue((entry, _capture()))
            else:
                _enqueue((entry, _capture()), timeout=timeout)
        except DispatcherClosedError:
            lane.append(entry)  # closed: raises naming the entry itself, not its tuple
            raise

    traced.__signature__ = ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
    return traced


def _lock_free_traced_enqueue(
    lane: FifoLane, kick: Callable[[FifoLane], None], capture: Callable[[], Any]
) -> Callable[..., None]:
    """:func:`_lock_free_enqueue` putting ``(entry, the caller's OpenTelemetry context)``, in one frame.

    The drop policies with tracing on: the same append and length check as the untraced
    path, plus the capture and the tuple, with no second call through :func:`_traced_enqueue`.
    A stray positional argument lands in ``_lane`` and raises the keyword-only TypeError.
    """

    def enqueue(
        entry: object,
        _lane: FifoLane = lane,
        _len: Callable[[FifoLane], int] = len,
        _kick: Callable[[FifoLane], None] = kick,
        _capture: Callable[[], Any] = capture,
        timeout: float | None = None,
    ) -> None:
        if timeout is not None:
            check_wait("timeout", timeout)
        try:
            _lane.lock_free_append((entry, _capture()))
        except AttributeError:
            raise _positional_timeout() from None
        except DispatcherClosedError:
            _lane.append(entry)  # closed: raises naming the entry itself, not its tuple
            raise
        if _len(_lane) >= _lane.trigger:
            _kick(_lane)

    enqueue.__signature__ = ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
    return enqueue


def _spooled_enqueue(enqueue: Callable[..., None], spool: Spool, lane: FifoLane) -> Callable[..., None]:
    """``enqueue`` with each entry first made durable in ``spool`` and put as a :class:`_Spooled` (spool on only).

    Wraps the (traced or untraced) enqueue, which then carries the ``_Spooled`` like any
    entry. The append is on the caller's thread, before the entry is in the buffer: a
    PayloadError (not JSON) leaves both untouched. An entry the inner enqueue refuses
    (closed, QueueFullError) leaves the spool again. A stray positional argument lands in
    ``_enqueue`` and raises the keyword-only TypeError, as in :func:`_traced_enqueue`.
    """

    def spooled(
        entry: object,
        _enqueue: Callable[..., None] = enqueue,
        _append: Callable[[object], int] = spool.append,
        _real: Callable[..., None] = enqueue,
        timeout: float | None = None,
    ) -> None:
        if _enqueue is not _real:
            raise _positional_timeout()
        if timeout is not None:
            check_wait("timeout", timeout)  # refused before anything is written
        plain = entry.entry if type(entry) is _Submitted else entry
        try:
            item = _Spooled(_append(plain), plain, entry.future if type(entry) is _Submitted else None)
        except StoreError:
            if type(lane) is ClosedFifoLane:  # closed (the spool with it): the closed error, naming the entry
                lane.append(plain)
            raise
        try:
            if timeout is None:
                _enqueue(item)
            else:
                _enqueue(item, timeout=timeout)
        except BaseException:
            with contextlib.suppress(StoreError):  # closed meanwhile: the spool is gone with it
                spool.ack((item.seq,))  # never accepted
            raise

    spooled.__signature__ = ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
    return spooled
