"""AsyncDispatcher: a bounded buffer handed to a dispatcher one message at a time, with a failure loop.

The face of TypeQueue's ``AsyncDispatcher``: the public :class:`AsyncDispatcher`
(setup, start, stop, counters) and its producer side, the :class:`Sender`. The runtime
they drive (the buffer and the two loops) is ``_buffered_state._AsyncState``; the
interfaces a dispatcher implements (:class:`Dispatcher`, :class:`SubmittingDispatcher`)
and :class:`FailedMessage` are in ``_buffered_types`` and exported here. When the
dispatcher offers ``submit`` (as :class:`~threaddispatch.batched.BatchedDispatcher`
does), the loop hands messages over without waiting for each send and batching happens
behind it, on the engine; failures come back and reach the same failure loop.
With ``spool=PATH`` the Sender is a ``_SpooledSender``, which makes each message durable
before it is buffered; the loops settle it in the spool where they count it sent or failed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from threaddispatch import _immediate, _lifecycle
from threaddispatch._buffered_state import _AsyncState
from threaddispatch._buffered_types import (
    Dispatcher,
    FailedMessage,
    SubmittingDispatcher,
    _from_body,
    _spool_body,
    _spooled_entry,
    in_context,  # noqa: F401 - importable from here, as before
)
from threaddispatch._spool import Spool, SpoolDeadLetter, SpoolSync
from threaddispatch._validate import check_path, check_positive_int, check_wait
from threaddispatch.backoff import RetryPolicy
from threaddispatch.errors import ConfigurationError, DispatcherClosedError, InvalidStateError, StoreError
from threaddispatch.metrics import Metrics, check_metrics

__all__ = ["AsyncDispatcher", "Dispatcher", "FailedMessage", "Sender", "SubmittingDispatcher"]

T = TypeVar("T")


class Sender(Generic[T]):
    """The producer side of an :class:`AsyncDispatcher`, returned by :meth:`AsyncDispatcher.setup`.

    Thread-safe: any number of threads may put. Holds its AsyncDispatcher, so keeping
    the sender keeps the dispatcher alive.
    """

    __slots__ = ("_carry_context", "_dispatcher", "_state")

    def __init__(self, dispatcher: AsyncDispatcher[T], state: _AsyncState[T], carry_context: bool) -> None:
        self._dispatcher = dispatcher
        self._state = state
        self._carry_context = carry_context

    def put(self, message: T, timeout: float | None = None, *, delay_seconds: int | None = None) -> None:
        """Add ``message`` to the buffer, waiting for room while it is full (back-pressure).

        ``delay_seconds`` (None, or whole seconds >= 0) is not held here: it is passed to
        the dispatcher with the message (``dispatch(message, target, delay_seconds=...)``),
        as SQS ``DelaySeconds``. With ``carry_context=True`` the caller's :mod:`contextvars`
        context is captured here and the dispatch runs in it.

        Blocks up to ``timeout`` seconds (None: until there is room), then raises
        QueueFullError. Raises DispatcherClosedError after ``stop()``, including when the
        dispatcher stops while this call waits: a message is either accepted (and then
        dispatched or reported to the error handler) or refused with an exception.
        Called from the error handler it never waits: on a full buffer it raises
        QueueFullError at once (the dispatch loop may be waiting for the handler); so
        does a put on the dispatch loop itself (from ``dispatch``, or a BatchedDispatcher's
        ``send_batch`` the loop runs), which alone could make room.
        """
        if timeout is not None:
            timeout = check_wait("timeout", timeout)
        if delay_seconds is not None:
            delay_seconds = self._state.check_delay(delay_seconds)
        state = self._state
        entry = (message, delay_seconds, contextvars.copy_context() if self._carry_context else None)
        # _AsyncState.put's common case inline (a call less per message): open (not stopped, no restart
        # due, not immediate) and room. Anything else (full, stopped, a forked child's first put,
        # immediate mode) goes the whole way below.
        with state.mutex:
            if state.put_open and len(state.buffer) < state.capacity:
                state.buffer.append(entry)
                if state.loop_waiting:
                    state._wake_loop()
                return
        state.put(entry, timeout)

    def try_put(self, message: T, *, delay_seconds: int | None = None) -> bool:
        """Add ``message`` if the buffer has room; return False if it is full. Never blocks.

        ``delay_seconds`` (and with ``carry_context``, the caller's context) go with it, as for :meth:`put`.
        Raises DispatcherClosedError after ``stop()``.
        """
        if delay_seconds is not None:
            delay_seconds = self._state.check_delay(delay_seconds)
        context = contextvars.copy_context() if self._carry_context else None
        return self._state.try_put((message, delay_seconds, context))

    @property
    def dispatcher(self) -> AsyncDispatcher[T]:
        """The AsyncDispatcher this sender feeds."""
        return self._dispatcher

    def __len__(self) -> int:
        """Messages waiting in the buffer now (not counting one being sent)."""
        return len(self._state.buffer)

    def __repr__(self) -> str:
        return f"<Sender to {self._state.target!r} buffer={len(self)}/{self._state.capacity}>"


class _SpooledSender(Sender[T]):
    """The Sender of an AsyncDispatcher given a spool: each message is made durable before it is buffered.

    The append is on the caller's thread, after the arguments are checked and before the
    message is in the buffer (PayloadError for a message JSON cannot encode leaves both
    untouched); a message the buffer then refuses (stopped, QueueFullError) leaves the
    spool again. A forked child's state has no spool: it puts as a plain Sender.
    """

    __slots__ = ()

    def put(self, message: T, timeout: float | None = None, *, delay_seconds: int | None = None) -> None:
        spool = self._state.spool
        if spool is None:
            return super().put(message, timeout, delay_seconds=delay_seconds)
        if timeout is not None:
            timeout = check_wait("timeout", timeout)
        if delay_seconds is not None:
            delay_seconds = self._state.check_delay(delay_seconds)
        entry = self._spooled(spool, message, delay_seconds)
        try:
            self._state.put(entry, timeout)
        except BaseException:
            self._unspool(spool, entry)
            raise
        return None

    def try_put(self, message: T, *, delay_seconds: int | None = None) -> bool:
        spool = self._state.spool
        if spool is None:
            return super().try_put(message, delay_seconds=delay_seconds)
        if delay_seconds is not None:
            delay_seconds = self._state.check_delay(delay_seconds)
        entry = self._spooled(spool, message, delay_seconds)
        try:
            accepted = self._state.try_put(entry)
        except BaseException:
            self._unspool(spool, entry)
            raise
        if not accepted:
            self._unspool(spool, entry)
        return accepted

    def _spooled(self, spool: Spool, message: T, delay: int | None) -> Any:
        """``message`` appended to the spool (durable on return), as the buffer's entry."""
        state = self._state
        try:
            seq = spool.append(_spool_body(message, delay))
        except StoreError:
            if state.closing:  # stopped, its spool closed with it: the closed error, as without a spool
                raise DispatcherClosedError(f"{state.describe()} is stopped; the message was not accepted") from None
            raise
        return _spooled_entry(seq, message, delay, contextvars.copy_context() if self._carry_context else None)

    def _unspool(self, spool: Spool, entry: Any) -> None:
        """A spooled message was never accepted: it leaves the spool."""
        with contextlib.suppress(StoreError):  # stopped meanwhile: the spool is gone with it
            spool.ack((entry.seq,))


class AsyncDispatcher(_lifecycle.Closing, Generic[T]):
    """Buffers messages and hands them one at a time to ``dispatcher`` on a daemon thread.

    ``setup(buffer_len)`` returns the :class:`Sender` producers put messages into;
    ``start()`` starts the dispatch loop and the failure loop; ``stop()`` drains and
    stops them. Every message that fails for good (after ``retry``, if given) reaches
    ``error_handler(FailedMessage(message, error, target_queue))`` on the failure loop;
    without a handler it is lost and logged on the shared drop-log cadence: one WARNING with
    the first loss's traceback, then at most one a minute with the count since, and one INFO
    once messages are delivered again (``stats()["failed"]`` counts every one). All methods
    are thread-safe.

    When ``dispatcher`` has ``submit(message, target) -> Future`` (a
    :class:`~threaddispatch.batched.BatchedDispatcher` does), the loop uses it and does
    not wait for each send; at most ``max_in_flight`` messages are handed over and not
    yet settled at a time, so memory stays bounded end to end. ``stop()`` calls the
    dispatcher's ``flush(timeout)`` if it has one; it never closes the dispatcher.

    The failure backlog is bounded too: while ``max_failures_pending`` failed messages
    (default: ``buffer_len``) wait for the error handler, the dispatch loop takes no
    message (back-pressure: the buffer fills and ``put`` blocks), as the seed's bounded
    failure channel blocks its dispatch loop. With a plain dispatcher the backlog never
    exceeds the bound; with ``submit``, messages already handed over may still fail into
    it, so it holds at most ``max_failures_pending + max_in_flight - 1``. The error
    handler must not wait for room in the buffer (the loop may be waiting for it):
    ``put`` called from the handler on a full buffer raises QueueFullError at once.

    Per message, ``Sender.put(message, delay_seconds=n)`` passes the delay on to the
    dispatcher (``dispatch(message, target, delay_seconds=n)``, or ``submit`` likewise; the
    keyword is left out for a message put without one); it is never held here. With
    ``carry_context=True``, ``put`` captures the producer's :mod:`contextvars` context
    (``copy_context()``) and the dispatch or submit of that message runs in it, so
    logging and tracing context (a trace id in a ContextVar) reach the send; the error
    handler runs in a copy of it, and what ``dispatch`` sets in a ContextVar stays in
    that message's context. It is opt-in because it costs about a fifth of the hand-off
    per message (benchmarks/bench_buffered.py); without it, dispatch runs in the dispatch
    loop's own context.

    User code may be ``async def`` (or return an awaitable): ``dispatch``, ``submit`` (its
    awaited value is the Future), ``flush`` and the error handler; it is awaited on the
    calling loop thread's private event loop. The retry policy's predicate and backoff are
    called synchronously. With ``dispatch_timeout`` (seconds), each ``dispatch`` or
    ``submit`` runs on a helper thread and fails with DispatchTimeoutError past it (retried
    by ``retry`` or reported like any failure); a coroutine is cancelled, a plain call's
    thread is abandoned (left to finish, its late result logged and ignored; at most 4 at a
    time, past that later calls wait within their own timeout) and dispatch goes on.
    ``stats()`` counts them. Without it, dispatch runs on the dispatch loop itself.

    ``metrics`` (a :class:`~threaddispatch.metrics.Metrics`; None: none) reads ``stats()``
    when it collects and times each ``dispatch`` call; a ``submit`` (a BatchedDispatcher)
    is timed by that dispatcher's own ``metrics``.

    Retries: every failure goes to ``retry.next_delay`` (the one decision): ``Cancel`` is
    final at once; ``Retry(delay)`` retries after that delay, within ``max_attempts``; a bad
    delay is final (logged; the message reaches the error handler with its Retry error).
    A message waiting for its retry waits on the dispatch loop's delay queue.

    A BaseException that is not an Exception (``KeyboardInterrupt``, ``SystemExit``,
    ``GeneratorExit``) raised by user code on a loop (``dispatch``, ``submit``, ``flush``,
    the retry predicate or backoff, the error handler) is contained like any error:
    raised by ``dispatch`` or ``submit`` it fails that message, which is retried or
    reported with that error as its ``FailedMessage.error``, and the loops go on. A loop
    thread cannot get a KeyboardInterrupt from the user pressing Ctrl-C (Python delivers
    it to the main thread only), so one raised on a loop came from user code.

    ``spool`` (a file path; None: none) makes the buffer crash-durable: every message a
    ``put``/``try_put`` accepts (with its ``delay_seconds``; its context is not kept) is
    appended to that SQLite file before the call returns, so it must be JSON-encodable
    (PayloadError at the put otherwise); it leaves the file once dispatched, or when the
    user gave it up (its ``submit`` Future cancelled; a put refused never stays). A
    message that fails for good moves to the spool's dead letters (the error handler is
    still called): :meth:`spool_dead_letters` lists them, :meth:`replay_spool_dead_letters`
    puts them back. A new dispatcher on the same spool reads what a previous owner left at
    construction and ``setup()`` buffers it, in order, before any new message (past
    ``buffer_len`` if need be). Delivery is at-least-once across a crash: what was being
    dispatched at the crash is dispatched again, and so may be up to 64 messages dispatched
    just before it: dispatched messages leave the file in groups, one commit per group (or
    10 ms after the last one when no message follows; behind a BatchedDispatcher once per
    batch, or per run of batches the loop sent itself). ``spool_sync`` is ``"normal"`` (survives a
    process crash) or ``"full"`` (also power loss). One dispatcher owns a spool at a time
    (SpoolOwnedError for a second); ``stop()`` closes it after the drain (a stop past its
    timeout closes it too: what the loops still dispatch then stays in the file and is
    dispatched again by its next owner). A forked child's dispatcher does not use its
    parent's spool.
    """

    def __init__(
        self,
        dispatcher: Dispatcher[T],
        target_queue: str,
        error_handler: Callable[[FailedMessage[T]], object] | None = None,
        *,
        retry: RetryPolicy | None = None,
        max_in_flight: int = 1000,
        max_failures_pending: int | None = None,
        carry_context: bool = False,
        dispatch_timeout: float | None = None,
        metrics: Metrics | None = None,
        spool: str | os.PathLike[str] | None = None,
        spool_sync: SpoolSync = "normal",
    ) -> None:
        if not callable(getattr(dispatcher, "dispatch", None)):
            raise ConfigurationError(f"dispatcher must have a dispatch(message, target) method, got {dispatcher!r}")
        if not isinstance(target_queue, str) or not target_queue:
            raise ConfigurationError(f"target_queue must be a non-empty str, got {target_queue!r}")
        if error_handler is not None and not callable(error_handler):
            raise ConfigurationError(f"error_handler must be callable, got {error_handler!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        check_positive_int("max_in_flight", max_in_flight)
        if max_failures_pending is not None:
            check_positive_int("max_failures_pending (or None)", max_failures_pending)
        if not isinstance(carry_context, bool):
            raise ConfigurationError(f"carry_context must be a bool, got {carry_context!r}")
        if dispatch_timeout is not None:
            dispatch_timeout = check_wait("dispatch_timeout", dispatch_timeout, allow_zero=False)
        checked_metrics = check_metrics(metrics)
        if spool_sync not in ("normal", "full"):
            raise ConfigurationError(f"spool_sync must be 'normal' or 'full', got {spool_sync!r}")
        if spool is not None:
            check_path("spool", spool)
        # Last of the checks: it takes the ownership (SpoolOwnedError) and reads what was left.
        opened = None if spool is None else Spool(spool, sync=spool_sync)
        self._left: list[tuple[int, Any]] = []  # a previous owner's messages, buffered by setup()
        if opened is not None:
            try:
                self._left = self._read_left(opened)
            except BaseException:
                opened.close()  # a failed constructor gives the ownership up
                raise
        self._carry_context = carry_context
        self._state: _AsyncState[T] = _AsyncState(
            dispatcher,
            target_queue,
            error_handler,
            retry=retry,
            max_in_flight=max_in_flight,
            max_failures_pending=max_failures_pending,
            dispatch_timeout=dispatch_timeout,
        )
        self._sender: Sender[T] | None = None
        self._state.recorder = checked_metrics.bind(self)
        self._state.use_spool(opened)
        _lifecycle.register(self._state)
        # An unreferenced dispatcher stops: its loops drain what they hold and leave. At
        # interpreter exit the lifecycle drain handles it instead (in its order).
        self._init_closing(self._state.stop_unreferenced)
        if _immediate.active():  # the state is registered, so the switch reaches it from now on
            self._state._set_immediate(True)

    def setup(self, buffer_len: int) -> Sender[T]:
        """Create the buffer, ``buffer_len`` messages long, and return the Sender that fills it.

        Call once, before or after ``start()``. ``buffer_len`` counts messages waiting,
        not the one being sent. Raises InvalidStateError if called twice and
        DispatcherClosedError after ``stop()``. Never blocks.
        """
        check_positive_int("buffer_len", buffer_len)
        state = self._state
        with state.mutex:
            if state.closing:
                raise DispatcherClosedError(f"{state.describe()} is stopped")
            if state.is_setup:
                raise InvalidStateError(f"{state.describe()}: setup() was already called")
            state.capacity = buffer_len
            if state.failure_capacity is None:
                state.failure_capacity = buffer_len
            state.is_setup = True
            sender_class = Sender if state.spool is None else _SpooledSender
            self._sender = sender_class(self, state, self._carry_context)
        if self._left:  # a previous owner's messages, before any new one (no put can run yet: no sender returned)
            left, self._left = self._left, []
            state.put_spooled([_spooled_entry(seq, message, delay, None) for seq, (message, delay) in left])
        return self._sender

    @staticmethod
    def _read_left(spool: Spool) -> list[tuple[int, Any]]:
        """What a previous owner left in ``spool``, as (seq, (message, delay)); a foreign entry is dead-lettered."""
        left: list[tuple[int, Any]] = []
        foreign: list[int] = []
        for seq, body in spool.pending():
            parsed = _from_body(body)
            if parsed is None:
                foreign.append(seq)
            else:
                left.append((seq, parsed))
        if foreign:
            spool.dead_letter(foreign, "not an AsyncDispatcher message ([message, delay_seconds])")
        return left

    def spool_dead_letters(self, limit: int = 100) -> list[SpoolDeadLetter]:
        """The spool's dead letters (messages that failed for good), oldest first; at most ``limit``.

        Each ``entry`` is ``[message, delay_seconds]``.
        """
        return self._own_spool().dead_letters(limit)

    def replay_spool_dead_letters(self, seqs: list[int] | None = None) -> int:
        """Put dead letters back in the buffer (all, or those numbered), oldest first; returns how many.

        At most as many as the buffer has room for now (call again for the rest); they keep
        their sequence numbers and leave the spool once dispatched, or go back to the dead
        letters. Raises InvalidStateError before ``setup()``, DispatcherClosedError after ``stop()``.
        """
        spool = self._own_spool()
        state = self._state
        if not state.is_setup:
            raise InvalidStateError(f"{state.describe()}: call setup(buffer_len) before replaying dead letters")
        if state.closing:
            raise DispatcherClosedError(f"{state.describe()} is stopped")
        rows = spool.take_dead_letters(seqs, limit=state.room())
        entries = []
        for seq, body in rows:
            parsed = _from_body(body)
            if parsed is None:  # not ours (read at construction already): back to the dead letters
                spool.dead_letter((seq,), "not an AsyncDispatcher message ([message, delay_seconds])")
            else:
                entries.append(_spooled_entry(seq, parsed[0], parsed[1], None))
        state.put_spooled(entries)
        return len(entries)

    def _own_spool(self) -> Spool:
        spool = self._state.spool
        if spool is None:
            raise ConfigurationError(f"{self._state.describe()} has no spool (pass spool=PATH)")
        return spool

    def start(self) -> None:
        """Start the dispatch loop and the failure loop (two daemon threads). Idempotent; never blocks.

        Raises InvalidStateError before ``setup()`` and DispatcherClosedError after ``stop()``.
        """
        state = self._state
        with state.mutex:
            if state.closing:
                raise DispatcherClosedError(f"{state.describe()} is stopped; it cannot start again")
            if not state.is_setup:
                raise InvalidStateError(f"{state.describe()}: call setup(buffer_len) before start()")
            if not state.started:
                state.start_threads()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop intake, dispatch what is buffered, report every failure, and stop both loops. Idempotent.

        Flushes a dispatcher that has ``flush()``. Blocks up to ``timeout`` seconds
        (None: no limit), even if the dispatcher or the error handler hangs; the loops then
        finish in the background. Returns whether everything was dispatched and every
        failure reported in time, with no message failing during the stop. A stop before
        ``start()`` still dispatches what was buffered. ``close(timeout)`` is the same call.
        """
        return self.close(timeout)

    def _begin_close(self) -> None:
        """Nothing here: intake stops in :meth:`_finish_close`, where ``begin_stop`` sets the flag
        together with the deadline the loops drain by (a loop that saw the flag alone could flush unbounded)."""

    def _finish_close(self, deadline: float | None) -> bool:
        state = self._state
        state.begin_stop(deadline, start_if_idle=True)
        state.join(deadline)
        with state.mutex:
            dispatch_done = state.dispatch_done
        if dispatch_done:
            # The dispatch loop closed the caller as it left; this waits for its idle runners to go.
            # A loop still running (a stop past its timeout) keeps calling through it until it leaves.
            state.caller.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        finished = state.finished()
        if finished:
            _lifecycle.unregister(state)
        if state.spool is not None:
            state.spool.close()  # after the drain; the settles of loops still running are then logged
        with state.mutex:
            return finished and state.failed == state.failed_at_stop

    @property
    def target_queue(self) -> str:
        """The target every message is dispatched to."""
        return self._state.target

    @property
    def dispatcher(self) -> Dispatcher[T]:
        """The dispatcher messages are handed to."""
        return self._state.dispatcher

    @property
    def sender(self) -> Sender[T] | None:
        """The Sender returned by :meth:`setup`, or None before it."""
        return self._sender

    @property
    def running(self) -> bool:
        """Whether the loops were started and ``stop()`` was not called."""
        return self._state.started and not self._state.closing

    @property
    def stopped(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._state.closing

    @property
    def sent(self) -> int:
        """Messages dispatched successfully."""
        return self._state.sent

    @property
    def failed(self) -> int:
        """Messages that failed for good (each reported once to the error handler)."""
        return self._state.failed

    @property
    def retried(self) -> int:
        """Retries scheduled (a message retried twice counts two)."""
        return self._state.retried

    @property
    def buffered(self) -> int:
        """Messages accepted into the buffer since setup."""
        state = self._state
        with state.mutex:
            return state.buffered

    def stats(self) -> dict[str, int]:
        """Counters and gauges, read at one instant.

        Counters: buffered, sent, failed, retried, rejected, handler_errors, and
        failure_stalls (times the dispatch loop waited for the error handler to catch up).
        Gauges: waiting (in the buffer), in_flight (taken, not settled) and
        failures_waiting (failed for good, not yet handed to the error handler).
        With ``dispatch_timeout``: call_timeouts (calls that ran past it) and the gauge
        abandoned_calls (their threads still running); both 0 without it.
        """
        state = self._state
        calls = state.caller.stats()
        with state.mutex:
            return {
                "buffered": state.buffered,
                "sent": state.sent,
                "failed": state.failed,
                "retried": state.retried,
                "rejected": state.rejected,
                "handler_errors": state.handler_errors,
                "waiting": len(state.buffer),
                "in_flight": state.in_flight,
                "failures_waiting": len(state.failures),
                "failure_stalls": state.failure_stalls,
                "abandoned_calls": calls["abandoned_calls"],
                "call_timeouts": calls["call_timeouts"],
            }

    def __enter__(self) -> AsyncDispatcher[T]:
        """Start the loops (``setup()`` must have been called) and return self; leaving the block stops them."""
        self.start()
        return self

    def __repr__(self) -> str:
        state = getattr(self, "_state", None)  # never raises, even for a failed constructor
        if state is None:
            return "<AsyncDispatcher not constructed>"
        status = "stopped" if state.closing else "running" if state.started else "not started"
        return f"<AsyncDispatcher {state.target!r} {status} buffer={len(state.buffer)}/{state.capacity}>"
