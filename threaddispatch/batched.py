"""BatchedDispatcher: a Dispatcher that groups messages per target and sends them in batches.

The face of TypeQueue's ``BatchedDispatcher`` on the shared
:class:`~threaddispatch._engine.BatchEngine`: one lane per target, the engine's window is
``flush_interval`` and its size trigger ``max_batch_size``. The engine's worker hands
each batch to :meth:`_BatchState.deliver`, which runs ``send_batch(target, messages)`` on
the shared :class:`~threaddispatch._pool.WorkerPool` and returns the pool's Future, so
the engine settles the batch (and ``flush()`` waits for it) when the send is done.

Concurrency cap and back-pressure: ``deliver`` takes one of ``max_concurrent_sends``
send slots before it submits, and blocks the engine worker while every slot is busy.
This is deliberate, instead of the engine's ``gate``: the gate holds a lane back for a
whole window each time it says no (adding latency even when a slot frees a moment
later), and the engine ignores it while closing, so the cap would not hold during a
drain. A blocked worker holds the cap always; meanwhile lanes keep filling, so batches
grow fuller under load. Only a ``close()`` deadline ends the wait: past it, what is
still queued fails with DispatchTimeoutError instead of waiting for a hung send.

Each message carries its own Future, which gets its id or its exception.
``send_batch`` returns one result per message (an id, None, or an exception), as SQS
``SendMessageBatch`` does, so a partial failure fails only its messages.

Each message also carries its ``delay_seconds`` and the submitter's contextvars context
(captured at ``submit``; one ``copy_context()``, small beside the Future and the lane
append). With ``envelopes=True`` both reach ``send_batch`` on an :class:`Envelope` per
message; ``send_batch`` itself runs in a copy of the first message's context.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from threaddispatch import _immediate, _lifecycle
from threaddispatch._batched_immediate import call_here
from threaddispatch._buffered_types import in_context
from threaddispatch._engine import BatchEngine
from threaddispatch._future import LazyFuture
from threaddispatch._invoke import ERROR, Outcome, TimedCaller, call
from threaddispatch._pool import WorkerPool
from threaddispatch._validate import check_positive_int, check_seconds, show
from threaddispatch.errors import (
    ConfigurationError,
    DispatcherClosedError,
    DispatchTimeoutError,
    ThreadDispatchError,
)

__all__ = ["BatchedDispatcher", "Envelope", "SendBatch", "SendEnvelopes"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Envelope(Generic[T]):
    """One message as ``send_batch`` sees it with ``envelopes=True``.

    ``delay_seconds`` is the delay it was submitted with, as given (an int stays an int),
    to pass on per entry (SQS ``SendMessageBatch``'s ``DelaySeconds``); None: no delay was
    asked for, or ``hold_delays=True`` already held it here. ``context`` is the submitter's
    :class:`contextvars.Context`, captured at ``submit``: ``envelope.context.run(fn)``
    runs ``fn`` in it (a trace id, a logging context).
    """

    message: T
    delay_seconds: float | None
    context: contextvars.Context = field(compare=False, repr=False)


_Results = Sequence["str | BaseException | None"]
#: ``send_batch(target, messages)``: returns one result per message, an id (or None) or an exception
#: (an ``async def`` one returns them from its coroutine).
SendBatch = Callable[[str, list[T]], "_Results | Awaitable[_Results]"]
#: ``send_batch(target, envelopes)`` with ``envelopes=True``: one :class:`Envelope` per message, same results.
SendEnvelopes = Callable[[str, list[Envelope[T]]], "_Results | Awaitable[_Results]"]

_log = logging.getLogger("threaddispatch")
_names = iter(range(1, 1 << 62))

# Send threads leave after this long without work. Short, so the threads of a dispatcher
# that was garbage-collected (not closed) do not linger; starting one again is cheap.
_SEND_IDLE_TIMEOUT = 2.0


class _Pending(Generic[T]):
    """A message in a lane, with how its outcome is reported, its delay to pass on and its submitter's context.

    A submitted message has a ``future``. A message handed over by an AsyncDispatcher
    (:meth:`BatchedDispatcher._hand_off`) has none: ``settle`` gets the outcomes of a
    whole batch at once, each beside its ``token`` (no Future, no lock per message).
    """

    __slots__ = ("context", "delay", "future", "message", "settle", "token")

    def __init__(
        self,
        message: T,
        future: Future[str | None] | None,
        delay: float | None,
        context: contextvars.Context,
        *,
        settle: Settle | None = None,
        token: object = None,
    ) -> None:
        self.message = message
        self.future = future
        self.delay = delay
        self.context = context
        self.settle = settle
        self.token = token

    def __repr__(self) -> str:
        return f"message {show(self.message)}"


#: What a hand-off's ``settle`` gets once per batch: ``(token, error or None)`` for each of its messages.
Settle = Callable[[list[tuple[Any, "BaseException | None"]]], object]


class _BatchState(Generic[T]):
    """What the engine worker and the send threads touch: never the BatchedDispatcher itself.

    Registered with the lifecycle registry for the fork reset (the send-slot count of the
    parent means nothing in the child); the engine and the pool drain themselves at exit.
    """

    def __init__(
        self,
        send_batch: Callable[[str, list[Any]], object],
        name: str,
        max_concurrent_sends: int,
        envelopes: bool,
        send_timeout: float | None,
    ) -> None:
        self.send_batch = send_batch
        self.envelopes = envelopes  # send_batch gets Envelopes instead of bare messages
        self.name = name
        self.max_concurrent_sends = max_concurrent_sends
        self.pool = WorkerPool(max_concurrent_sends, name=f"{name}-send", idle_timeout=_SEND_IDLE_TIMEOUT)
        # send_batch runs through it: on the pool thread without a timeout, else on its runners.
        self.caller = TimedCaller(f"{name}-send", timeout=send_timeout, idle_timeout=_SEND_IDLE_TIMEOUT)
        self.closed = False
        self.give_up_at: float | None = None  # close()'s deadline: queued batches fail after it
        self.deadline_set = False  # give_up_at was set by the first close()
        self.failed_at_close = 0
        self.sent = 0
        self.failed = 0
        self.cancelled = 0
        self.calls = 0
        self.local = threading.local()  # .sending: how many send_batch calls this thread is inside
        self._init_runtime()

    def _init_runtime(self) -> None:
        # mutex must be held whenever a field of this object changes; slot_free is a condition on it.
        self.mutex = threading.Lock()
        self.slot_free = threading.Condition(self.mutex)
        self.sending = 0  # send slots taken: sends submitted to the pool and not returned yet

    def _past_give_up(self) -> bool:
        return self.give_up_at is not None and time.monotonic() >= self.give_up_at

    def deliver(self, target: Hashable, items: list[_Pending[T]]) -> Future[None] | None:
        """The engine's ``deliver``: take a send slot (waiting while all are busy) and submit the send.

        Runs on the engine worker. Returns the pool's Future (the engine settles the batch
        when it is done), or None when nothing is left to send.
        """
        batch = [
            pending for pending in items if pending.future is None or pending.future.set_running_or_notify_cancel()
        ]
        if len(batch) != len(items):
            with self.mutex:
                self.cancelled += len(items) - len(batch)
        if not batch:
            return None
        with self.mutex:
            while self.sending >= self.max_concurrent_sends and not self._past_give_up():
                # Back-pressure: the engine keeps buffering while we wait. Only close() ends
                # this wait early (it sets give_up_at and notifies).
                remaining = None if self.give_up_at is None else self.give_up_at - time.monotonic()
                self.slot_free.wait(remaining)
            give_up = self._past_give_up()
            if not give_up:
                self.sending += 1
        if give_up:
            self._fail(
                batch,
                DispatchTimeoutError(
                    f"{self.name}: closed and its timeout passed before a batch of {len(batch)} message(s) "
                    f"to {target!r} could be sent"
                ),
            )
            return None
        try:
            return self.pool.submit(self.send, target, batch)
        except DispatcherClosedError as error:
            self._release()
            self._fail(batch, error)
            return None

    def _release(self, *, called: bool = False) -> None:
        with self.mutex:
            self.sending -= 1
            self.calls += called
            self.slot_free.notify()

    def send(self, target: str, batch: list[_Pending[T]]) -> None:
        """Run ``send_batch`` for one batch (on a pool thread, holding a send slot) and settle its messages."""
        try:
            outcome = self._send_batch(target, batch, self._call)
        finally:
            self._release(called=True)
        self._settle(target, batch, outcome)

    def send_now(self, target: str, batch: list[_Pending[T]]) -> None:
        """Immediate mode: run ``send_batch`` on this thread (no slot, the timeout checked on return) and settle."""
        outcome = self._send_batch(target, batch, self._call_here)
        with self.mutex:
            self.calls += 1
        self._settle(target, batch, outcome)

    def _send_batch(
        self, target: str, batch: list[_Pending[T]], how: Callable[[contextvars.Context, str, list[Any]], Outcome]
    ) -> Outcome:
        payload: list[Any]
        if self.envelopes:
            payload = [Envelope(pending.message, pending.delay, pending.context) for pending in batch]
        else:
            payload = [pending.message for pending in batch]
        # A copy: send_batch may run an envelope's own context (the first one's included).
        context = batch[0].context.copy()
        local = self.local
        local.sending = getattr(local, "sending", 0) + 1
        try:
            return how(context, target, payload)
        finally:
            local.sending -= 1

    def _settle(self, target: str, batch: list[_Pending[T]], outcome: Outcome) -> None:
        if outcome.error is not None:  # the whole batch failed (a BaseException and a timeout too)
            self._fail(batch, outcome.error)
            return
        outcomes = self._outcomes(target, batch, outcome.value)
        if outcomes is not None:
            self._resolve(batch, outcomes)

    def _call_here(self, context: contextvars.Context, target: str, payload: list[Any]) -> Outcome:
        what = f"{self.name}: send_batch({target!r}, <{len(payload)} messages>)"
        return context.run(call_here, self.caller.timeout, what, self.send_batch, target, payload)

    def _call(self, context: contextvars.Context, target: str, payload: list[Any]) -> Outcome:
        """``send_batch(target, payload)`` in ``context`` (this batch's own copy), within the timeout; never raises."""
        caller = self.caller
        if caller.timeout is None:
            return context.run(call, self.send_batch, target, payload)
        try:
            return caller.call(in_context, context, self.send_batch, target, payload)
        except DispatcherClosedError:  # close() passed its deadline while this send was queued
            error = DispatchTimeoutError(
                f"{self.name}: closed and its timeout passed before a batch of {len(payload)} message(s) "
                f"to {target!r} could be sent"
            )
            return Outcome(ERROR, None, error)

    def _outcomes(self, target: str, batch: list[_Pending[T]], results: object) -> list[Any] | None:
        """Check ``send_batch``'s return value: one result per message, or fail the whole batch."""
        problem = None
        outcomes: list[Any] = []
        if results is None or isinstance(results, (str, bytes, bytearray)) or not isinstance(results, Iterable):
            problem = f"returned {type(results).__name__}"
        else:
            try:
                outcomes = list(results)
            except Exception as error:  # noqa: BLE001 - a broken iterable fails the batch like a raise would
                self._fail(batch, error)
                return None
            if len(outcomes) != len(batch):
                problem = f"returned {len(outcomes)} result(s)"
        if problem is None:
            return outcomes
        self._fail(
            batch,
            ThreadDispatchError(
                f"{self.name}: send_batch({target!r}, <{len(batch)} messages>) {problem}; it must return a list "
                f"with one result (an id, None or an exception) per message, so none of them counts as sent"
            ),
        )
        return None

    def _fail(self, batch: list[_Pending[T]], error: BaseException) -> None:
        self._resolve(batch, [error] * len(batch))

    def _resolve(self, batch: list[_Pending[T]], outcomes: list[Any]) -> None:
        """Give each message its outcome (an id, None or an exception): its Future, or its hand-off's
        ``settle`` once per batch. Nothing held: Future callbacks and ``settle`` are user-side code."""
        sent = failed = 0
        handed: dict[Settle, list[tuple[Any, BaseException | None]]] | None = None
        for pending, outcome in zip(batch, outcomes, strict=True):
            error = outcome if isinstance(outcome, BaseException) else None
            if error is None:
                sent += 1
            else:
                failed += 1
            future = pending.future
            if future is not None:
                if error is None:
                    future.set_result(outcome)
                else:
                    future.set_exception(error)
                continue
            assert pending.settle is not None
            if handed is None:
                handed = {}
            handed.setdefault(pending.settle, []).append((pending.token, error))
        with self.mutex:
            self.sent += sent
            self.failed += failed
        if handed is not None:
            for settle, settled in handed.items():
                outcome = call(settle, settled)
                if outcome.error is not None:
                    _log.error("%s: a hand-off's settle raised", self.name, exc_info=outcome.error)

    def in_send(self) -> bool:
        """Whether the calling thread is inside ``send_batch`` (it cannot wait for its own batch)."""
        return bool(getattr(self.local, "sending", 0))

    def stop_intake(self) -> None:
        """The first close(): refuse new messages; failures from here on count against the close."""
        with self.mutex:
            self.closed = True
            self.failed_at_close = self.failed

    def give_up_by(self, deadline: float | None) -> None:
        """Fail what is still queued once ``deadline`` passes (the first close()'s; later ones keep it)."""
        with self.mutex:
            if self.deadline_set:
                return
            self.deadline_set = True
            self.give_up_at = deadline
            self.slot_free.notify_all()

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return 0, 0  # the engine and the pool are registered themselves and drain at exit

    def _reset_after_fork(self) -> None:
        self._init_runtime()


class BatchedDispatcher(_lifecycle.Closing, Generic[T]):
    """A :class:`~threaddispatch.buffered.Dispatcher` that sends messages in batches per target.

    ``send_batch(target, messages)`` runs on up to ``max_concurrent_sends`` daemon threads
    (``threaddispatch-<name>-send-<n>``) and returns one result per message: an id (or
    None) for a sent message, an exception for a failed one. A target's batch goes when
    it holds ``max_batch_size`` messages or ``flush_interval`` seconds after its first
    message arrived, whichever comes first; batches never mix targets. Plug it into
    :class:`~threaddispatch.buffered.AsyncDispatcher` to batch behind a buffered hand-off.
    All methods are thread-safe.

    Per-message delay (SQS ``DelaySeconds`` is per entry). ``send_batch(target, messages)``
    cannot see a delay, so by default ``submit(..., delay_seconds=n)`` raises
    ConfigurationError; choose one of:

    * ``envelopes=True``: ``send_batch(target, envelopes)`` gets one :class:`Envelope`
      ``(message, delay_seconds, context)`` per message, and passes the delay on itself.
      The message goes in the next batch; nothing is held here.
    * ``hold_delays=True``: the message is held in this process and joins its target's
      batches after the delay. A held message is lost if the process dies; ``flush()``
      does not send it (it is not in a batch yet) and ``close()`` sends it at once,
      early. Its envelope says ``delay_seconds=None`` (the delay was spent here).

    ``send_batch`` may be ``async def`` (or return an awaitable): it is awaited on the send
    thread's private event loop. With ``send_timeout`` (seconds) each call runs on a helper
    thread and, past it, the batch's Futures fail with DispatchTimeoutError: a coroutine is
    cancelled, a plain call's thread is abandoned (left to finish, its late result logged and
    ignored; at most 4 at a time, past that later sends wait within their own timeout) and
    the send slot is free again, so later batches go. ``stats()`` counts them. A
    BaseException (SystemExit, KeyboardInterrupt) from ``send_batch`` fails its batch with
    that error, like any exception; the send thread lives on.

    Existing ``send_batch(target, messages)`` callables keep working unchanged; only a
    delay needs a choice. ``delay_seconds=None`` always means no delay.

    ``close(timeout)`` stops intake, sends what is queued and stops the threads; messages
    still queued when its timeout passes fail with DispatchTimeoutError. Called from inside
    ``send_batch`` it starts the close and returns False at once.

    Context: ``submit`` captures the caller's :mod:`contextvars` context. ``send_batch``
    runs in a copy of the first message's context (so a one-request batch logs with that
    request's trace id); with ``envelopes=True`` each message's own context is on its
    envelope. Behind an :class:`~threaddispatch.buffered.AsyncDispatcher` that context is
    the producer's only with ``AsyncDispatcher(..., carry_context=True)``.
    """

    def __init__(
        self,
        send_batch: SendBatch[T] | SendEnvelopes[T],
        *,
        max_batch_size: int = 10,
        flush_interval: float = 0.05,
        max_concurrent_sends: int = 4,
        name: str | None = None,
        envelopes: bool = False,
        hold_delays: bool = False,
        send_timeout: float | None = None,
    ) -> None:
        if not callable(send_batch):
            raise ConfigurationError(f"send_batch must be callable, got {send_batch!r}")
        check_positive_int("max_batch_size", max_batch_size)
        flush_interval = check_seconds("flush_interval", flush_interval)
        check_positive_int("max_concurrent_sends", max_concurrent_sends)
        if name is None:
            name = f"batched-{next(_names)}"
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str, got {name!r}")
        for flag, value in (("envelopes", envelopes), ("hold_delays", hold_delays)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{flag} must be a bool, got {value!r}")
        if send_timeout is not None:
            send_timeout = check_seconds("send_timeout", send_timeout, allow_zero=False)
        self.name = name
        self._hold_delays = hold_delays
        self._state: _BatchState[T] = _BatchState(send_batch, name, max_concurrent_sends, envelopes, send_timeout)
        self._engine: BatchEngine[_Pending[T]] = BatchEngine(
            self._state.deliver,
            name=name,
            window=flush_interval,
            max_batch_size=max_batch_size,
        )
        _lifecycle.register(self._state)
        # An unreferenced dispatcher drains in the background; its worker then leaves and its
        # send threads time out. At interpreter exit the lifecycle drain handles it instead.
        self._init_closing(self._engine.close_unreferenced)
        _lifecycle.register(self)  # for the fork reset and the immediate switch; held weakly
        if _immediate.active():
            self._set_immediate(True)

    @property
    def max_batch_size(self) -> int:
        """The most messages one ``send_batch`` call gets."""
        return self._engine.max_batch_size

    @property
    def flush_interval(self) -> float:
        """Seconds a target's first message waits before a partial batch goes."""
        return self._engine.window

    @property
    def max_concurrent_sends(self) -> int:
        """The most ``send_batch`` calls running at once."""
        return self._state.max_concurrent_sends

    @property
    def accepts_delay_seconds(self) -> bool:
        """Whether ``submit`` takes a ``delay_seconds`` (``envelopes=True`` or ``hold_delays=True``).

        :class:`~threaddispatch.buffered.AsyncDispatcher` reads it to refuse a delay at ``put``.
        """
        return self._hold_delays or self._state.envelopes

    def submit(self, message: T, target: str, *, delay_seconds: float | None = None) -> Future[str | None]:
        """Queue ``message`` for ``target`` and return a Future that gets its id or its exception.

        Never blocks. ``delay_seconds`` (a finite number >= 0) goes to ``send_batch`` on the
        message's envelope with ``envelopes=True``, or is held here with ``hold_delays=True``
        (see the class docstring); otherwise a delay raises ConfigurationError. The caller's
        contextvars context is captured with the message. Cancelling the Future before the
        batch is sent keeps the message out of it. Raises DispatcherClosedError after
        :meth:`close`.
        """
        if not isinstance(target, str) or not target:
            raise ConfigurationError(f"target must be a non-empty str, got {target!r}")
        delay = None if delay_seconds is None else self._check_delay(delay_seconds)
        future: Future[str | None] = LazyFuture()
        self._accept(_Pending(message, future, delay, contextvars.copy_context()), target)
        return future

    def _hand_off(
        self,
        handed: list[tuple[tuple[T, int | None, contextvars.Context | None], object]],
        target: str,
        settle: Settle,
    ) -> list[tuple[object, BaseException]]:
        """:meth:`submit` without Futures, for :class:`~threaddispatch.buffered.AsyncDispatcher`, in order.

        ``handed`` holds ``((message, delay_seconds or None, context or None), token)``. Once
        the batch holding a message was sent or failed, ``settle`` gets ``[(token, error or
        None), ...]`` for that batch's hand-offs that share it, on a send thread (or, past
        close()'s deadline, on the thread that fails them). A message runs in its
        ``context`` (None: the caller's). Returns ``(token, error)`` for each message
        refused as :meth:`submit` would refuse it (closed, a delay it cannot take); never raises.
        """
        refused: list[tuple[object, BaseException]] = []
        put = self._engine.put
        state = self._state
        for (message, delay_seconds, context), token in handed:
            captured = contextvars.copy_context() if context is None else context
            try:
                if delay_seconds is None and not state.closed:  # the common case: straight to the lane
                    put(_Pending(message, None, None, captured, settle=settle, token=token), target)
                    continue
                delay = None if delay_seconds is None else self._check_delay(delay_seconds)
                self._accept(_Pending(message, None, delay, captured, settle=settle, token=token), target)
            except Exception as error:  # noqa: BLE001 - refused: that message fails, the others go on
                refused.append((token, error))
        return refused

    def _accept(self, pending: _Pending[T], target: str) -> None:
        """Queue ``pending`` for ``target`` (held first when it carries a delay and ``hold_delays``)."""
        if self._state.closed:
            raise DispatcherClosedError(
                f"BatchedDispatcher {self.name!r} is closed; {show(pending.message)} was not accepted"
            )
        if self._hold_delays:
            delay, pending.delay = pending.delay, None
            if delay:
                self._engine.put_later(pending, target, delay)
                return
        self._engine.put(pending, target)

    def _set_immediate(self, on: bool) -> None:
        """Swap ``submit`` for the immediate one (on) or back; idempotent, never blocks.

        Called by the immediate switch (testing.immediate()) on any thread, and by the
        constructor inside a block; the normal path pays nothing for it. ``_hand_off`` is
        left alone: an immediate AsyncDispatcher calls ``dispatch`` (which submits) instead.
        """
        if on:
            self.submit = self._submit_now  # type: ignore[method-assign]
        else:
            self.__dict__.pop("submit", None)

    def _submit_now(self, message: T, target: str, *, delay_seconds: float | None = None) -> Future[str | None]:
        """Immediate ``submit``: what is queued goes first, then ``send_batch(target, [message])`` runs here.

        A ``hold_delays`` delay is not waited for; with ``envelopes`` it is on the envelope.
        """
        if not isinstance(target, str) or not target:
            raise ConfigurationError(f"target must be a non-empty str, got {target!r}")
        delay = None if delay_seconds is None else self._check_delay(delay_seconds)
        future: Future[str | None] = LazyFuture()
        delay = None if self._hold_delays else delay
        self._send_now(_Pending(message, future, delay, contextvars.copy_context()), target)
        return future

    def _send_now(self, pending: _Pending[T], target: str) -> None:
        state = self._state
        if state.closed:
            raise DispatcherClosedError(
                f"BatchedDispatcher {self.name!r} is closed; {show(pending.message)} was not accepted"
            )
        engine = self._engine
        if (engine.pending() or engine.in_flight()) and not state.in_send():
            engine.flush(None)  # what was queued before the switch goes first, in order
        state.send_now(target, [pending])

    def _check_delay(self, delay_seconds: object) -> float:
        """``delay_seconds`` as given when valid and this dispatcher can honour it; else ConfigurationError."""
        seconds = check_seconds("delay_seconds", delay_seconds)
        if not self.accepts_delay_seconds:
            raise ConfigurationError(
                f"BatchedDispatcher {self.name!r}: delay_seconds={delay_seconds!r} cannot reach "
                f"send_batch(target, messages); create it with envelopes=True to get the delay per message, "
                f"or hold_delays=True to hold the message in this process"
            )
        return delay_seconds if isinstance(delay_seconds, int) else seconds

    def dispatch(
        self, message: T, target: str, *, delay_seconds: int | None = None, timeout: float | None = None
    ) -> str | None:
        """Send ``message`` to ``target`` in the next batch and return its id; raise its error on failure.

        Blocks until the batch holding it was sent, up to ``timeout`` seconds (None: no
        limit), then raises DispatchTimeoutError (the message may still be sent later).
        Do not call it from inside ``send_batch``: the batch could wait for its own slot.
        Raises DispatcherClosedError after :meth:`close`.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        future = self.submit(message, target, delay_seconds=delay_seconds)
        try:
            return future.result(timeout)
        except (TimeoutError, FutureTimeoutError):
            # Both: before 3.11, Future.result raises concurrent.futures.TimeoutError, which
            # is not the builtin; from 3.11 on the two are one class.
            if future.done():
                raise  # send_batch's own TimeoutError for this message
            raise DispatchTimeoutError(
                f"BatchedDispatcher {self.name!r}: {show(message)} was not sent within {timeout}s"
            ) from None

    def flush(self, timeout: float | None = None) -> bool:
        """Send every message queued before this call now and wait until those sends are done.

        Blocks up to ``timeout`` seconds (None: no limit), even if ``send_batch`` hangs.
        Returns whether all of them were sent (or failed, each Future says which) in time.
        Called from inside ``send_batch`` it cannot wait for its own batch and returns False.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        if self._state.in_send():
            return False  # called by send_batch: the batch it runs in cannot settle while we wait
        return self._engine.flush(timeout)

    def _begin_close(self) -> None:
        self._state.stop_intake()

    def _finish_close(self, deadline: float | None) -> bool:
        """Send everything queued and stop the threads by ``deadline``; past it, queued messages fail
        with DispatchTimeoutError. Called from inside ``send_batch`` it starts the close and returns False."""
        state = self._state
        state.give_up_by(deadline)
        if state.in_send():
            # Called by send_batch: the batch it runs in cannot finish while we wait for it.
            self._engine.begin_close()
            return False
        drained = self._engine.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        pool_done = state.pool.shutdown(None if deadline is None else max(0.0, deadline - time.monotonic()))
        # Its idle runners leave; an abandoned call is left to end on its own (not waited for).
        state.caller.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if drained and pool_done:
            _lifecycle.unregister(state)
        with state.mutex:
            return drained and pool_done and state.failed == state.failed_at_close

    def stats(self) -> dict[str, int]:
        """Counters and gauges: submitted, sent, failed, cancelled, batches, calls, pending, in_flight, sending.

        With ``send_timeout``: call_timeouts (sends that ran past it) and the gauge
        abandoned_calls (their threads still running); both 0 without it.
        """
        engine = self._engine
        state = self._state
        pending = engine.pending()
        calls = state.caller.stats()
        with state.mutex:
            return {
                "submitted": engine.taken + pending,
                "sent": state.sent,
                "failed": state.failed,
                "cancelled": state.cancelled,
                "batches": engine.batches,
                "calls": state.calls,
                "pending": pending,
                "in_flight": engine.in_flight(),
                "sending": state.sending,
                "abandoned_calls": calls["abandoned_calls"],
                "call_timeouts": calls["call_timeouts"],
            }

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return 0, 0  # the engine and the pool are registered themselves and drain the messages

    def _reset_after_fork(self) -> None:
        """In a forked child: a fresh close lock (the state, engine and pool reset themselves)."""
        self._reset_closing_after_fork()

    def __repr__(self) -> str:
        if getattr(self, "_closed", None) is None:  # never raises, even for a failed constructor
            return f"<BatchedDispatcher {getattr(self, 'name', None)!r} not constructed>"
        state = "closed" if self._closed else "open"
        return (
            f"<BatchedDispatcher {self.name!r} max_batch_size={self.max_batch_size} "
            f"flush_interval={self.flush_interval} max_concurrent_sends={self.max_concurrent_sends} {state}>"
        )
