"""BackgroundDispatcher: entries batched over a time window and handed to one function.

The face of Zuplo's BackgroundDispatcher on the shared :class:`~threaddispatch._engine.BatchEngine`.
``enqueue`` is lock-free: an append and a length check, with the engine's lock taken
only when a window opens, a batch fills, or the buffer overflows. This module is the
public object (options, the spool's replay, flush, close, fork); what its worker does with
a batch is in ``_background_sender``, and the enqueue closures it binds in ``_background_enqueue``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from threaddispatch import _immediate, _lifecycle
from threaddispatch._background_enqueue import (
    _lock_free_enqueue,
    _lock_free_traced_enqueue,
    _positional_timeout,
    _spooled_enqueue,
    _traced_enqueue,
)
from threaddispatch._background_sender import FailedBatch, _capture, _Sender, _Spooled, _Submitted
from threaddispatch._engine import OVERFLOW_POLICIES, BatchEngine, Overflow
from threaddispatch._future import LazyFuture
from threaddispatch._invoke import TimedCaller
from threaddispatch._lanes import ClosedFifoLane, FifoLane
from threaddispatch._spool import Spool, SpoolDeadLetter, SpoolSync
from threaddispatch._trace import make_tracing
from threaddispatch._validate import (
    check_path,
    check_positive_int,
    check_positive_number,
    check_text,
    check_wait,
)
from threaddispatch.backoff import RetryPolicy
from threaddispatch.errors import ConfigurationError
from threaddispatch.metrics import Metrics, check_metrics

__all__ = ["BackgroundDispatcher", "FailedBatch"]

T = TypeVar("T")

_forked_spools: list[Spool] = []  # a forked child's copies of its parent's spools: never closed in the child
_names = iter(range(1, 1 << 62))


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

    At interpreter exit the one exit drain sends what is pending (see
    :func:`~threaddispatch.set_exit_timeout`). After it, nothing would send an entry (no
    thread may start at exit), so the dispatcher is closed then: ``enqueue``/``submit``
    in an ``atexit`` hook that runs after the drain raise DispatcherClosedError, as the
    other dispatchers do, instead of accepting an entry that would be lost silently. A
    dispatcher made after the drain is closed at once. (A
    :class:`~threaddispatch.logging.BatchingHandler`'s stays open: ``logging.shutdown``,
    which runs later, flushes it on the exiting thread.)
    """

    #: Whether the exit drain's end closes the dispatcher. A BatchingHandler sets it False on its
    #: dispatcher before ``__init__`` (logging.shutdown flushes it); the face's class stays this one.
    _closes_after_exit_drain = True

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
        check_positive_number("ms_delay", ms_delay)  # an int past float range too: not an OverflowError
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
        else:
            check_text("name", name)  # no NUL nor lone surrogate: it names the worker thread and the log lines
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        if send_timeout is not None:
            send_timeout = check_wait("send_timeout", send_timeout, allow_zero=False)
        if spool_sync not in ("normal", "full"):
            raise ConfigurationError(f"spool_sync must be 'normal' or 'full', got {spool_sync!r}")
        if spool is not None:
            check_path("spool", spool)
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
                self.enqueue = _documented(_traced_enqueue(self.enqueue, _capture(), lane))  # type: ignore[method-assign]
        elif tracing is not None:
            self.enqueue = _documented(_lock_free_traced_enqueue(lane, self._engine.kick, _capture()))  # type: ignore[method-assign]
        else:
            self.enqueue = _documented(_lock_free_enqueue(lane, self._engine.kick))  # type: ignore[method-assign]
        self._enqueue_unspooled = self.enqueue  # what a forked child uses
        self._spool = opened
        if opened is not None:
            self._sender.spool = opened
            self.enqueue = _documented(_spooled_enqueue(self.enqueue, opened, lane))  # type: ignore[method-assign]
            self._replay(opened.pending())
        self._enqueue_queued = self.enqueue  # what _set_immediate(False) puts back
        # For the fork reset and the immediate switch; held weakly, so it never keeps self alive.
        _lifecycle.register(self)
        if _immediate.active():
            self._set_immediate(True)
        if _lifecycle.drained():  # made in an atexit hook after the drain: nothing would send its entries
            self._after_exit_drain()

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
            check_wait("timeout", timeout)
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
            check_wait("timeout", timeout)
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
            timeout = check_wait("timeout", timeout)
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

    def _after_exit_drain(self) -> None:
        """After the exit drain's last pass: close intake, so a late entry is refused, not lost silently.

        Not ``close()``: the engine was drained and closed by the drain, and nothing may
        wait here. The close lock is held only for ``_begin_close`` (no user code), so its
        wait is short; it is bounded all the same.
        """
        if not self._closes_after_exit_drain:
            return
        if not self._close_lock.acquire(timeout=_lifecycle.get_exit_timeout()):
            return
        try:
            if not self._closed:
                self._closed = True
                self._lane.owner = f"BackgroundDispatcher {self.name!r} (after the interpreter's exit drain)"
                self._begin_close()
                if self._finalizer is not None:
                    self._finalizer.detach()
        finally:
            self._close_lock.release()

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


def _documented(enqueue: Callable[..., None]) -> Callable[..., None]:
    """A bound enqueue closure with :meth:`BackgroundDispatcher.enqueue`'s docstring (``help()`` shows it)."""
    enqueue.__doc__ = BackgroundDispatcher.enqueue.__doc__
    return enqueue
