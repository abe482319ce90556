"""What a BackgroundDispatcher's worker does with a batch: its one job is sending it and settling its entries.

:class:`_Sender` is the engine's ``deliver``: it unwraps the items a batch carries (plain
entries; ``_Submitted`` with a Future; ``_Spooled`` with a spool sequence number; with
tracing on, each as ``(item, the producer's context)``; ``_Retrying`` batches back from
the timer), calls ``send_batch`` through ``_invoke`` (inside a PRODUCER span with tracing
on), retries on the engine's timer, acknowledges or dead-letters spooled entries, settles
the Futures and reports a batch that failed for good. It holds no reference to the
dispatcher, so an unreferenced dispatcher can be collected while its worker drains.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from threaddispatch._batched_immediate import call_here
from threaddispatch._engine import BatchEngine
from threaddispatch._future import LazyFuture
from threaddispatch._invoke import Outcome, TimedCaller, call
from threaddispatch._spool import Spool
from threaddispatch._trace import Tracing
from threaddispatch.backoff import RetryPolicy
from threaddispatch.errors import DispatcherClosedError, QueueFullError
from threaddispatch.metrics import FaceRecorder

__all__ = ["FailedBatch"]

T = TypeVar("T")

_log = logging.getLogger("threaddispatch")


@dataclass(frozen=True)
class FailedBatch(Generic[T]):
    """A batch whose send failed for good: its entries, the last error, and how many attempts were made."""

    entries: list[T]
    error: BaseException
    attempts: int = 1


class _Submitted:
    """An entry offered with :meth:`BackgroundDispatcher.submit`, carried with its Future."""

    __slots__ = ("entry", "future")

    def __init__(self, entry: object, future: Future[None]) -> None:
        self.entry = entry
        self.future = future


class _Spooled:
    """An entry of a spooled dispatcher: its spool sequence number, and its Future if it was submitted.

    It takes the place of the bare entry or the ``_Submitted`` (with tracing on, inside the
    same ``(item, context)`` tuple), so one item says everything the sender needs.
    """

    __slots__ = ("entry", "future", "seq")

    def __init__(self, seq: int, entry: object, future: Future[None] | None) -> None:
        self.seq = seq
        self.entry = entry
        self.future = future

    def __repr__(self) -> str:
        return repr(self.entry)


def _span_contexts(captured: list[Any]) -> list[Any]:
    """The valid span contexts of the captured OpenTelemetry contexts; each distinct context object read once."""
    from opentelemetry import trace  # tracing on: the API is installed

    found: dict[int, Any] = {}
    for context in captured:  # every object stays referenced by ``captured``, so ids are unique
        if id(context) not in found:
            found[id(context)] = trace.get_current_span(context).get_span_context()
    return [span for span in found.values() if span.is_valid]


def _capture() -> Callable[[], Any]:
    """What ``enqueue`` calls to capture the producer's context: ``opentelemetry.context.get_current``.

    The span is looked up in it at send time instead of at enqueue (:meth:`Tracing.capture`
    costs about five times as much). With OpenTelemetry's default runtime context (a
    ContextVar holding the current Context), that ContextVar's own C ``get`` is used: the
    same object ``get_current()`` returns, without its two Python frames (~90 ns vs ~540).
    """
    from opentelemetry import context

    current = getattr(getattr(context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    if isinstance(current, contextvars.ContextVar):
        return current.get
    return context.get_current


class _Retrying:
    """A batch waiting for its next attempt: scheduled with the engine's ``put_later``.

    ``done`` is the Future the engine holds for the batch's first delivery: it settles
    that batch (so flush() and close() wait for it) once the batch is sent or fails for good.
    ``contexts`` are the producers' captured contexts (tracing on), which each attempt's span links to.
    """

    __slots__ = ("attempts", "contexts", "done", "entries", "futures", "seqs")

    def __init__(
        self,
        entries: list[Any],
        futures: list[Future[None]],
        attempts: int,
        done: Future[None],
        contexts: list[Any],
        *,
        seqs: list[int],
    ) -> None:
        self.entries = entries
        self.futures = futures
        self.attempts = attempts
        self.done = done
        self.contexts = contexts
        self.seqs = seqs  # the entries' spool sequence numbers (spool on), else empty


class _Sender(Generic[T]):
    """Calls ``send_batch`` for the engine: retries, error reporting, futures, counters.

    Every user callable (``send_batch``, ``on_error``) goes through ``_invoke``: it may be
    ``async def``, and whatever it raises (BaseException included) is the call's failure.
    A retry waits on the engine's timer (``put_later``), never on the worker thread.
    Holds no reference to the dispatcher, so an unreferenced dispatcher can be collected
    while its worker still drains. Counters are written by the worker thread only.
    """

    def __init__(
        self,
        send_batch: Callable[[list[T]], object],
        on_error: Callable[[FailedBatch[T]], object] | None,
        retry: RetryPolicy | None,
        name: str,
        caller: TimedCaller,
    ) -> None:
        self.send_batch = send_batch
        self.on_error = on_error
        self.retry = retry
        self.name = name
        self.caller = caller
        self.engine: BatchEngine[Any] | None = None  # set by the dispatcher once the engine exists
        self.recorder: FaceRecorder | None = None  # set by the dispatcher when metrics are on
        # Set by the dispatcher with a tracer_provider. Then every item enqueue puts in the lane is a
        # tuple (entry or _Submitted, the producer's captured OpenTelemetry context); _Retrying stays bare.
        self.tracing: Tracing | None = None
        self.has_submitted = False
        # Set by the dispatcher given a spool: every item but _Retrying is then a _Spooled (tracing on:
        # inside its tuple); a delivered batch is acknowledged, a failed one dead-lettered, a dropped one acked.
        self.spool: Spool | None = None
        # Immediate mode (testing.immediate()): sends run on the callers' threads, one at a
        # time under this lock, which then guards the counters; retries go at once.
        self.immediate = False
        # Set by a BatchingHandler: a thread-local whose ``active`` is True on a thread for the
        # whole of a delivery (sends, retries, the failure record, on_error), so records logged
        # there are not queued to the handler again. None (every other dispatcher): untouched.
        self.marker: threading.local | None = None
        self.reset(closing=False)

    def reset(self, *, closing: bool) -> None:
        """Fresh counters, lock and ``closing`` Event (at construction, and in a forked child)."""
        self.immediate_lock = threading.RLock()  # reentrant: a send may enqueue to its own dispatcher
        self.closing = threading.Event()  # set by close(): retries go at once instead of waiting
        if closing:
            self.closing.set()
        self.sent = 0
        self.failed = 0
        self.failed_batches = 0
        self.retries = 0
        self.calls = 0
        self.immediate_entries = 0  # entries sent in immediate mode, never in the engine
        self.immediate_batches = 0

    def deliver(self, key: Hashable, items: list[Any]) -> Future[None] | None:
        marker = self.marker
        if marker is not None:
            previous = getattr(marker, "active", False)  # a send may deliver inline (immediate mode, exit)
            marker.active = True
            try:
                return self._deliver(key, items)
            finally:
                marker.active = previous
        return self._deliver(key, items)

    def _deliver(self, key: Hashable, items: list[Any]) -> Future[None] | None:
        if self.immediate:  # a retry scheduled before the switch: one send at a time, as the callers'
            with self.immediate_lock:
                return self._deliver_mixed(key, items)
        if self.has_submitted or self.retry is not None or self.tracing is not None or self.spool is not None:
            return self._deliver_mixed(key, items)
        self._attempt(key, items, [], 1, None, contexts=[], seqs=[])
        return None

    def _deliver_mixed(self, key: Hashable, items: list[Any]) -> Future[None] | None:
        """Split a batch into its plain entries (one send) and the retried batches it carries (one send each)."""
        futures: list[Future[None]] = []
        entries: list[Any] = []
        retried: list[_Retrying] = []
        contexts: list[Any] = []  # the producers' captured contexts (tracing on)
        seqs: list[int] = []  # the entries' spool sequence numbers (spool on)
        traced = self.tracing is not None
        for carried in items:
            item = carried
            kind = type(item)
            if traced and kind is not _Retrying:
                item, context = item
                contexts.append(context)
                kind = type(item)
            if kind is _Spooled:
                entries.append(item.entry)
                seqs.append(item.seq)
                if item.future is not None:
                    futures.append(item.future)
            elif kind is _Submitted:
                entries.append(item.entry)
                futures.append(item.future)
            elif kind is _Retrying:
                retried.append(item)
            else:
                entries.append(item)
        for batch in retried:
            self._attempt(
                key,
                batch.entries,
                batch.futures,
                batch.attempts + 1,
                batch.done,
                contexts=batch.contexts,
                seqs=batch.seqs,
            )
        if not entries:
            return None
        return self._attempt(key, entries, futures, 1, None, contexts=contexts, seqs=seqs)

    def _attempt(
        self,
        key: Hashable,
        entries: list[Any],
        futures: list[Future[None]],
        attempts: int,
        done: Future[None] | None,
        *,
        contexts: list[Any],
        seqs: list[int],
    ) -> Future[None] | None:
        """Send once; on a failure that retries, schedule the next attempt and return what settles the batch."""
        while True:
            self.calls += 1
            recorder = self.recorder
            if recorder is None:
                outcome = self._call_send(entries) if self.tracing is None else self._traced_send(entries, contexts)
            else:  # metrics on: one recording per send, never per entry
                started = time.perf_counter()
                outcome = self._call_send(entries) if self.tracing is None else self._traced_send(entries, contexts)
                recorder.send(len(entries), started, outcome.error)
            if outcome.ok:
                if seqs:
                    self._settle_spool(seqs, None)
                self.sent += len(entries)
                for future in futures:
                    if future.set_running_or_notify_cancel():
                        future.set_result(None)
                break
            error = outcome.error
            assert error is not None
            delay = None if self.retry is None else self.retry.next_delay(attempts, error)
            if delay is None:
                if seqs:
                    self._settle_spool(seqs, error)
                self._report(entries, error, attempts, futures)
                break
            self.retries += 1
            batch = _Retrying(entries, futures, attempts, LazyFuture() if done is None else done, contexts, seqs=seqs)
            if self._schedule(key, batch, delay):
                # The first delivery's batch settles when batch.done does; a retry's own batch now.
                return batch.done if done is None else None
            attempts += 1  # closing: the next attempt goes at once
        if done is not None:
            done.set_result(None)
        return None

    def send_now(self, entry: Any, future: Future[None] | None) -> None:
        """Immediate mode: send ``entry`` (its retries at once) and report it, on this thread."""
        marker = self.marker
        previous = False if marker is None else getattr(marker, "active", False)
        with self.immediate_lock:
            self.immediate_entries += 1
            self.immediate_batches += 1
            contexts = [] if self.tracing is None else [_capture()()]
            if marker is not None:
                marker.active = True
            try:
                self._attempt(None, [entry], [] if future is None else [future], 1, None, contexts=contexts, seqs=[])
            finally:
                if marker is not None:
                    marker.active = previous

    def _settle_spool(self, seqs: list[int], error: BaseException | None) -> None:
        """Acknowledge delivered entries (error None) or dead-letter failed ones; a spool failure is logged.

        Before the Futures and ``on_error``: once they say an entry was sent, it has left the
        spool. An entry the spool could not settle stays pending, and is replayed at the next start.
        """
        spool = self.spool
        if spool is not None:
            spool.settle(seqs, error, self.name)

    def _traced_send(self, entries: list[Any], contexts: list[Any]) -> Outcome:
        """``_call_send`` inside a PRODUCER span linked to the producers' spans (messaging batch publish)."""
        tracing = self.tracing
        assert tracing is not None
        attributes = {
            "messaging.system": "threaddispatch",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": self.name,
            "messaging.batch.message_count": len(entries),
        }
        with tracing.send_span(f"send {self.name}", _span_contexts(contexts), attributes) as span:
            outcome = self._call_send(entries)
            if outcome.error is not None:
                _record_error(span, outcome.error)
        return outcome

    def _call_send(self, entries: list[Any]) -> Outcome:
        if self.immediate:
            return call_here(self.caller.timeout, f"{self.name}: send_batch", self.send_batch, entries)
        try:
            return self.caller.call(self.send_batch, entries)
        except DispatcherClosedError:  # close() timed out and closed the caller: send without a timeout
            return call(self.send_batch, entries)

    def _schedule(self, key: Hashable, batch: _Retrying, delay: float) -> bool:
        """Put ``batch`` on the engine's timer; False when closing or immediate (the caller retries at once)."""
        engine = self.engine
        if engine is None or self.closing.is_set() or self.immediate:
            return False
        try:
            engine.put_later(batch, key, delay)
        except DispatcherClosedError:
            return False
        return True

    def _report(self, entries: list[T], error: BaseException, attempts: int, futures: list[Future[None]]) -> None:
        self.failed += len(entries)
        self.failed_batches += 1
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        if self.on_error is None:
            _log.error(
                "%s: send_batch failed for %d entries after %d attempt(s); they are lost",
                self.name,
                len(entries),
                attempts,
                exc_info=error,
            )
            return
        outcome = call(self.on_error, FailedBatch(entries, error, attempts))
        if not outcome.ok:  # the worker lives whatever on_error does
            _log.error(
                "%s: on_error raised while reporting %d failed entries",
                self.name,
                len(entries),
                exc_info=outcome.error,
            )

    def on_drop(self, items: list[Any]) -> None:
        """Settle what the overflow policy dropped: Futures fail with QueueFullError, spooled entries leave the spool.

        A dropped ``_Retrying`` is a whole batch waiting for its next attempt: its entries' Futures
        fail, and its ``done`` is settled, so a flush or close waiting for that batch returns.
        """
        seqs: list[int] = []
        futures: list[Future[None]] = []
        settled: list[Future[None]] = []
        for carried in items:
            if type(carried) is _Retrying:
                seqs.extend(carried.seqs)
                futures.extend(carried.futures)
                settled.append(carried.done)
                continue
            item = carried[0] if self.tracing is not None else carried
            kind = type(item)
            if kind is _Spooled:
                seqs.append(item.seq)
            future = item.future if kind is _Submitted or kind is _Spooled else None
            if future is not None:
                futures.append(future)
        if seqs:  # never delivered, and no longer to be: it leaves the spool
            self._settle_spool(seqs, None)
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(QueueFullError(f"{self.name}: entry dropped, the queue was full"))
        for done in settled:
            if not done.done():
                done.set_result(None)


def _record_error(span: Any, error: BaseException) -> None:
    """Mark a send span failed by ``error``: the exception recorded, ``error.type`` set, status ERROR."""
    from opentelemetry.trace import Status, StatusCode  # tracing on: the API is installed

    span.record_exception(error)
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(Status(StatusCode.ERROR, f"send_batch raised {type(error).__name__}"))
