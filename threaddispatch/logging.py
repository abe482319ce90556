"""BatchingHandler: a ``logging.Handler`` that ships records in batches through a BackgroundDispatcher.

For scripts and web apps that send logs to a remote service: the logging call only
appends to a buffer; ``send_records(records)`` runs on the dispatcher's thread at most
once per ``ms_delay`` window.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from collections.abc import Callable

from threaddispatch._engine import Overflow
from threaddispatch._invoke import invoke
from threaddispatch._log_json import JsonFormatter
from threaddispatch._validate import check_wait
from threaddispatch.background import BackgroundDispatcher, FailedBatch
from threaddispatch.backoff import RetryPolicy
from threaddispatch.metrics import Metrics

__all__ = ["BatchingHandler", "JsonFormatter"]

# Shared by every BatchingHandler: ``active`` is True on a thread while it delivers a batch for any
# of them (the worker, or the caller in immediate mode: the sends, the dispatcher's failure record,
# on_error), runs a send_records (also a send_timeout runner thread), or queues a record in emit (the
# dispatcher's "is dropping entries" line). No BatchingHandler queues a record logged there, so two
# handlers cannot feed each other their failure or drop reports, nor one itself; and such a record
# takes no BatchingHandler's lock (handle), so two threads cannot each hold one and wait for the other.
# ``reported`` (a weakref) is the last skipped record handed to logging.lastResort on this thread.
_DELIVERING = threading.local()


class BatchingHandler(logging.Handler):
    """Batches log records to ``send_records(list[LogRecord])`` on a background thread.

    ``emit`` never raises into the logging call and never blocks (the default
    ``overflow="drop_newest"`` drops records past ``max_queue_size`` and counts them).
    Records are prepared as ``logging.handlers.QueueHandler`` does: the message is
    formatted on the caller's thread into a copy of the record whose ``args``/``exc_info``
    are cleared, so it is safe to send later; the original goes on unchanged to the
    logger's other handlers. Records logged while a batch is being delivered (by
    ``send_records`` itself, by ``on_error``, and the dispatcher's own "send_batch failed"
    record, on the dispatcher's thread), and the dispatcher's "is dropping entries" line
    (logged in ``emit`` when the queue is full), are not queued by this handler nor by any
    other BatchingHandler, so a handler that logs to its own logger cannot feed itself, and
    two on one logger cannot feed each other, even while their servers are down. They are
    counted in ``self_records_skipped`` and still reach the logger's other handlers; when
    it has none but BatchingHandlers, one at WARNING or above goes to ``logging.lastResort``
    (stderr), once, as Python does for a logger without handlers.

    ``send_records`` (and ``on_error``) may be ``async def``: the coroutine is awaited on
    the sending thread. ``send_timeout`` is the dispatcher's per-call timeout: a send past
    it fails with DispatchTimeoutError (to ``on_error``/``retry``) and later batches go.
    ``metrics`` and ``tracer_provider`` are the dispatcher's (see
    :class:`~threaddispatch.background.BackgroundDispatcher`): with a tracer provider each
    send of records is a span linked to the spans the records were logged in.

    At interpreter exit, threaddispatch's exit drain sends the queued records; one logged
    after it (in a later ``atexit`` hook) is sent when ``logging.shutdown`` flushes the handler.
    """

    def __init__(
        self,
        send_records: Callable[[list[logging.LogRecord]], object],
        ms_delay: float = 100,
        *,
        level: int | str = logging.NOTSET,
        max_batch_size: int = 1000,
        max_queue_size: int = 10_000,
        overflow: Overflow = "drop_newest",
        retry: RetryPolicy | None = None,
        on_error: Callable[[FailedBatch[logging.LogRecord]], object] | None = None,
        name: str | None = None,
        send_timeout: float | None = None,
        metrics: Metrics | None = None,
        tracer_provider: object = None,
    ) -> None:
        super().__init__(level)
        self._sending = _DELIVERING  # see _DELIVERING: one marker for every BatchingHandler
        dispatcher: BackgroundDispatcher[logging.LogRecord] = BackgroundDispatcher.__new__(BackgroundDispatcher)
        # Set before __init__, which reads it when made after the exit drain: this dispatcher stays
        # open then, because logging.shutdown (an atexit hook registered when logging was imported,
        # so it runs after threaddispatch's drain) flushes the handler on the exiting thread, where
        # the engine delivers inline.
        dispatcher._closes_after_exit_drain = False
        BackgroundDispatcher.__init__(
            dispatcher,
            self._sender_of(send_records),
            ms_delay,
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            overflow=overflow,
            on_error=on_error,
            retry=retry,
            name=name or "logging",
            send_timeout=send_timeout,
            metrics=metrics,
            tracer_provider=tracer_provider,
        )
        self.dispatcher = dispatcher
        dispatcher._sender.marker = self._sending
        self.self_records_skipped = 0

    def _sender_of(
        self, send_records: Callable[[list[logging.LogRecord]], object]
    ) -> Callable[[list[logging.LogRecord]], object]:
        """``send_records`` run (and awaited) with this thread marked as sending, whichever thread runs it."""
        if not callable(send_records):
            return send_records  # the dispatcher refuses it, naming it
        sending = self._sending

        def send(records: list[logging.LogRecord]) -> object:
            previous = getattr(sending, "active", False)
            sending.active = True
            try:
                return invoke(send_records, records)
            finally:
                sending.active = previous

        return send

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """A copy of ``record`` with the message formatted now and what cannot travel (args, exc_info) stripped.

        The record itself is left as it was: later handlers on the logger format it
        their own way (the bug ``QueueHandler.prepare`` fixed in bpo-35726).
        """
        message = self.format(record)
        record = copy.copy(record)
        record.message = message
        record.msg = message
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return record

    def handle(self, record: logging.LogRecord) -> bool:
        """As ``logging.Handler.handle``; a record logged inside a BatchingHandler's delivery or emit is skipped
        without taking this handler's lock (see :meth:`emit`). Never blocks then."""
        if getattr(_DELIVERING, "active", False):
            passed = self.filter(record)
            if passed:
                self._skip(passed if isinstance(passed, logging.LogRecord) else record)  # 3.12: filters may return one
            return bool(passed)
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        """Queue ``record``; O(1), never raises (errors go to ``handleError``), never blocks with drop policies."""
        sending = self._sending
        try:
            if getattr(sending, "active", False):
                self._skip(record)
                return
            sending.active = True  # the dispatcher's drop report, logged in enqueue, is queued by no BatchingHandler
            try:
                self.dispatcher.enqueue(self.prepare(record))
            finally:
                sending.active = False
        except Exception:  # noqa: BLE001 - a logging call must never raise
            self.handleError(record)

    def _skip(self, record: logging.LogRecord) -> None:
        """Count a record logged while a BatchingHandler delivers or queues; to lastResort if no one else takes it."""
        self.self_records_skipped += 1
        _last_resort(record)

    def flush(self, timeout: float | None = 5.0) -> None:
        """Send the queued records and wait up to ``timeout`` seconds for them."""
        dispatcher = self._dispatcher()
        if dispatcher is not None and not dispatcher.closed:
            dispatcher.flush(timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Send the queued records, stop the thread (up to ``timeout`` seconds), and close the handler.

        A ``timeout`` past ``MAX_WAIT`` (or not a number >= 0) raises ConfigurationError before
        anything closes: the handler stays registered with logging and keeps delivering.
        """
        if timeout is not None:
            check_wait("timeout", timeout)
        try:
            dispatcher = self._dispatcher()
            if dispatcher is not None:
                dispatcher.close(timeout)
        finally:
            super().close()

    def _dispatcher(self) -> BackgroundDispatcher[logging.LogRecord] | None:
        # None for a handler whose __init__ failed before making it: logging.shutdown()
        # still flushes and closes every handler that got as far as logging.Handler.__init__.
        return getattr(self, "dispatcher", None)

    def __repr__(self) -> str:
        # Never raises: an instance whose __init__ failed part-way lacks some attributes.
        level = logging.getLevelName(getattr(self, "level", logging.NOTSET))
        dispatcher = self._dispatcher()
        if dispatcher is None:
            return f"<BatchingHandler ({level}) not constructed>"
        return f"<BatchingHandler {dispatcher.name!r} ({level})>"


def _last_resort(record: logging.LogRecord) -> None:
    """Hand ``record``, skipped by a BatchingHandler, to ``logging.lastResort`` when no other handler takes it.

    Once per record (every BatchingHandler on the way skips it, on this one thread), and only
    at lastResort's level (WARNING) or above; "other handler" as ``Logger.callHandlers`` finds
    them: up the hierarchy until a logger that does not propagate, at a level the record passes.
    """
    last = logging.lastResort
    if last is None or record.levelno < last.level:
        return
    reported = getattr(_DELIVERING, "reported", None)
    if reported is not None and reported() is record:
        return
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        for handler in logger.handlers:
            if not isinstance(handler, BatchingHandler) and record.levelno >= handler.level:
                return
        logger = logger.parent if logger.propagate else None
    _DELIVERING.reported = weakref.ref(record)
    last.handle(record)
