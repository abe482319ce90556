"""BackgroundDispatcher: entries batched over a time window and handed to one function.

The face of Zuplo's BackgroundDispatcher on the shared :class:`~threaddispatch._engine.BatchEngine`.
``enqueue`` is lock-free: an append and a length check, with the engine's lock taken
only when a window opens, a batch fills, or the buffer overflows.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from threaddispatch import _immediate, _lifecycle
from threaddispatch._batched_immediate import call_here
from threaddispatch._engine import OVERFLOW_POLICIES, BatchEngine, Overflow
from threaddispatch._future import LazyFuture
from threaddispatch._invoke import Outcome, TimedCaller, call
from threaddispatch._lanes import ClosedFifoLane, FifoLane
from threaddispatch._spool import Spool, SpoolDeadLetter, SpoolSync
from threaddispatch._trace import Tracing, make_tracing
from threaddispatch._validate import check_positive_int, check_seconds
from threaddispatch.backoff import RetryPolicy
from threaddispatch.errors import ConfigurationError, DispatcherClosedError, QueueFullError, StoreError
from threaddispatch.metrics import FaceRecorder, Metrics, check_metrics

__all__ = ["BackgroundDispatcher", "FailedBatch"]

T = TypeVar("T")

_log = logging.getLogger("threaddispatch")
_forked_spools: list[Spool] = []  # a forked child's copies of its parent's spools: never closed in the child
_names = iter(range(1, 1 << 62))


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
        with self.immediate_lock:
            self.immediate_entries += 1
            self.immediate_batches += 1
            contexts = [] if self.tracing is None else [_capture()()]
            self._attempt(None, [entry], [] if future is None else [future], 1, None, contexts=contexts, seqs=[])

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
        seqs: list[int] = []
        for carried in items:
            item = carried[0] if self.tracing is not None and type(carried) is not _Retrying else carried
            kind = type(item)
            if kind is _Spooled:
                seqs.append(item.seq)
            future = item.future if kind is _Submitted or kind is _Spooled else None
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(QueueFullError(f"{self.name}: entry dropped, the queue was full"))
        if seqs:  # never accepted: it leaves the spool
            self._settle_spool(seqs, None)


def _record_error(span: Any, error: BaseException) -> None:
    """Mark a send span failed by ``error``: the exception recorded, ``error.type`` set, status ERROR."""
    from opentelemetry.trace import Status, StatusCode  # tracing on: the API is installed

    span.record_exception(error)
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(Status(StatusCode.ERROR, f"send_batch raised {type(error).__name__}"))


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
            check_seconds("timeout", timeout)
        try:
            _lane.lock_free_append(entry)
        except AttributeError:
            raise _positional_timeout() from None
        if _len(_lane) >= _lane.trigger:
            _kick(_lane)

    enqueue.__doc__ = BackgroundDispatcher.enqueue.__doc__
    enqueue.__signature__ = _ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
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

    traced.__doc__ = BackgroundDispatcher.enqueue.__doc__
    traced.__signature__ = _ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
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
            check_seconds("timeout", timeout)
        try:
            _lane.lock_free_append((entry, _capture()))
        except AttributeError:
            raise _positional_timeout() from None
        except DispatcherClosedError:
            _lane.append(entry)  # closed: raises naming the entry itself, not its tuple
            raise
        if _len(_lane) >= _lane.trigger:
            _kick(_lane)

    enqueue.__doc__ = BackgroundDispatcher.enqueue.__doc__
    enqueue.__signature__ = _ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
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
            check_seconds("timeout", timeout)  # refused before anything is written
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

    spooled.__doc__ = BackgroundDispatcher.enqueue.__doc__
    spooled.__signature__ = _ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
    return spooled


class BackgroundDispatcher(_lifecycle.Closing, Generic[T]):
    """Batches entries and calls ``send_batch(entries)`` at most once per ``ms_delay`` window.

    ``send_batch`` runs on the dispatcher's daemon thread ``threaddispatch-<name>``,
    never with an empty list and never with more than ``max_batch_size`` entries;
    entries keep their order. A ``max_queue_size`` smaller than ``max_batch_size`` is
    the batch size in effect: a full buffer goes at once. All methods are thread-safe.

    ``send_batch`` and ``on_error`` may be ``async def`` (awaited on the worker's private
    event loop). Whatever ``send_batch`` raises fails the batch, a BaseException
    (SystemExit, KeyboardInterrupt) included: it goes to ``retry``/``on_error`` and the
    ``submit()`` Futures, and the worker goes on. With ``send_timeout`` (seconds), a send
    running past it fails with DispatchTimeoutError; its thread is abandoned (at most 4
    at once; ``stats()["abandoned_calls"]``) and later batches still go. With ``retry``,
    ``RetryPolicy.next_delay`` decides (``Retry(delay)`` honoured, ``Cancel`` final); a
    failed batch waits for its next attempt on the engine's timer while later batches
    are sent, so a retried batch may arrive after them. close() sends pending retries at once.

    ``metrics`` (a :class:`~threaddispatch.metrics.Metrics`, such as
    :class:`~threaddispatch.otel.OTelMetrics`; None: none) gets the batch size and the
    duration of each send, and reads ``stats()`` when it collects; without it the send
    path pays one ``is None`` test per batch and ``enqueue`` nothing.

    ``tracer_provider`` (an OpenTelemetry TracerProvider; extra ``otel``) traces the sends:
    ``enqueue``/``submit`` capture the caller's current span context, and each call of
    ``send_batch`` (each retry too) runs inside a PRODUCER span ``send <name>`` linked to
    the spans of the entries it carries (OpenTelemetry's messaging conventions for a batch
    publish), with ``messaging.system``, ``messaging.destination.name`` (the dispatcher's
    name) and ``messaging.batch.message_count``, and an error status when the send failed.
    Without it (the default) ``enqueue`` is the untraced path, unchanged.

    ``spool`` (a file path; None: none) makes the buffer crash-durable: every entry
    ``enqueue``/``submit`` accepts is first appended to that SQLite WAL file (appends from
    many threads share one commit; entries must be JSON-encodable, else PayloadError), and
    leaves it once its batch was sent, or was dropped by the overflow policy. A batch that
    fails for good moves to the spool's dead letters (``on_error`` is still called):
    :meth:`spool_dead_letters` lists them, :meth:`replay_spool_dead_letters` sends them
    again. A new dispatcher on the same spool first replays, in order and before any new
    entry, what a previous owner left (delivery is at-least-once: the batch being sent at
    a crash is sent again). Replayed entries count against ``max_queue_size``; when more
    were left than it holds, the constructor sends the excess itself before it returns
    (it blocks for those sends, as flush() does), so none is dropped then; afterwards they
    are accepted entries like any other (``drop_oldest`` may drop them). ``spool_sync`` is
    ``"normal"`` (survives a process crash) or ``"full"`` (an fsync per commit: survives
    power loss). One dispatcher owns a spool at a time (SpoolOwnedError for a second);
    close() closes it after the drain. Immediate mode (``testing.immediate()``) sends on
    the caller's thread before ``enqueue`` returns, so it does not touch the spool, and a
    forked child's dispatcher does not use its parent's spool.

    After ``os.fork()`` the child's dispatcher starts empty, with its own counters from
    zero and a fresh worker: entries pending or being sent at fork are the parent's to
    send (and their ``submit()`` Futures the parent's to resolve; the child's copies of
    those Futures never resolve). A dispatcher closed, or closing, at fork is closed in
    the child.
    """

    def __init__(
        self,
        send_batch: Callable[[list[T]], object],
        ms_delay: float = 100,
        *,
        max_batch_size: int = 1000,
        max_queue_size: int = 10_000,
        overflow: Overflow = "drop_newest",
        on_error: Callable[[FailedBatch[T]], object] | None = None,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        send_timeout: float | None = None,
        metrics: Metrics | None = None,
        tracer_provider: object = None,
        spool: str | os.PathLike[str] | None = None,
        spool_sync: SpoolSync = "normal",
    ) -> None:
        if not callable(send_batch):
            raise ConfigurationError(f"send_batch must be callable, got {send_batch!r}")
        checked_metrics = check_metrics(metrics)
        tracing = make_tracing(tracer_provider, "background")
        if (
            isinstance(ms_delay, bool)
            or not isinstance(ms_delay, (int, float))
            or not (math.isfinite(ms_delay) and ms_delay > 0)
        ):
            raise ConfigurationError(f"ms_delay must be a finite number > 0, got {ms_delay!r}")
        # A max_queue_size below max_batch_size caps the batch size (the engine applies it).
        check_positive_int("max_batch_size", max_batch_size)
        check_positive_int("max_queue_size", max_queue_size)
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigurationError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}")
        if on_error is not None and not callable(on_error):
            raise ConfigurationError(f"on_error must be callable, got {on_error!r}")
        if name is None:
            name = f"background-{next(_names)}"
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str, got {name!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        if send_timeout is not None:
            send_timeout = check_seconds("send_timeout", send_timeout, allow_zero=False)
        if spool_sync not in ("normal", "full"):
            raise ConfigurationError(f"spool_sync must be 'normal' or 'full', got {spool_sync!r}")
        # Last of the checks: it takes the ownership (SpoolOwnedError) and reads what was left.
        opened = None if spool is None else Spool(spool, sync=spool_sync)
        self.name = name
        self.ms_delay = ms_delay
        self.send_timeout = send_timeout
        self._caller = TimedCaller(name, timeout=send_timeout)
        self._sender: _Sender[T] = _Sender(send_batch, on_error, retry, name, self._caller)
        self._engine: BatchEngine[Any] = BatchEngine(
            self._sender.deliver,
            name=name,
            window=ms_delay / 1000.0,
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            overflow=overflow,
            on_drop=self._sender.on_drop,
        )
        self._sender.engine = self._engine
        self._sender.recorder = checked_metrics.bind(self)
        self._sender.tracing = tracing
        lane = self._engine.default_lane
        assert isinstance(lane, FifoLane)
        lane.owner = f"BackgroundDispatcher {name!r}"
        self._lane = lane
        # An unreferenced dispatcher drains in the background and its worker then leaves.
        # _close_lock guards the open -> closed transition (_closed, the lane's class, the sender's closing).
        self._init_closing(self._engine.close_unreferenced)
        if overflow in ("block", "raise"):
            # Lossless and lock-free while there is room: the engine takes the lock only at the bound.
            self.enqueue = self._engine.lossless_enqueue(lane, _positional_timeout)  # type: ignore[method-assign]
            if tracing is not None:
                self.enqueue = _traced_enqueue(self.enqueue, _capture(), lane)  # type: ignore[method-assign]
        elif tracing is not None:
            self.enqueue = _lock_free_traced_enqueue(lane, self._engine.kick, _capture())  # type: ignore[method-assign]
        else:
            self.enqueue = _lock_free_enqueue(lane, self._engine.kick)  # type: ignore[method-assign]
        self._enqueue_unspooled = self.enqueue  # what a forked child uses
        self._spool = opened
        if opened is not None:
            self._sender.spool = opened
            self.enqueue = _spooled_enqueue(self.enqueue, opened, lane)  # type: ignore[method-assign]
            self._replay(opened.pending())
        self._enqueue_queued = self.enqueue  # what _set_immediate(False) puts back
        # For the fork reset and the immediate switch; held weakly, so it never keeps self alive.
        _lifecycle.register(self)
        if _immediate.active():
            self._set_immediate(True)

    def enqueue(self, entry: T, *, timeout: float | None = None) -> None:
        """Add ``entry`` to the next batch. O(1), never calls ``send_batch`` on this thread.

        Never blocks with the drop policies; with ``overflow="block"`` waits up to
        ``timeout`` seconds for room, then raises QueueFullError; with ``"raise"``
        raises QueueFullError at once when full. Raises DispatcherClosedError after close,
        and ConfigurationError for a ``timeout`` that is not None nor a finite number >= 0
        (under every policy). ``timeout`` is keyword-only: a second positional argument
        (such as the context of Zuplo's ``enqueue(entry, context)``) raises TypeError.
        """
        # The instance replaces this with a faster closure of the same behaviour (see __init__).
        if timeout is not None:
            check_seconds("timeout", timeout)
        lane = self._lane
        lane.append(entry)
        if len(lane) >= lane.trigger:
            self._engine.kick(lane)

    def submit(self, entry: T, *, timeout: float | None = None) -> Future[None]:
        """Like :meth:`enqueue`, and return a Future resolved when the batch holding ``entry`` was sent.

        The Future's exception is the send error, or QueueFullError if the entry was dropped.
        ``timeout`` is keyword-only, as for :meth:`enqueue`.
        """
        future: Future[None] = LazyFuture()  # its Condition is made only if someone waits
        self._sender.has_submitted = True
        item: Any = _Submitted(entry, future)
        if timeout is None:
            self.enqueue(item)  # the positional call: the fast path's specialized form
        else:
            self.enqueue(item, timeout=timeout)
        return future

    def _replay(self, pending: list[tuple[int, Any]]) -> None:
        """Put spooled entries in the buffer, in order; what exceeds ``max_queue_size`` is sent first, here."""
        items = self._spooled_items(pending)
        room = self._engine.max_queue_size or len(items)
        for start in range(0, len(items), room):
            if start:
                self._engine.flush(None)  # the buffer is empty again before the next part
            self._engine.put_many(items[start : start + room])

    def spool_dead_letters(self, limit: int = 100) -> list[SpoolDeadLetter]:
        """The spool's dead letters (entries whose batch failed for good), oldest first; at most ``limit``."""
        return self._own_spool().dead_letters(limit)

    def replay_spool_dead_letters(self, seqs: list[int] | None = None) -> int:
        """Enqueue dead letters again (all, or those numbered), oldest first; returns how many.

        At most as many as the buffer has room for now (call again for the rest); they keep
        their sequence numbers and leave the spool once sent, or go back to the dead letters.
        """
        room = max(0, (self._engine.max_queue_size or 0) - self._engine.pending())
        items = self._spooled_items(self._own_spool().take_dead_letters(seqs, limit=room))
        if items:
            self._engine.put_many(items)
        return len(items)

    def _spooled_items(self, rows: list[tuple[int, Any]]) -> list[Any]:
        """The buffer's items for spooled ``(seq, entry)`` rows (tracing on: each with an empty context)."""
        items: list[Any] = [_Spooled(seq, entry, None) for seq, entry in rows]
        if self._sender.tracing is None:
            return items
        from opentelemetry.context import Context  # tracing on: the API is installed

        empty = Context()  # links to no producer
        return [(item, empty) for item in items]

    def _own_spool(self) -> Spool:
        spool = self._spool
        if spool is None:
            raise ConfigurationError(f"{self.name} has no spool (pass spool=PATH)")
        return spool

    def _set_immediate(self, on: bool) -> None:
        """Swap ``enqueue``/``submit`` for the immediate ones (on) or back; idempotent, never blocks.

        Called by the immediate switch (testing.immediate()) on any thread, and by the
        constructor inside a block. The normal path pays nothing for it: only these two
        instance attributes change.
        """
        self._sender.immediate = on
        if on:
            self.enqueue = self._enqueue_now  # type: ignore[method-assign]
            self.submit = self._submit_now  # type: ignore[method-assign]
        else:
            self.enqueue = self._enqueue_queued  # type: ignore[method-assign]
            self.__dict__.pop("submit", None)

    def _enqueue_now(self, entry: T, *, timeout: float | None = None) -> None:
        """Immediate ``enqueue``: entries still in the engine go first, then this one is sent here."""
        self._send_now(entry, None, timeout)

    def _submit_now(self, entry: T, *, timeout: float | None = None) -> Future[None]:
        """Immediate ``submit``: as :meth:`_enqueue_now`; the Future is settled when it returns."""
        future: Future[None] = LazyFuture()
        self._send_now(entry, future, timeout)
        return future

    def _send_now(self, entry: T, future: Future[None] | None, timeout: float | None) -> None:
        if timeout is not None:
            check_seconds("timeout", timeout)
        if self._closed:
            self._lane.append(entry)  # raises DispatcherClosedError naming the entry
        engine = self._engine
        if (engine.pending() or engine.in_flight()) and not engine.on_worker_thread():
            engine.flush(None)  # what was enqueued before the switch goes first, in order
        self._sender.send_now(entry, future)

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything enqueued before this call and wait for it and for sends in progress.

        Blocks up to ``timeout`` seconds (None: no limit), even if ``send_batch`` hangs.
        Returns whether all of it was handed to ``send_batch`` (and returned) in time;
        failures are reported through ``on_error``.
        """
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        return self._engine.flush(timeout)

    def _begin_close(self) -> None:
        """The first close(): from here every append to the lane raises, through any enqueue reference."""
        self._lane.__class__ = ClosedFifoLane
        self._sender.closing.set()

    def _finish_close(self, deadline: float | None) -> bool:
        """Send everything pending and stop the worker by ``deadline``; whether all went without a failed send."""
        failed_before = self._sender.failed
        drained = self._engine.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        # Last: a send still running past close()'s timeout falls back to an untimed call.
        self._caller.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._spool is not None:
            self._spool.close()  # after the drain: the last acks are written
        return drained and self._sender.failed == failed_before

    @property
    def total_dropped(self) -> int:
        """Entries dropped by the overflow policy since the dispatcher was made."""
        return self._engine.dropped

    def stats(self) -> dict[str, int]:
        """Counters: enqueued, sent, failed, dropped, pending, batches, calls, retries, failed_batches,
        abandoned_calls (timed-out sends whose threads still run), call_timeouts."""
        engine = self._engine
        pending = engine.pending()
        caller = self._caller.stats()
        sender = self._sender
        return {
            "enqueued": engine.taken + pending + engine.dropped + sender.immediate_entries,
            "sent": self._sender.sent,
            "failed": self._sender.failed,
            "dropped": engine.dropped,
            "pending": pending,
            "in_flight": engine.in_flight(),
            "batches": engine.batches + sender.immediate_batches,
            "calls": self._sender.calls,
            "retries": self._sender.retries,
            "failed_batches": self._sender.failed_batches,
            "abandoned_calls": caller["abandoned_calls"],
            "call_timeouts": caller["call_timeouts"],
        }

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return 0, 0  # the engine is registered itself and drains the entries

    def _reset_after_fork(self) -> None:
        """In a forked child: a fresh close lock and the child's own counters, from zero.

        The engine resets itself (empty buffer, fresh locks, a fresh worker on the next
        entry). Entries pending or being sent at fork are the parent's: the parent sends
        them and resolves their ``submit()`` Futures; the child neither sends nor counts
        them, and its copies of those Futures are never resolved.
        """
        self._reset_closing_after_fork()
        if self._closed:
            # Forked in the middle of close(): finish the transition it had begun.
            self._lane.__class__ = ClosedFifoLane
        self._sender.reset(closing=self._closed)
        if self._spool is not None:
            # The parent's spool (connection and lock) stays the parent's: kept, never used nor closed here.
            _forked_spools.append(self._spool)
            self._spool = self._sender.spool = None
            self._enqueue_queued = self._enqueue_unspooled
            if "submit" not in self.__dict__:  # not in immediate mode
                self.enqueue = self._enqueue_unspooled  # type: ignore[method-assign]

    def __repr__(self) -> str:
        # Never raises: an instance whose __init__ failed part-way lacks some attributes.
        name = getattr(self, "name", None)
        ms_delay = getattr(self, "ms_delay", None)
        closed = getattr(self, "_closed", None)
        if closed is None:
            return f"<BackgroundDispatcher {name!r} not constructed>"
        state = "closed" if closed else "open"
        return f"<BackgroundDispatcher {name!r} ms_delay={ms_delay} {state}>"


_ENQUEUE_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("entry", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=None),
    ],
    return_annotation=None,
)
