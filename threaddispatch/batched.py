"""BatchedDispatcher: a Dispatcher that groups messages per target and sends them in batches.

The face of TypeQueue's ``BatchedDispatcher`` on the shared
:class:`~threaddispatch._engine.BatchEngine`: one lane per target, the engine's window is
``flush_interval`` and its size trigger ``max_batch_size``. What runs the sends (send
slots, the pool, settling outcomes) is ``_batched_state._BatchState``; this module is
the public face (submit, dispatch, flush, close, immediate mode).

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
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from operator import itemgetter
from typing import Any, Generic, TypeVar

from threaddispatch import _immediate, _lifecycle
from threaddispatch._batched_state import Envelope, Settle, _BatchState, _Pending, _SubmitFuture
from threaddispatch._engine import BatchEngine
from threaddispatch._future import LazyFuture
from threaddispatch._trace import make_tracing
from threaddispatch._validate import check_positive_int, check_seconds, check_text, check_wait, show
from threaddispatch.errors import ConfigurationError, DispatcherClosedError, DispatchTimeoutError
from threaddispatch.metrics import Metrics, check_metrics

__all__ = ["BatchedDispatcher", "Envelope", "SendBatch", "SendEnvelopes"]

T = TypeVar("T")

_Results = Sequence["str | BaseException | None"]
#: ``send_batch(target, messages)``: returns one result per message, an id (or None) or an exception
#: (an ``async def`` one returns them from its coroutine).
SendBatch = Callable[[str, list[T]], "_Results | Awaitable[_Results]"]
#: ``send_batch(target, envelopes)`` with ``envelopes=True``: one :class:`Envelope` per message, same results.
SendEnvelopes = Callable[[str, list[Envelope[T]]], "_Results | Awaitable[_Results]"]

_names = iter(range(1, 1 << 62))
_copy_context = contextvars.copy_context  # a global load less per submit

# A hand-off token is its entry (message, delay_seconds, context): its delay.
_second = itemgetter(1)


class BatchedDispatcher(_lifecycle.Closing, Generic[T]):
    """A :class:`~threaddispatch.buffered.Dispatcher` that sends messages in batches per target.

    ``send_batch(target, messages)`` runs on up to ``max_concurrent_sends`` daemon threads
    (``threaddispatch-<name>-send-<n>``) and returns one result per message: an id (or
    None) for a sent message, an exception for a failed one. Behind an AsyncDispatcher,
    while sends return at once (under 0.2 ms on average) and a send slot is free, its
    dispatch loop sends its whole batches itself, in that slot (a thread switch would
    cost more than such a send); slower sends go to the send threads, which overlap them. A target's batch goes when
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

    ``metrics`` (a :class:`~threaddispatch.metrics.Metrics`; None: none) gets the batch
    size and duration of each send (``messaging.destination.name`` is its target) and
    reads ``stats()`` when it collects; without it a send pays one ``is None`` test.

    ``tracer_provider`` (an OpenTelemetry TracerProvider, extra ``otel``; None: no
    tracing, and nothing is captured) traces the sends: ``submit`` captures the caller's
    current span, and each ``send_batch`` call runs inside a PRODUCER span ``send
    <target>`` (``messaging.destination.name``, ``messaging.batch.message_count``) linked
    to the spans of the messages it carries, as OpenTelemetry's messaging conventions do
    for a batch publish; the spans ``send_batch`` makes are its children. Behind an
    AsyncDispatcher a message's producer span is known only with ``carry_context=True``
    (it is read from the context captured at ``put``); without it the hand-off runs on
    the dispatch loop and the send span has no link for that message.
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
        metrics: Metrics | None = None,
        tracer_provider: object = None,
    ) -> None:
        if not callable(send_batch):
            raise ConfigurationError(f"send_batch must be callable, got {send_batch!r}")
        checked_metrics = check_metrics(metrics)
        tracing = make_tracing(tracer_provider, "batched")
        check_positive_int("max_batch_size", max_batch_size)
        flush_interval = check_seconds("flush_interval", flush_interval)
        check_positive_int("max_concurrent_sends", max_concurrent_sends)
        if name is None:
            name = f"batched-{next(_names)}"
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str, got {name!r}")
        else:
            check_text("name", name)  # no NUL nor lone surrogate: it names the threads and the log lines
        for flag, value in (("envelopes", envelopes), ("hold_delays", hold_delays)):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{flag} must be a bool, got {value!r}")
        if send_timeout is not None:
            send_timeout = check_wait("send_timeout", send_timeout, allow_zero=False)
        self.name = name
        self._hold_delays = hold_delays
        self._state: _BatchState[T] = _BatchState(send_batch, name, max_concurrent_sends, envelopes, send_timeout)
        self._engine: BatchEngine[_Pending[T]] = BatchEngine(
            self._state.deliver,
            name=name,
            window=flush_interval,
            max_batch_size=max_batch_size,
        )
        self._state.engine = self._engine
        self._put = self._engine.put  # bound once: submit's hot path
        self._state.recorder = checked_metrics.bind(self)
        self._state.tracing = self._tracing = tracing
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
        tracing = self._tracing
        span = None if tracing is None else tracing.capture()
        if delay_seconds is not None:
            delay = self._check_delay(delay_seconds)
            delayed: Future[str | None] = LazyFuture()
            self._accept(_Pending(message, delayed, delay, contextvars.copy_context(), None, None, span), target)
            return delayed
        if self._state.closed:  # _accept's check, inline: the common call pays one call less
            raise DispatcherClosedError(f"BatchedDispatcher {self.name!r} is closed; {show(message)} was not accepted")
        future = _SubmitFuture()  # the Future and the lane's entry in one
        future.message = message
        future.context = _copy_context()
        future.span = span
        self._put(future, target)  # lock-free, mostly
        return future

    def _hand_off(
        self,
        handed: list[tuple[T, int | None, contextvars.Context | None]],
        target: str,
        settle: Settle,
    ) -> list[tuple[Any, BaseException]]:
        """:meth:`submit` without Futures, for :class:`~threaddispatch.buffered.AsyncDispatcher`, in order.

        ``handed`` holds ``(message, delay_seconds or None, context or None)`` entries, each
        its message's token (told apart by identity). Once the batch holding a message was sent or failed,
        ``settle(tokens, errors)`` gets the tokens of that batch's hand-offs that share it and
        their errors (None for one sent; ``errors`` None when all were sent), on a send
        thread (or, past close()'s deadline, on the thread that fails them). While sends are
        quick, whole batches of a delay-free hand-off are sent before this returns, on the
        calling thread in a send slot (:meth:`_hand_inline`), and ``settle`` gets all of
        them in one call. A message runs in its ``context`` (None: the caller's). Messages
        without a delay go to the lane together, in one acquisition of the engine's lock
        (``BatchEngine.put_many``). Returns ``(token, error)`` for each message refused as
        :meth:`submit` would refuse it (closed, a delay it cannot take); never raises.
        """
        # The caller's context, captured once for all: only without envelopes, where each message
        # gets its own (send_batch may run two envelopes' contexts at once, and one Context cannot be
        # entered twice at a time). send_batch itself runs in a copy.
        caller = None if self._state.envelopes else contextvars.copy_context()
        if self._tracing is None and self._state.max_concurrent_sends > 1 and self._state.quick():
            refused, rest = self._hand_inline(handed, target, settle, caller)
            return refused + self._hand_queued(rest, target, settle, caller) if rest else refused
        return self._hand_queued(handed, target, settle, caller)

    def _hand_inline(
        self, handed: list[Any], target: str, settle: Settle, caller: contextvars.Context | None
    ) -> tuple[list[tuple[Any, BaseException]], list[Any]]:
        """Send the whole batches of a delay-free hand-off on the calling thread; (refused, the rest to queue).

        Sends are quick (a thread switch would cost more than the send): while a send slot
        is free, ``_BatchState.send_inline`` sends them here, in order. Messages already in
        ``target``'s lane go first: a partial batch there is taken out and completed by the
        first hand-offs (sent here too); whole batches there are completed through the lane.
        With tracing (a span per message) or a single send slot (strict order through the
        lane) nothing is sent inline.
        """
        size = self._engine.max_batch_size
        if len(handed) < size or set(map(_second, handed)) != {None}:  # a C loop: no frame per message
            return [], handed
        refused: list[tuple[Any, BaseException]] = []
        waiting = self._engine.lane_length(target)
        if waiting >= size:  # whole batches wait there: they go first, through the lane; complete its last one
            head = -waiting % size
            refused = self._hand_queued(handed[:head], target, settle, caller) if head else []
            handed = handed[head:]
            waiting = 0
        sent = self._state.send_inline(target, handed, settle, caller, size, waiting)
        return refused, handed[sent:]

    def _hand_queued(
        self, handed: list[Any], target: str, settle: Settle, caller: contextvars.Context | None
    ) -> list[tuple[Any, BaseException]]:
        """Queue hand-offs in ``target``'s lane (delay-free runs under one lock), in order; returns those refused."""
        refused: list[tuple[Any, BaseException]] = []
        run: list[_Pending[T]] = []  # delay-free messages not in the lane yet, in order
        tracing = self._tracing
        for token in handed:
            message, delay_seconds, given = token
            context = given if given is not None else caller if caller is not None else contextvars.copy_context()
            # The producer's span is in its captured context; without one the caller is a loop thread: no span.
            span = None if tracing is None or given is None else given.run(tracing.capture)
            pending = _Pending(message, None, None, context, settle, token, span)  # positional: once per message
            if delay_seconds is None:
                run.append(pending)
                continue
            if run:
                refused += self._put_run(run, target)
                run = []
            try:
                pending.delay = self._check_delay(delay_seconds)
                self._accept(pending, target)
            except Exception as error:  # noqa: BLE001 - refused: that message fails, the others go on
                refused.append((token, error))
        if run:
            refused += self._put_run(run, target)
        return refused

    def _put_run(self, run: list[_Pending[T]], target: str) -> list[tuple[Any, BaseException]]:
        """Queue delay-free hand-offs for ``target`` under one lock; all refused if closed."""
        try:
            if self._state.closed:
                raise DispatcherClosedError(
                    f"BatchedDispatcher {self.name!r} is closed; {len(run)} messages were not accepted"
                )
            self._engine.put_many(run, target)
        except Exception as error:  # noqa: BLE001 - refused: these messages fail, the caller goes on
            return [(pending.token, error) for pending in run]
        return []

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
        span = None if self._tracing is None else self._tracing.capture()
        self._send_now(_Pending(message, future, delay, contextvars.copy_context(), span=span), target)
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
            timeout = check_wait("timeout", timeout)
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
            timeout = check_wait("timeout", timeout)
        if self._state.in_send():
            return False  # called by send_batch: the batch it runs in cannot settle while we wait
        deadline = None if timeout is None else time.monotonic() + timeout
        inline = self._state.wait_inline(deadline)  # hand-offs being sent on their own threads
        return self._engine.flush(None if deadline is None else max(0.0, deadline - time.monotonic())) and inline

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
        inline = state.wait_inline(deadline)  # refused from now on (closed): these are the last
        drained = self._engine.close(None if deadline is None else max(0.0, deadline - time.monotonic())) and inline
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
                "submitted": engine.taken + pending + state.inline_taken,
                "sent": state.sent,
                "failed": state.failed,
                "cancelled": state.cancelled,
                "batches": engine.batches + state.inline_batches,
                "calls": state.calls,
                "pending": pending,
                "in_flight": engine.in_flight() + len(state.inline_running),
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
