"""The runtime of a BatchedDispatcher: its send slots, its send threads, and how outcomes are settled.

The engine's worker hands each batch to :meth:`_BatchState.deliver`, which runs
``send_batch(target, messages)`` on the shared :class:`~threaddispatch._pool.WorkerPool`
and returns the pool's Future, so the engine settles the batch (and ``flush()`` waits
for it) when the send is done.

Concurrency cap and back-pressure: ``deliver`` takes one of ``max_concurrent_sends``
send slots before it submits, and blocks the engine worker while every slot is busy.
This is deliberate, instead of the engine's ``gate``: the gate holds a lane back for a
whole window each time it says no (adding latency even when a slot frees a moment
later), and the engine ignores it while closing, so the cap would not hold during a
drain. A blocked worker holds the cap always; meanwhile lanes keep filling, so batches
grow fuller under load. Only a ``close()`` deadline ends the wait: past it, what is
still queued fails with DispatchTimeoutError instead of waiting for a hung send.

A message (:class:`_Pending`) gets its outcome through its Future, or, handed over by an
AsyncDispatcher, through its hand-off's ``settle`` once per batch. :class:`Envelope` is
what ``send_batch`` gets per message with ``envelopes=True``.

Inline sends: while sends are quick (``send_seconds``, an average over every send, below
``_QUICK_SEND``), a hand-off's whole batches are sent by the handing thread itself, in a
send slot, without a lane, a ``_Pending`` or a thread switch (:meth:`_BatchState.send_inline`):
for a send that returns at once, a hand-off to a send thread costs more than the send.
They are counted apart (``inline_*``) so ``flush()``, ``close()`` and ``stats()`` see them.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, Generic, TypeVar, cast

from threaddispatch._batched_immediate import call_here
from threaddispatch._buffered_types import in_context
from threaddispatch._engine import BatchEngine
from threaddispatch._future import LazyFuture
from threaddispatch._invoke import ERROR, Outcome, TimedCaller, awaited, call, settled
from threaddispatch._pool import WorkerPool
from threaddispatch._trace import Tracing
from threaddispatch._validate import show
from threaddispatch.errors import DispatcherClosedError, DispatchTimeoutError, ThreadDispatchError
from threaddispatch.metrics import FaceRecorder

T = TypeVar("T")

_log = logging.getLogger("threaddispatch")

# Send threads leave after this long without work. Short, so the threads of a dispatcher
# that was garbage-collected (not closed) do not linger; starting one again is cheap.
_SEND_IDLE_TIMEOUT = 2.0

# The most batches one send slot sends back to back (see _BatchState.send) before it is released.
_CHAIN = 16

# Sends that take less than this on average (seconds) run on the handing-off thread itself
# (_BatchState.send_inline): below it a thread switch to a send thread costs more than the send;
# above it the sends are waits (a network round trip) that the send threads overlap.
_QUICK_SEND = 0.0002

# The weight of the latest send in the running average of send durations.
_SEND_WEIGHT = 0.125

# The most one send adds to that average, as a multiple of _QUICK_SEND: a quick send that waited for
# the GIL or the CPU (a loaded machine) must not turn the hand-offs after it slow for many sends;
# sends that are really slow still take the average past _QUICK_SEND within a few sends.
_SEND_CAP = 4 * _QUICK_SEND

# A batch sent inline that took this long (seconds) is slow itself, whatever the average says: the rest
# of its hand-off goes to the send threads. Far above a GIL switch interval (5 ms), so that a quick
# send that only waited for the GIL or the CPU on a loaded machine does not count.
_SLOW_BATCH = 0.02

_settle_of = attrgetter("settle")
_token_of = attrgetter("token")
_first = itemgetter(0)  # a hand-off token is its entry (message, delay, context)


# The types of the usual outcomes of a sent message (an id, or None): a set of only these needs no further test.
_SENT_TYPES = frozenset((str, type(None)))


def _all_sent(outcomes: list[Any]) -> bool:
    """Whether no outcome is an exception: one test per distinct type, not one per message."""
    kinds = set(map(type, outcomes))
    return kinds <= _SENT_TYPES or not any(issubclass(kind, BaseException) for kind in kinds)


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


class _Pending(Generic[T]):
    """A message in a lane, with how its outcome is reported, its delay to pass on and its submitter's context.

    A submitted message has a ``future``. A message handed over by an AsyncDispatcher
    (:meth:`BatchedDispatcher._hand_off`) has none: ``settle`` gets the outcomes of a
    whole batch at once, each beside its ``token`` (no Future, no lock per message).
    """

    __slots__ = ("context", "delay", "future", "message", "settle", "span", "token")

    def __init__(  # noqa: PLR0917 - positional: made once per message
        self,
        message: T,
        future: Future[str | None] | None,
        delay: float | None,
        context: contextvars.Context,
        settle: Settle | None = None,
        token: object = None,
        span: Any = None,
    ) -> None:
        self.message = message
        self.future = future
        self.delay = delay
        self.context = context
        self.settle = settle
        self.token = token
        self.span = span  # the producer's span context (with tracing on; else None)

    def __repr__(self) -> str:
        return f"message {show(self.message)}"


class _SubmitFuture(LazyFuture, _Pending[Any]):
    """The Future a delay-free ``submit`` returns, and its message's entry in the lane: one object, not two.

    The send code reads it as any :class:`_Pending`: ``future`` is the object itself, and it
    carries no delay, ``settle`` or ``token`` (class attributes, over the slots). ``submit``
    sets ``message``, ``context`` and ``span``. Made without a Python ``__init__`` (LazyFuture's
    is object's), so a submit costs one object and three slot stores instead of two objects
    and a constructor call.
    """

    __slots__ = ()
    delay = None
    settle = None
    token = None

    @property
    def future(self) -> _SubmitFuture:  # type: ignore[override]  # the slot of _Pending, as a read-only self
        return self


#: ``send_batch`` as the send threads call it (the user's, or it inside its send span).
_Send = Callable[[str, list[Any]], object]

#: What a hand-off's ``settle`` gets once per batch: its messages' tokens, and their errors in the
#: same order (None for one sent), or None for the errors when all of them were sent.
Settle = Callable[[list[Any], "list[BaseException | None] | None"], object]


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
        self.inline_batches = 0  # batches sent by send_inline (the engine counts the others)
        self.inline_taken = 0  # messages they carried
        # The running average of send_batch's duration (seconds). Read and written without the lock by
        # every sending thread: a lost update only ages the average more slowly; it is a hint.
        self.send_seconds = 0.0
        self.local = threading.local()  # .sending: how many send_batch calls this thread is inside
        self.recorder: FaceRecorder | None = None  # set by the dispatcher when metrics are on
        self.tracing: Tracing | None = None  # set by the dispatcher with a tracer_provider
        self.engine: BatchEngine[_Pending[T]] | None = None  # set by the dispatcher once it made the engine
        # send_batch is a coroutine function: its send span is opened inside the coroutine.
        self.send_is_async = inspect.iscoroutinefunction(send_batch)
        self._init_runtime()

    def _init_runtime(self) -> None:
        # mutex must be held whenever a field of this object changes; slot_free is a condition on it.
        self.mutex = threading.Lock()
        self.slot_free = threading.Condition(self.mutex)
        self.sending = 0  # send slots taken: sends submitted to the pool or run inline, not returned yet
        self.slot_waiters = 0  # threads waiting on slot_free (the engine worker, at most)
        # Inline runs (send_inline calls) under way, by ticket; flush() and close() wait for those
        # begun before them on inline_done.
        self.inline_started = 0
        self.inline_running: set[int] = set()
        self.inline_waiters = 0
        self.inline_done = threading.Condition(self.mutex)

    def _past_give_up(self) -> bool:
        return self.give_up_at is not None and time.monotonic() >= self.give_up_at

    def deliver(self, target: Hashable, items: list[_Pending[T]]) -> Future[None] | None:
        """The engine's ``deliver``: take a send slot (waiting while all are busy) and submit the send.

        Runs on the engine worker. Returns the pool's Future (the engine settles the batch
        when it is done), or None when nothing is left to send.
        """
        batch = self._runnable(items)
        if not batch:
            return None
        with self.mutex:
            while self.sending >= self.max_concurrent_sends and not self._past_give_up():
                # Back-pressure: the engine keeps buffering while we wait. Only close() ends
                # this wait early (it sets give_up_at and notifies).
                remaining = None if self.give_up_at is None else self.give_up_at - time.monotonic()
                self.slot_waiters += 1
                try:
                    self.slot_free.wait(remaining)
                finally:
                    self.slot_waiters -= 1
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

    def _runnable(self, items: list[_Pending[T]]) -> list[_Pending[T]]:
        """``items`` but those whose Future was cancelled (counted); the rest's Futures now run."""
        batch = [
            pending for pending in items if (future := pending.future) is None or future.set_running_or_notify_cancel()
        ]
        if len(batch) != len(items):
            with self.mutex:
                self.cancelled += len(items) - len(batch)
        return batch

    def _release(self, *, called: int = 0) -> None:
        with self.mutex:
            self.sending -= 1
            self.calls += called
            if self.slot_waiters:
                self.slot_free.notify()

    def send(self, target: str, batch: list[_Pending[T]]) -> None:
        """Run ``send_batch`` for one batch (on a pool thread, holding a send slot) and settle its messages.

        Then, while ``target``'s lane holds a full batch, take it (``BatchEngine.take_now``)
        and send it here too, in the same slot, up to ``_CHAIN`` batches: under load the
        batches of a busy target go back to back on this thread instead of costing a
        worker wake-up, a pool hand-off and a thread switch each. Only a full batch is
        taken here (a partial one waits for its window on the worker), but the check and
        the take are two locks apart: if the worker took from the lane in between, the
        rest (a partial batch) goes at once. A batch the worker took meanwhile waits for a
        slot while the chains go on (sends in several slots have no order anyway), for at
        most ``_CHAIN`` batches of the first chain to end. Nothing is chained past close()'s
        deadline. With one send slot nothing is chained: a target's batches then go
        strictly in the order they were formed.
        """
        engine = None if self.max_concurrent_sends == 1 else self.engine  # one slot: strictly in order
        calls = chained = 0
        seq = 0  # the chained batch being sent (the first one is settled by the pool's Future)
        try:
            while True:
                try:
                    if batch:
                        calls += 1
                        self._send_one(target, batch)
                finally:
                    if seq:
                        engine.settle(seq)  # type: ignore[union-attr]  # seq: taken from it
                if engine is None or chained == _CHAIN or self._past_give_up():
                    return
                if engine.lane_length(target) < engine.max_batch_size:
                    return
                seq, items = engine.take_now(target, engine.max_batch_size)
                if not seq:
                    return
                chained += 1
                batch = self._runnable(items)
        finally:
            self._release(called=calls)

    def _send_one(self, target: str, batch: list[_Pending[T]]) -> None:
        started = time.perf_counter()
        outcome = self._send_batch(target, batch, self._call)
        self._timed(started, len(batch), outcome.error, target)
        self._settle(target, batch, outcome)

    def _timed(self, started: float, count: int, error: BaseException | None, target: str) -> float:
        """A send that began at ``started`` (perf_counter) returned: into the average, and the metrics when on.

        Returns how long it took (seconds).
        """
        took = time.perf_counter() - started
        self.send_seconds += (min(took, _SEND_CAP) - self.send_seconds) * _SEND_WEIGHT
        recorder = self.recorder
        if recorder is not None:  # metrics on: one recording per send, never per message
            recorder.send(count, started, error, target)
        return took

    def quick(self) -> bool:
        """Whether sends have been quick enough to run on a hand-off's own thread (a hint: no lock)."""
        return self.send_seconds < _QUICK_SEND

    def send_inline(  # noqa: PLR0917 - one caller, _hand_inline
        self,
        target: str,
        handed: list[Any],
        settle: Settle,
        caller: contextvars.Context | None,
        size: int,
        waiting: int = 0,
    ) -> int:
        """Send delay-free hand-offs ``handed`` in whole batches of ``size`` on this thread; returns how many went.

        ``waiting`` (below ``size``) is how many messages wait in ``target``'s lane: those go
        first, taken from it (``BatchEngine.take_now``) into one batch with the first
        hand-offs, so a partial batch left by an earlier hand-off costs no hop. Takes one send
        slot for all of it, and only a free one nobody waits for (the engine worker's batches
        go first): none is sent when every slot is busy, after close() or past its deadline.
        Stops after a batch that was slow (:meth:`quick`) or when close()'s deadline passed;
        the rest is the caller's. Once done, ``settle`` gets the tokens of the rest sent
        (their errors, or None when every message was sent), in one call; the first batch
        settles as the lane's batches do. A message runs in its own context, else in
        ``caller`` (None: a copy per message, for envelopes).
        """
        with self.mutex:
            # A free slot is taken even while the engine worker waits for one: it waits because all were
            # busy and has not woken yet; refusing meanwhile would queue this hand-off behind it, for
            # the worker and the send threads (under load, every hand-off until they catch up).
            if self.closed or self.sending >= self.max_concurrent_sends or self._past_give_up():
                return 0
            self.sending += 1
            self.inline_started += 1
            ticket = self.inline_started
            self.inline_running.add(ticket)
        first = calls = failed = 0
        done = 0
        errors: list[BaseException | None] | None = None  # of handed[first:done]; None while all were sent
        local = self.local
        # This thread is inside send_batch for the whole run (in_send() says so to a flush or
        # close it makes): counted once here, not once per batch.
        local.sending = getattr(local, "sending", 0) + 1
        try:
            if waiting:
                first = done = self._send_with_lane(target, handed, settle, caller, size, waiting)
                calls += first > 0
            end = done + (len(handed) - done) // size * size
            took = 0.0  # how long the last batch sent here took: a slow one sends the rest to the send threads
            # quick() and _past_give_up() inline: once per batch.
            while (
                done < end
                and took < _SLOW_BATCH
                and self.send_seconds < _QUICK_SEND
                and (self.give_up_at is None or time.monotonic() < self.give_up_at)
            ):
                batch = handed[done : done + size]
                calls += 1
                found, took = self._send_handed(target, batch, caller)
                if found is not None:
                    if errors is None:
                        errors = [None] * (done - first)
                    errors += found
                    failed += sum(error is not None for error in found)
                elif errors is not None:
                    errors += [None] * len(batch)
                done += len(batch)
        finally:
            local.sending -= 1
            with self.mutex:
                self.sending -= 1
                self.calls += calls
                self.sent += done - first - failed  # the first batch's are counted as it settles
                self.failed += failed
                self.inline_batches += calls - (first > 0)  # the engine counted the one from its lane
                self.inline_taken += done
                self.inline_running.discard(ticket)
                if self.slot_waiters:
                    self.slot_free.notify()
                if self.inline_waiters:
                    self.inline_done.notify_all()
        if done > first:
            self._call_settle(settle, handed[first:done], errors)
        return done

    def _send_with_lane(  # noqa: PLR0917 - one caller, send_inline
        self,
        target: str,
        handed: list[Any],
        settle: Settle,
        caller: contextvars.Context | None,
        size: int,
        waiting: int,
    ) -> int:
        """Send the lane's partial batch, completed by the first hand-offs, here (a slot held); how many of those."""
        engine = self.engine
        assert engine is not None
        seq, items = engine.take_now(target, waiting)
        if not seq:  # the worker took it meanwhile (its window closed)
            return 0
        fill = size - len(items)
        try:
            batch = self._runnable(items)
            for token in handed[:fill]:
                message, _, given = token
                context = given if given is not None else caller if caller is not None else contextvars.copy_context()
                batch.append(_Pending(message, None, None, context, settle, token, None))
            self._send_one(target, batch)
        finally:
            engine.settle(seq)
        return fill

    def _send_handed(
        self, target: str, batch: list[Any], caller: contextvars.Context | None
    ) -> tuple[list[BaseException | None] | None, float]:
        """``send_batch`` for one batch of hand-offs ``(message, None, context or None)``, on this thread.

        The caller (:meth:`send_inline`) counts this thread as inside ``send_batch``. Returns
        each message's error (None for one sent), or None when all were sent; and how long
        the send took (seconds).
        """
        if self.envelopes:
            payload: list[Any] = [
                Envelope(message, None, contextvars.copy_context() if given is None else given)
                for message, _, given in batch
            ]
            context = payload[0].context
        else:
            payload = list(map(_first, batch))  # the messages
            given = batch[0][2]
            context = caller if given is None else given
        assert context is not None  # without envelopes the hand-off passes its caller's context
        count = len(batch)
        started = time.perf_counter()
        if self.caller.timeout is None:  # _call inline: once per batch
            outcome = context.copy().run(call, self.send_batch, target, payload)
        else:
            outcome = self._call(context.copy(), self.send_batch, target, payload)
        took = self._timed(started, count, outcome.error, target)
        if outcome.error is not None:
            return [outcome.error] * count, took
        results = outcome.value
        if type(results) is not list or len(results) != count:  # the usual list needs no _check_results
            results = self._check_results(target, count, results)
        if isinstance(results, BaseException):
            return [results] * count, took
        if _all_sent(results):
            return None, took
        return [result if isinstance(result, BaseException) else None for result in results], took

    def send_now(self, target: str, batch: list[_Pending[T]]) -> None:
        """Immediate mode: run ``send_batch`` on this thread (no slot, the timeout checked on return) and settle."""
        started = time.perf_counter()
        outcome = self._send_batch(target, batch, self._call_here)
        self._timed(started, len(batch), outcome.error, target)
        with self.mutex:
            self.calls += 1
        self._settle(target, batch, outcome)

    def _send_batch(
        self,
        target: str,
        batch: list[_Pending[T]],
        how: Callable[[contextvars.Context, _Send, str, list[Any]], Outcome],
    ) -> Outcome:
        payload: list[Any]
        if self.envelopes:
            payload = [Envelope(pending.message, pending.delay, pending.context) for pending in batch]
        else:
            payload = [pending.message for pending in batch]
        # A copy: send_batch may run an envelope's own context (the first one's included).
        context = batch[0].context.copy()
        send_batch = self.send_batch if self.tracing is None else self._traced(target, batch)
        return self._call_send(target, payload, context, send_batch, how)

    def _call_send(
        self,
        target: str,
        payload: list[Any],
        context: contextvars.Context,
        send_batch: _Send,
        how: Callable[[contextvars.Context, _Send, str, list[Any]], Outcome],
    ) -> Outcome:
        """``how(context, send_batch, target, payload)``, with this thread counted as inside ``send_batch``."""
        local = self.local
        local.sending = getattr(local, "sending", 0) + 1
        try:
            return how(context, send_batch, target, payload)
        finally:
            local.sending -= 1

    def _traced(self, target: str, batch: list[_Pending[T]]) -> Callable[[str, list[Any]], object]:
        """``send_batch`` inside a PRODUCER span ``send <target>`` linked to the batch's producers.

        The span is current while ``send_batch`` runs, in the context it runs in, so the
        spans it makes are its children. An ``async def`` send_batch gets it inside its
        coroutine (around the await); a plain one that returns an awaitable only around
        the call that made it.
        """
        tracing = self.tracing
        assert tracing is not None
        contexts = [pending.span for pending in batch]
        attributes = {
            "messaging.system": "threaddispatch",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": target,
            "messaging.batch.message_count": len(batch),
            "threaddispatch.dispatcher": self.name,
        }
        name = f"send {target}"
        send_batch = self.send_batch
        if self.send_is_async:

            async def traced_async(target: str, payload: list[Any]) -> object:
                with tracing.send_span(name, contexts, attributes):
                    awaitable = cast("Awaitable[object]", send_batch(target, payload))
                    return settled(send_batch, awaitable, await awaitable)

            return traced_async

        def traced(target: str, payload: list[Any]) -> object:
            with tracing.send_span(name, contexts, attributes):
                result = send_batch(target, payload)
            # An awaitable is awaited in a wrapper that checks it named after send_batch, not traced.
            return awaited(send_batch, result) if inspect.isawaitable(result) else result

        return traced

    def _settle(self, target: str, batch: list[_Pending[T]], outcome: Outcome) -> None:
        if outcome.error is not None:  # the whole batch failed (a BaseException and a timeout too)
            self._fail(batch, outcome.error)
            return
        outcomes = self._outcomes(target, batch, outcome.value)
        if outcomes is not None:
            self._resolve(batch, outcomes)

    def _call_here(self, context: contextvars.Context, send_batch: _Send, target: str, payload: list[Any]) -> Outcome:
        what = f"{self.name}: send_batch({target!r}, <{len(payload)} messages>)"
        return context.run(call_here, self.caller.timeout, what, send_batch, target, payload)

    def _call(self, context: contextvars.Context, send_batch: _Send, target: str, payload: list[Any]) -> Outcome:
        """``send_batch(target, payload)`` in ``context`` (this batch's own copy), within the timeout; never raises."""
        caller = self.caller
        if caller.timeout is None:
            return context.run(call, send_batch, target, payload)
        try:
            return caller.call(in_context, context, send_batch, target, payload)
        except DispatcherClosedError:  # close() passed its deadline while this send was queued
            error = DispatchTimeoutError(
                f"{self.name}: closed and its timeout passed before a batch of {len(payload)} message(s) "
                f"to {target!r} could be sent"
            )
            return Outcome(ERROR, None, error)

    def _outcomes(self, target: str, batch: list[_Pending[T]], results: object) -> list[Any] | None:
        """Check ``send_batch``'s return value: one result per message, or fail the whole batch."""
        checked = self._check_results(target, len(batch), results)
        if isinstance(checked, BaseException):
            self._fail(batch, checked)
            return None
        return checked

    def _check_results(self, target: str, count: int, results: object) -> list[Any] | BaseException:
        """``send_batch``'s return value as a list of ``count`` results, or the error that fails the whole batch."""
        problem = None
        if type(results) is list:  # the usual return value: no copy
            outcomes: list[Any] = results
        elif results is None or isinstance(results, (str, bytes, bytearray)) or not isinstance(results, Iterable):
            return self._bad_results(target, count, f"returned {type(results).__name__}")
        else:
            try:
                outcomes = list(results)
            except Exception as error:  # noqa: BLE001 - a broken iterable fails the batch like a raise would
                return error
        if len(outcomes) != count:
            problem = f"returned {len(outcomes)} result(s)"
        return outcomes if problem is None else self._bad_results(target, count, problem)

    def _bad_results(self, target: str, count: int, problem: str) -> ThreadDispatchError:
        return ThreadDispatchError(
            f"{self.name}: send_batch({target!r}, <{count} messages>) {problem}; it must return a list "
            f"with one result (an id, None or an exception) per message, so none of them counts as sent"
        )

    def _fail(self, batch: list[_Pending[T]], error: BaseException) -> None:
        self._resolve(batch, [error] * len(batch))

    def _resolve(self, batch: list[_Pending[T]], outcomes: list[Any]) -> None:
        """Give each message its outcome (an id, None or an exception): its Future, or its hand-off's
        ``settle`` once per batch. Nothing held: Future callbacks and ``settle`` are user-side code."""
        settle = batch[0].settle
        if (  # the common hand-off batch: all sent, all of one hand-off (no outcome per message to pass)
            settle is not None and _all_sent(outcomes) and len(set(map(_settle_of, batch))) == 1
        ):
            with self.mutex:
                self.sent += len(batch)
            self._call_settle(settle, list(map(_token_of, batch)), None)
            return
        sent = failed = 0
        handed: dict[Settle, tuple[list[Any], list[BaseException | None]]] | None = None
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
            tokens, errors = handed.setdefault(pending.settle, ([], []))
            tokens.append(pending.token)
            errors.append(error)
        with self.mutex:
            self.sent += sent
            self.failed += failed
        if handed is not None:
            for each, (tokens, errors) in handed.items():
                self._call_settle(each, tokens, errors)

    def _call_settle(self, settle: Settle, tokens: list[Any], errors: list[BaseException | None] | None) -> None:
        outcome = call(settle, tokens, errors)
        if outcome.error is not None:
            _log.error("%s: a hand-off's settle raised", self.name, exc_info=outcome.error)

    def in_send(self) -> bool:
        """Whether the calling thread is inside ``send_batch`` (it cannot wait for its own batch)."""
        return bool(getattr(self.local, "sending", 0))

    def wait_inline(self, deadline: float | None) -> bool:
        """Wait until the inline runs begun before this call are done, until ``deadline``; whether they are."""
        with self.mutex:
            begun = self.inline_started
            self.inline_waiters += 1
            try:
                while any(ticket <= begun for ticket in self.inline_running):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self.inline_done.wait(remaining)
            finally:
                self.inline_waiters -= 1
        return True

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
        # Counters from zero, as on every face: the parent's batches are the parent's.
        self.sent = self.failed = self.cancelled = self.calls = self.failed_at_close = 0
        self.inline_batches = self.inline_taken = 0
        self._init_runtime()
