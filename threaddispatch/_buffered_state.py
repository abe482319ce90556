"""The runtime of an AsyncDispatcher: its bounded buffer, its dispatch loop and its failure loop.

:class:`_AsyncState` is everything the two loops touch; they hold it, never the
AsyncDispatcher, so an unreferenced dispatcher can be collected while its loops drain.
Producers ``put`` into the buffer; the dispatch loop (daemon thread
``threaddispatch-async-<target>``) hands each message to the dispatcher (``dispatch``,
``submit``, or a BatchedDispatcher's Future-free hand-off, taken from the buffer in
chunks); failures go to ``RetryPolicy.next_delay`` and, when final, to the failure loop
(``threaddispatch-async-<target>-failures``), which calls the error handler, so a slow
handler never stalls dispatch.

Why this face has its own loop instead of the shared BatchEngine: it is a one-by-one
hand-off, not a batcher. There is no time window and no batch; what it needs is a
bounded buffer whose ``put`` blocks while it is full (back-pressure, with a timeout)
and a strict count of what is waiting, which the engine's lanes (drop/raise/block
per lane, batches taken by a window) do not model.

Locking (model: CPython ``queue.py``): one mutex, ``_AsyncState.mutex``, must be held
whenever the buffer, the retry queue (a DelayQueue on work_ready), the failure queue, the
flags or the counters change; three Conditions share it. User code (the dispatcher, the
error handler, the retry policy's predicate and backoff) is always called with it released.

Why one module of ~800 lines: it is one object under one mutex. The producers, the two
loops, the retries and immediate mode all change the same buffer and counters under that
lock; split across modules, its invariant would be too.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from itertools import repeat, starmap
from typing import Any, Generic, TypeVar

from threaddispatch import _drop_log, _lifecycle
from threaddispatch._batched_immediate import call_here
from threaddispatch._buffered_types import (
    Dispatcher,
    FailedMessage,
    _check_delay,
    _Entry,
    _failed,
    _SpooledEntry,
    in_context,
)
from threaddispatch._invoke import Outcome, TimedCaller, call, close_thread_loop, resolve
from threaddispatch._spool import Spool
from threaddispatch._timers import DelayQueue
from threaddispatch._validate import show
from threaddispatch.backoff import RetryPolicy
from threaddispatch.errors import CancelledError, ConfigurationError, DispatcherClosedError, QueueFullError
from threaddispatch.metrics import FaceRecorder

T = TypeVar("T")

_log = logging.getLogger("threaddispatch")

# Returned by _next_job instead of a message: call the dispatcher's flush() now.
_FLUSH: Any = object()

# Returned by _next_job instead of a message: acknowledge the dispatched messages in the spool now
# (nothing came for _ACK_DELAY, or the loop is about to stall on the failure backlog).
_ACK: Any = object()

# The longest single wait of the dispatch loop (a retry due far ahead is waited for in steps).
_MAX_WAIT = 3600.0

# About the most buffered messages the dispatch loop takes under one lock for a hand-off (which
# never blocks): usually all of them (a buffer of up to about this many), so one lock round trip with
# the producers and one run of inline sends (a send slot taken, one settle) per buffer's worth, not
# per part of it. max_in_flight still bounds what is handed over and unsettled. Rounded up to whole
# batches of the BatchedDispatcher (see _hand_chunk). A spooled hand-off takes _ACK_GROUP instead
# (see _AsyncState.use_spool).
_HAND_CHUNK = 1024
_MAX_HAND_CHUNK = 1024


# The most messages the dispatch loop dispatches before it acknowledges them in the spool, in one
# commit, so a crash sends again at most this many besides the one in flight. It acknowledges
# sooner when no message came for _ACK_DELAY seconds, before a stall and as it leaves: a commit
# per message would compete with the producers' appends for the file.
_ACK_GROUP = 64
_ACK_DELAY = 0.01


# Why the lost log's lines name no overflow policy: what loses a message here is the missing handler.
_LOST_POLICY = "no error_handler: a message that fails for good is lost"


def _hand_chunk(batch_size: object, chunk: int = _HAND_CHUNK) -> int:
    """How many messages one hand-off takes: ``chunk`` rounded up to whole batches of ``batch_size``
    when they fit (up to _MAX_HAND_CHUNK), else ``chunk``.

    Whole batches, so that a busy loop leaves no partial batch behind it (a partial batch waits
    in the lane for its window, or for the next hand-off to complete it, at the cost of a hop).
    """
    if not isinstance(batch_size, int) or batch_size <= 0 or batch_size > _MAX_HAND_CHUNK:
        return chunk
    return -(-chunk // batch_size) * batch_size


class _AsyncState(Generic[T]):
    """Everything the two loops touch. They hold this, never the AsyncDispatcher, so it can be collected.

    Also the object registered with the lifecycle registry (exit drain, fork reset): it
    lives as long as a loop runs, even when nobody references the dispatcher any more.
    """

    # Drain at exit before the components we feed (a BatchedDispatcher's engine and pool).
    _drain_order = -10

    def __init__(
        self,
        dispatcher: Dispatcher[T],
        target: str,
        error_handler: Callable[[FailedMessage[T]], object] | None,
        *,
        retry: RetryPolicy | None,
        max_in_flight: int,
        max_failures_pending: int | None,
        dispatch_timeout: float | None,
    ) -> None:
        self.dispatcher = dispatcher
        submit = getattr(dispatcher, "submit", None)
        flush = getattr(dispatcher, "flush", None)
        self.submit: Callable[..., Future[Any]] | None = submit if callable(submit) else None
        # A BatchedDispatcher's Future-free hand-off (settled once per batch); only without a
        # dispatch_timeout, which it would not need (it never blocks) but which submit honours.
        hand_off = getattr(dispatcher, "_hand_off", None) if dispatch_timeout is None else None
        self.hand_off: Callable[..., list[tuple[Any, BaseException]]] | None = hand_off if callable(hand_off) else None
        self.hand_chunk = _hand_chunk(getattr(dispatcher, "max_batch_size", None)) if self.hand_off else _HAND_CHUNK
        self.on_handed = self._on_handed  # made once: the hand-off groups a batch's messages by it
        self.flush: Callable[[float | None], object] | None = flush if callable(flush) else None
        self.target = target
        self.error_handler = error_handler
        self.retry = retry
        self.max_in_flight = max_in_flight
        self.capacity = 0  # set by setup(); 0 until then
        # The failure backlog the dispatch loop may fill before it waits for the handler;
        # None until setup() (then buffer_len unless max_failures_pending was given).
        self.failure_capacity = max_failures_pending
        self.is_setup = False
        self.started = False
        self.restart_on_put = False  # a forked child restarts its loops lazily
        self.closing = False
        self.stop_deadline: float | None = None
        self.failed_at_stop = 0
        self.abandon_reported = False  # the "never started" warning is logged once
        # Accepted messages that left the buffer (taken by the dispatch loop, run at once in immediate
        # mode, failed by a dying loop, dropped by a fork): `buffered` is this plus what the buffer holds,
        # so a put counts nothing itself.
        self.unbuffered = 0
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.rejected = 0
        self.handler_errors = 0
        self.failure_stalls = 0  # times the dispatch loop waited for the failure backlog to shrink
        # dispatch and submit run through it: on the dispatch loop without a timeout, else on its runners.
        self.caller = TimedCaller(f"async-{target}", timeout=dispatch_timeout)
        # What a dispatch goes through: call() itself when there is no timeout (one hop fewer).
        self.call: Callable[..., Outcome] = call if dispatch_timeout is None else self.caller.call
        # Set by the AsyncDispatcher when metrics are on (before any loop starts): each direct
        # dispatch is then timed; a submit or hand-off is timed by the dispatcher it goes to.
        self.recorder: FaceRecorder | None = None
        # Set by the AsyncDispatcher given a spool (before any loop starts; None in a forked child):
        # its entries are then _SpooledEntry, acknowledged or dead-lettered where they settle.
        self.spool: Spool | None = None
        # Whether put/try_put are the immediate ones (_set_immediate).
        self.immediate = False
        # Not closing, no restart due, not immediate: Sender.put may buffer inline (one test, under mutex,
        # instead of three). Kept by _update_put_open wherever one of the three changes.
        self.put_open = True
        self._init_runtime()

    @property
    def buffered(self) -> int:
        """Messages accepted since setup (read ``unbuffered`` and the buffer under mutex for one instant)."""
        return self.unbuffered + len(self.buffer)

    def _update_put_open(self) -> None:
        self.put_open = not (self.closing or self.restart_on_put or self.immediate)

    def use_spool(self, spool: Spool | None) -> None:
        """Set the spool (before any loop starts). A spooled hand-off takes _ACK_GROUP messages at a time
        (in whole batches), not _HAND_CHUNK: its run of inline sends is acknowledged at once, and a crash
        sends again at most about that many."""
        self.spool = spool
        if spool is not None and self.hand_off is not None:
            self.hand_chunk = _hand_chunk(getattr(self.dispatcher, "max_batch_size", None), _ACK_GROUP)

    def _init_runtime(self) -> None:
        # mutex must be held whenever any field below, a flag above or a counter changes.
        self.mutex = threading.Lock()
        self.work_ready = threading.Condition(self.mutex)  # the dispatch loop waits here
        self.not_full = threading.Condition(self.mutex)  # producers blocked by a full buffer
        self.failure_ready = threading.Condition(self.mutex)  # the failure loop waits here
        self.buffer: deque[_Entry[T]] = deque()
        # Messages waiting to be retried: (entry, attempts made), due by time. Counted in in_flight.
        self.retries: DelayQueue[tuple[_Entry[T], int]] = DelayQueue(self.work_ready)
        # == len(retries), kept beside it: the dispatch loop reads it once per message, a plain int is cheaper.
        self.retrying = 0
        # Failed for good, waiting for the failure loop. The dispatch loop takes no message while
        # it holds failure_capacity or more (back-pressure, as the seed's bounded failure channel).
        self.failures: deque[FailedMessage[T]] = deque()
        # Taken from the buffer and not settled yet: being sent, submitted, or waiting to retry.
        self.in_flight = 0
        # id(entry) -> attempts made, for each retried entry handed to a BatchedDispatcher and not settled
        # (a fresh one made none and is not here): the hand-off's token is the entry alone. An entry in
        # flight is alive (the hand-off holds it), so its id names it until it is settled and leaves here.
        self.handed_attempts: dict[int, int] = {}
        self.put_waiters = 0
        self.loop_waiting = False
        self.submitted = 0
        self.flushed_at = 0
        self.dispatch_thread: threading.Thread | None = None
        self.failure_thread: threading.Thread | None = None
        self.dispatch_done = False
        self.failures_done = False
        # Immediate mode: messages are dispatched by the putting threads, one at a time under this
        # lock (reentrant: a dispatch may put to its own sender). Never held with mutex.
        self.immediate_lock = threading.RLock()
        # Without an error handler, messages failed for good are lost: said on the drop-log cadence
        # (a WARNING with the first one's traceback, at most one a minute after, INFO at recovery).
        # Its calls are made with mutex released (it takes its own lock, and logging the handlers').
        self.lost_log = _drop_log.DropLog(_log, self.describe(), _LOST_POLICY, interval=_drop_log.INTERVAL)

    # -- producers (called with nothing held) --------------------------------------------------

    def check_delay(self, value: object) -> int | None:
        """``delay_seconds`` for a put; ConfigurationError for a bad value or a dispatcher that cannot take one."""
        delay = _check_delay(value)
        if not getattr(self.dispatcher, "accepts_delay_seconds", True):
            raise ConfigurationError(
                f"{self.describe()}: delay_seconds={value!r} cannot be passed on by {show(self.dispatcher)} "
                f"(accepts_delay_seconds is False; a BatchedDispatcher needs envelopes=True or hold_delays=True)"
            )
        return delay

    def put(self, entry: _Entry[T], timeout: float | None) -> None:
        """Buffer ``entry``, waiting up to ``timeout`` for room. Sender.put runs the case of an open
        buffer with room (no restart due) inline, as here: the two must accept alike."""
        with self.mutex:
            if self.closing:
                raise DispatcherClosedError(f"{self.describe()} is stopped; {show(entry[0])} was not accepted")
            if len(self.buffer) >= self.capacity:
                caller = threading.current_thread()
                if caller is self.failure_thread or caller is self.dispatch_thread:
                    self.rejected += 1
                    raise QueueFullError(
                        f"{self.describe()}: buffer is full ({self.capacity} messages) and put() was called "
                        f"{self._cannot_wait(caller)}; {show(entry[0])} was not accepted"
                    )
                self._wait_for_room(entry[0], timeout)
            # _append inline: once per message.
            if self.restart_on_put:
                self.start_threads()  # may raise (interpreter exiting): before the message is accepted
            self.buffer.append(entry)
            if self.loop_waiting:
                self._wake_loop()

    def _cannot_wait(self, caller: threading.Thread) -> str:
        """Why ``caller``, a loop thread, cannot wait for room: only the dispatch loop makes it."""
        if caller is self.dispatch_thread:
            return "on the dispatch loop (from dispatch, or a send_batch it runs), which alone makes room"
        return "from the error handler, which cannot wait for room (the dispatch loop may be waiting for the handler)"

    def try_put(self, entry: _Entry[T]) -> bool:
        with self.mutex:
            if self.closing:
                raise DispatcherClosedError(f"{self.describe()} is stopped; {show(entry[0])} was not accepted")
            if len(self.buffer) >= self.capacity:
                self.rejected += 1
                return False
            self._append(entry)
            return True

    def put_spooled(self, entries: list[_Entry[T]]) -> None:
        """Buffer spooled entries (a previous owner's, dead letters replayed), in order, before any later put.

        All of them, even past ``buffer_len`` (producers then wait until the buffer is below
        it again). Raises DispatcherClosedError after stop.
        """
        with self.mutex:
            if self.closing:
                raise DispatcherClosedError(f"{self.describe()} is stopped; spooled messages were not accepted")
            if entries and self.restart_on_put:
                self.start_threads()
            self.buffer.extend(entries)
            if entries and self.loop_waiting:
                self._wake_loop()

    def room(self) -> int:
        """Free places in the buffer now."""
        with self.mutex:
            return max(0, self.capacity - len(self.buffer))

    def _wait_for_room(self, message: T, timeout: float | None) -> None:
        """Wait until the buffer has room; holds mutex. Raises QueueFullError or DispatcherClosedError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.put_waiters += 1
        try:
            while len(self.buffer) >= self.capacity:
                if self.closing:
                    raise DispatcherClosedError(
                        f"{self.describe()} stopped while {show(message)} waited for room; it was not accepted"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self.rejected += 1
                    raise QueueFullError(
                        f"{self.describe()}: buffer stayed full ({self.capacity} messages) for {timeout}s; "
                        f"{show(message)} was not accepted"
                    )
                self.not_full.wait(remaining)
        finally:
            self.put_waiters -= 1
        if self.closing:
            # Room appeared, but stop() began while we waited: the dispatch loop may
            # already have drained and left, so refuse rather than strand the message.
            raise DispatcherClosedError(
                f"{self.describe()} stopped while {show(message)} waited for room; it was not accepted"
            )

    def _append(self, entry: _Entry[T]) -> None:
        """Add an accepted message; holds mutex."""
        if self.restart_on_put:
            self.start_threads()  # may raise (interpreter exiting): before the message is accepted
        self.buffer.append(entry)
        if self.loop_waiting:
            self._wake_loop()

    # -- lifecycle -----------------------------------------------------------------------------

    def describe(self) -> str:
        return f"AsyncDispatcher for {self.target!r}"

    def start_threads(self) -> None:
        """Start both loops; holds mutex. No thread starts during interpreter exit."""
        if _lifecycle.exiting():
            raise DispatcherClosedError(f"{self.describe()}: the interpreter is exiting; no loop may start")
        self.started = True
        self.restart_on_put = False
        self._update_put_open()
        name = f"threaddispatch-async-{self.target}"
        self.dispatch_thread = threading.Thread(target=self.run_dispatch, name=name, daemon=True)
        self.failure_thread = threading.Thread(target=self.run_failures, name=f"{name}-failures", daemon=True)
        self.dispatch_thread.start()
        self.failure_thread.start()

    def begin_stop(self, deadline: float | None, *, start_if_idle: bool) -> None:
        """Stop intake and wake everyone; the loops drain and leave. Returns at once."""
        abandoned = 0
        with self.mutex:
            if not self.closing:
                self.closing = True
                self._update_put_open()
                self.stop_deadline = deadline
                self.failed_at_stop = self.failed
                self.work_ready.notify_all()
                self.not_full.notify_all()
                self.failure_ready.notify_all()
            if not self.started and self.buffer:
                if start_if_idle and not _lifecycle.exiting():
                    # Stopped before start: the buffer is still delivered, not dropped.
                    self.start_threads()
                elif not self.abandon_reported:
                    self.abandon_reported = True
                    abandoned = len(self.buffer)
        if abandoned:
            _log.warning(
                "%s stopped without ever starting; %d buffered message(s) were not dispatched",
                self.describe(),
                abandoned,
            )

    def stop_unreferenced(self) -> None:
        """What the AsyncDispatcher's finalizer calls: begin the stop without ever waiting for ``mutex``.

        The cycle collector may run the finalizer on a thread that holds ``mutex`` already
        (a collection inside a locked section, e.g. on a loop thread); waiting for it there
        would deadlock. When the mutex is free the stop begins here, otherwise on a
        short-lived daemon thread (none during interpreter exit: the exit drain stops us).
        """
        if self.mutex.acquire(blocking=False):
            self.mutex.release()
            self.begin_stop(None, start_if_idle=False)
            return
        if _lifecycle.exiting():
            return
        threading.Thread(
            target=self.begin_stop,
            args=(None,),
            kwargs={"start_if_idle": False},
            name=f"threaddispatch-async-{self.target}-stop",
            daemon=True,
        ).start()

    def join(self, deadline: float | None) -> None:
        """Wait for both loops to leave, until ``deadline`` (monotonic; None: no limit).

        Called on the dispatch loop itself (stop() inside ``dispatch``) it returns at once:
        the failure loop waits for the dispatch loop, so waiting for it would never end.
        """
        if threading.current_thread() is self.dispatch_thread:
            return
        for thread in (self.dispatch_thread, self.failure_thread):
            if thread is None or thread is threading.current_thread():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def finished(self) -> bool:
        """Whether everything accepted was dispatched or reported and both loops have left."""
        with self.mutex:
            loops_done = not self.started or (self.dispatch_done and self.failures_done)
            return loops_done and not self.buffer and not self.in_flight and not self.failures

    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        sent_before = self.sent
        self.begin_stop(deadline, start_if_idle=False)
        self.join(deadline)
        with self.mutex:
            lost = len(self.buffer) + self.in_flight + len(self.failures)
        return self.sent - sent_before, lost

    def _reset_after_fork(self) -> None:
        # The parent's buffered messages are the parent's to deliver; the child starts empty.
        was_running = self.started and not self.closing
        # Counters from zero, as on every face: the parent's messages and outcomes are the parent's.
        self.unbuffered = self.sent = self.failed = self.retried = self.rejected = 0
        self.handler_errors = self.failure_stalls = self.failed_at_stop = 0
        self._init_runtime()
        self.started = False
        self.restart_on_put = was_running
        self._update_put_open()
        self.spool = None  # the parent's file: the child neither writes nor closes it

    # -- the dispatch loop ---------------------------------------------------------------------

    def run_dispatch(self) -> None:
        """Take messages one at a time and hand each to the dispatcher, until stopped and drained."""
        delivered = 0  # direct sends that succeeded, counted at the next lock
        # No timeout and no metrics: a plain dispatch runs right here.
        inline = self.caller.timeout is None and self.recorder is None
        # What this loop is handling, for _abandon: one message, or a hand-off's chunk (a fault
        # inside a hand-off may report some of it failed that were handed over: better than losing them).
        holding: tuple[_Entry[T], int] | None = None
        chunk: list[_Entry[T]] = []
        spooled = self.spool is not None
        acks: list[_Entry[T]] = []  # dispatched, not acknowledged in the spool yet (one commit per group)
        try:
            while True:
                if len(acks) >= _ACK_GROUP:
                    self.spool_settle(acks, None)
                    acks = []
                if delivered:  # sent already: the lost log may end its episode (nothing held)
                    self.lost_log.delivered()
                with self.mutex:
                    if delivered:
                        self.in_flight -= delivered
                        self.sent += delivered
                        delivered = 0
                    job = self._next_job(bool(acks))
                    if self.hand_off is not None and job is not None and job is not _FLUSH and job is not _ACK:
                        chunk = self._take_more(job)
                if job is None:
                    return
                if job is _ACK:
                    self.spool_settle(acks, None)
                    acks = []
                    continue
                if job is _FLUSH:
                    self._flush()
                    continue
                if chunk:
                    self._hand(chunk)
                    chunk = []
                    continue
                holding = job
                entry, attempts = job
                if self.submit is not None:
                    self._submit(entry, attempts + 1)
                else:
                    message, delay, context = entry
                    if delay is None and context is None and inline:  # the common case, inline
                        try:
                            result = self.dispatcher.dispatch(message, self.target)
                            if result is not None and type(result) is not str:
                                # an awaitable (an async dispatch) is awaited here, named after dispatch
                                resolve(self.dispatcher.dispatch, result)
                        except BaseException as error:  # noqa: BLE001 - user code: this message failed
                            self._settle(entry, attempts + 1, error)
                        else:
                            delivered += 1
                            if spooled:
                                acks.append(entry)
                        holding = None
                        continue
                    outcome = self._dispatch(message, delay, context)
                    if outcome.error is None:
                        delivered += 1
                        if spooled:
                            acks.append(entry)
                    else:  # user code failed this message (an error, a timeout); the loop lives
                        self._settle(entry, attempts + 1, outcome.error)
                holding = None
        except BaseException as error:
            # Only a fault of this loop's own code gets here: user code's errors fail their message.
            _log.critical("%s: the dispatch loop died; reporting what it held as failed", self.describe())
            self._abandon(error, self._with_attempts(chunk) if holding is None else [holding], delivered)
            raise
        finally:
            if acks:  # before stop() (which joins this loop) closes the spool
                self.spool_settle(acks, None)
            with self.mutex:
                self.dispatch_done = True
                self.failure_ready.notify_all()
            self.caller.close(0)  # no dispatch or submit follows; stop() joins its runners
            close_thread_loop()

    def _next_job(self, acks: bool = False) -> tuple[_Entry[T], int] | Any | None:
        """Wait for the next message (or flush) to send; None once stopped and drained. Holds mutex.

        With ``acks`` (dispatched messages wait to be acknowledged in the spool) it returns
        _ACK instead of waiting longer than _ACK_DELAY for a message, or of stalling.
        """
        ack_by = None  # when to return _ACK rather than wait on
        while True:
            now = time.monotonic()
            retries = self.retries
            retrying = self.retrying
            assert self.failure_capacity is not None  # set by setup(), before any loop starts
            if len(self.failures) >= self.failure_capacity and (retrying or self.buffer):
                if acks:
                    return _ACK  # before a wait that may be long
                # The handler fell behind: hold everything back (stop() included) until it catches up.
                self.failure_stalls += 1
                self._wait_for_work(None)
                continue
            due = retries.pop_next(math.inf if self.closing else now) if retrying else None
            if due is not None:
                self.retrying -= 1
                entry, attempts = due.item
                if self.submit is not None:
                    self.submitted += 1
                return entry, attempts
            if self.buffer and self.in_flight < self.max_in_flight:
                entry = self.buffer.popleft()
                self.unbuffered += 1
                self.in_flight += 1
                if self.submit is not None:
                    self.submitted += 1
                if self.put_waiters:
                    self.not_full.notify()
                return entry, 0
            if self.closing:
                if not self.buffer and not retrying and not self.in_flight:
                    return None
                if self.flush is not None and self.submitted != self.flushed_at:
                    # Everything handed over so far must go now, not when a window closes.
                    self.flushed_at = self.submitted
                    return _FLUSH
            until = retries.timeout(now) if retrying else None
            if acks:
                if ack_by is None:
                    ack_by = now + _ACK_DELAY
                elif now >= ack_by:
                    return _ACK
                until = ack_by - now if until is None else min(until, ack_by - now)
            self._wait_for_work(None if until is None else min(until, _MAX_WAIT))

    def _take_more(self, job: tuple[_Entry[T], int]) -> list[_Entry[T]]:
        """``job``'s entry and up to ``hand_chunk - 1`` more buffered ones, in order, for the hand-off. Holds mutex.

        Takes only what ``_next_job`` would take next: not while the failure backlog is full
        nor past ``max_in_flight``; a retry due now is taken by the next ``_next_job``. The
        entries are the hand-off's tokens; a retried one's attempts wait in ``handed_attempts``.
        """
        entry, attempts = job
        if attempts:
            self.handed_attempts[id(entry)] = attempts
        taken = [entry]
        buffer = self.buffer
        assert self.failure_capacity is not None
        if not buffer or len(self.failures) >= self.failure_capacity:
            return taken
        count = min(len(buffer), self.hand_chunk - 1, self.max_in_flight - self.in_flight)
        if count <= 0:
            return taken
        if count == len(buffer):  # all of it, the usual case once the loop keeps up: no frame per message
            taken += buffer
            buffer.clear()
        else:  # the first count of it, popped in a C loop (no frame per message)
            taken += starmap(buffer.popleft, repeat((), count))
        self.in_flight += count
        self.submitted += count
        self.unbuffered += count
        if self.put_waiters:
            self.not_full.notify(count)
        return taken

    def _dispatch(self, message: T, delay: int | None, context: contextvars.Context | None) -> Outcome:
        """Call ``dispatch`` with the delay, in the producer's context when it was captured. Nothing held."""
        dispatch: Callable[..., Any] = self.dispatcher.dispatch
        if delay is not None:
            dispatch = functools.partial(dispatch, delay_seconds=delay)
        recorder = self.recorder
        if recorder is None:
            return self._run(context, dispatch, message, self.target)
        started = time.perf_counter()
        outcome = self._run(context, dispatch, message, self.target)
        recorder.send(1, started, outcome.error)
        return outcome

    def _run(self, context: contextvars.Context | None, fn: Callable[..., Any], *args: Any) -> Outcome:
        """``fn(*args)`` through the caller (the timeout), in ``context`` when one was captured; never raises.

        Without a timeout it runs in ``context`` itself (what it sets in a ContextVar stays
        there); with one, in a copy on the caller's runner (an abandoned call may still be in it).
        """
        if context is None:
            return self.call(fn, *args)
        if self.caller.timeout is None:
            return context.run(call, fn, *args)
        return self.caller.call(in_context, context.copy(), fn, *args)

    def _wake_loop(self) -> None:
        """Wake the waiting dispatch loop, once: it re-checks everything when it runs. Holds mutex.

        Clearing ``loop_waiting`` here spares every later producer (and settle) its own
        notify until the loop has run and waits again: one Condition.notify per wake-up,
        not one per message put while the woken loop waits for the GIL.
        """
        self.loop_waiting = False
        self.work_ready.notify()

    def _wait_for_work(self, timeout: float | None) -> None:
        """Wait until notified (a message, a settled send, a reported failure, stop) or ``timeout``; holds mutex."""
        self.loop_waiting = True
        try:
            self.work_ready.wait(timeout)
        finally:
            self.loop_waiting = False

    def _flush(self) -> None:
        assert self.flush is not None
        deadline = self.stop_deadline
        # A failing flush (even sys.exit) must not stop the drain: call() contains it.
        outcome = call(self.flush, None if deadline is None else max(0.0, deadline - time.monotonic()))
        if outcome.error is not None:
            _log.error("%s: flush() of the dispatcher raised", self.describe(), exc_info=outcome.error)

    def _submit(self, entry: _Entry[T], attempt: int) -> None:
        assert self.submit is not None
        message, delay, context = entry
        submit: Callable[..., Any] = self.submit
        if delay is not None:
            submit = functools.partial(submit, delay_seconds=delay)
        # In the producer's context: a BatchedDispatcher captures it from here for its envelope.
        outcome = self._run(context, submit, message, self.target)
        future = outcome.value
        if outcome.error is not None:  # user code: this message failed, the loop lives
            self._settle(entry, attempt, outcome.error)
        elif not isinstance(future, Future):
            error = TypeError(f"submit() of {show(self.dispatcher)} returned {show(future)}, not a Future")
            self._settle(entry, attempt, error)
        else:
            future.add_done_callback(functools.partial(self._on_done, entry, attempt))

    def _hand(self, taken: list[_Entry[T]]) -> None:
        """Hand ``taken`` to the BatchedDispatcher in one call, without Futures; :meth:`_on_handed` settles them.

        Each entry is its own token: the hand-off gives it back.
        """
        assert self.hand_off is not None
        refused = self.hand_off(taken, self.target, self.on_handed)
        if refused:  # refused (closed, a bad delay): these messages failed
            entries = self._with_attempts([entry for entry, _ in refused])
            for (entry, attempts), (_, error) in zip(entries, refused, strict=True):
                self._settle(entry, attempts + 1, error)

    def _with_attempts(self, entries: list[_Entry[T]]) -> list[tuple[_Entry[T], int]]:
        """Handed ``entries`` settled now, each with the attempts made before this one (0 unless a retry).

        Their ``handed_attempts`` go (under mutex): an entry's id names it only while it is in flight.
        """
        retried = self.handed_attempts
        if not retried:  # no retry in flight: read without the lock (only the dispatch loop adds, before handing)
            return list(zip(entries, repeat(0)))
        with self.mutex:
            return [(entry, retried.pop(id(entry), 0)) for entry in entries]

    def _on_handed(self, tokens: list[_Entry[T]], errors: list[BaseException | None] | None) -> None:
        """A batch of handed messages was sent or failed (a send thread, nothing held): one lock for its successes."""
        sent = len(tokens)
        if self.spool is not None:
            outcomes = errors or [None] * sent
            self.spool_settle([entry for entry, error in zip(tokens, outcomes, strict=True) if error is None])
        if errors is not None:  # some failed (errors None: all were sent)
            for (entry, attempts), error in zip(self._with_attempts(tokens), errors, strict=True):
                if error is not None:
                    sent -= 1
                    self._settle(entry, attempts + 1, error)
        elif self.handed_attempts:  # all sent: a retried one's attempts go with it
            self._with_attempts(tokens)
        if sent:
            with self.mutex:
                self.in_flight -= sent
                self.sent += sent
                self._notify_settled()
            self.lost_log.delivered()

    def _on_done(self, entry: _Entry[T], attempt: int, future: Future[Any]) -> None:
        """Done-callback of a submitted message's Future (any thread, nothing held)."""
        error: BaseException | None
        if future.cancelled():
            error = CancelledError(f"the Future of {show(entry[0])} was cancelled before it was sent")
            if self.spool is not None:
                self.spool_settle((entry,), None)  # given up by the user: it leaves the spool
        else:
            error = future.exception()
        if error is None:
            if self.spool is not None:
                self.spool_settle((entry,), None)
            with self.mutex:
                self.in_flight -= 1
                self.sent += 1
                self._notify_settled()
            self.lost_log.delivered()
        else:
            self._settle(entry, attempt, error)

    def _notify_settled(self) -> None:
        """Messages settled as sent (in_flight fell): wake whoever that can unblock. Holds mutex.

        The dispatch loop only if it can act on it: messages wait that ``max_in_flight``
        held back, or a stop drains (it finishes once nothing is in flight). Waking an
        idle loop for every settled batch would cost a thread switch each and change nothing.
        """
        if self.loop_waiting and (self.buffer or self.closing):
            self._wake_loop()
        if self.dispatch_done:
            self.failure_ready.notify()

    def _settle(self, entry: _Entry[T], attempt: int, error: BaseException) -> None:
        """A send of ``message`` failed: schedule a retry or queue it for the failure loop. Nothing held."""
        retry = self.retry
        delay = None if retry is None else self._next_delay(retry, attempt, error)
        if delay is not None:
            with self.mutex:
                self.retried += 1
                self.retries.push((entry, attempt), delay)  # notifies work_ready when it is the earliest
                self.retrying += 1
            return
        if self.spool is not None:
            self.spool_settle((entry,), error)
        failed = _failed(entry, error, self.target, attempt)
        with self.mutex:
            self.in_flight -= 1
            self.failed += 1
            self.failures.append(failed)
            self.failure_ready.notify()
            if self.loop_waiting:
                self._wake_loop()

    def _next_delay(self, retry: RetryPolicy, attempt: int, error: BaseException) -> float | None:
        """The policy's one decision (Cancel final, Retry(delay) honoured, a bad delay final); None: final."""
        # next_delay contains an Exception from retry_on or the backoff; a BaseException (sys.exit)
        # would end the calling thread (a loop, or a BatchedDispatcher's send thread): contain it too.
        try:
            return retry.next_delay(attempt, error)
        except BaseException:  # noqa: BLE001 - a broken predicate or backoff makes this failure final
            _log.exception("%s: the retry policy raised; the failure is final", self.describe())
            return None

    def _abandon(self, error: BaseException, holding: list[tuple[_Entry[T], int]], delivered: int) -> None:
        """The dispatch loop is dying: report everything it still held as failed."""
        with self.mutex:
            self.in_flight -= delivered
            self.sent += delivered
            left = self.retries.pop_all()
            self.retrying = 0
            self.in_flight -= len(left)
            left += [(entry, 0) for entry in self.buffer]
            left[:0] = holding
            self.in_flight -= len(holding)
            self.unbuffered += len(self.buffer)
            self.buffer.clear()
            self.failed += len(left)
            self.failures.extend(_failed(entry, error, self.target, attempts) for entry, attempts in left)
            self.failure_ready.notify_all()
        if self.spool is not None:
            self.spool_settle([entry for entry, _ in left], error)

    def spool_settle(self, entries: Iterable[_Entry[T]], error: BaseException | None = None) -> None:
        """Acknowledge delivered spooled entries (error None) or dead-letter failed ones. Nothing held; never raises.

        A spool failure (closed by a stop past its timeout, a disk error) is logged: the
        entries then stay pending in the file and are replayed by its next owner.
        """
        spool = self.spool
        if spool is not None:
            spool.settle([entry.seq for entry in entries if type(entry) is _SpooledEntry], error, self.describe())

    # -- immediate mode (testing.immediate()) -------------------------------------------------

    def _set_immediate(self, on: bool) -> None:
        """Swap ``put``/``try_put`` for the immediate ones (on) or back; idempotent, never blocks.

        Called by the immediate switch on any thread, and by the AsyncDispatcher's
        constructor inside a block. The normal path pays nothing: only instance attributes change.
        """
        if on:
            self.put = self._put_now  # type: ignore[method-assign]
            self.try_put = self._try_put_now  # type: ignore[method-assign]
        else:
            self.__dict__.pop("put", None)
            self.__dict__.pop("try_put", None)
        self.immediate = on
        self._update_put_open()

    def _put_now(self, entry: _Entry[T], timeout: float | None) -> None:
        """Immediate ``put``: never waits for room (nothing stays buffered), so ``timeout`` is not used."""
        del timeout
        self._run_now(entry)

    def _try_put_now(self, entry: _Entry[T]) -> bool:
        self._run_now(entry)
        return True

    def _run_now(self, entry: _Entry[T]) -> None:
        """Immediate put: what is buffered goes first, in order, then ``entry``; all on this thread."""
        with self.mutex:
            if self.closing:
                raise DispatcherClosedError(f"{self.describe()} is stopped; {show(entry[0])} was not accepted")
            entries = [*self.buffer, entry]
            self.buffer.clear()
            self.unbuffered += len(entries)  # this one too: accepted, never in the buffer
            self.in_flight += len(entries)
            if self.put_waiters:
                self.not_full.notify_all()
        with self.immediate_lock:
            for each in entries:
                self._dispatch_now(each)

    def _dispatch_now(self, entry: _Entry[T]) -> None:
        """Dispatch ``entry`` with its retries at once (their delay skipped), then report a final failure here."""
        attempt = 0
        while True:
            attempt += 1
            error = self._call_now(entry).error
            if error is None:
                if self.spool is not None:
                    self.spool_settle((entry,), None)
                with self.mutex:
                    self.in_flight -= 1
                    self.sent += 1
                self.lost_log.delivered()
                return
            delay = None if self.retry is None else self._next_delay(self.retry, attempt, error)
            if delay is None:
                break
            with self.mutex:
                self.retried += 1
        if self.spool is not None:
            self.spool_settle((entry,), error)
        with self.mutex:
            self.in_flight -= 1
            self.failed += 1
        self._report(_failed(entry, error, self.target, attempt))

    def _call_now(self, entry: _Entry[T]) -> Outcome:
        """``dispatch`` on this thread, with the delay, in the producer's context when captured; never raises."""
        message, delay, context = entry
        dispatch: Callable[..., Any] = self.dispatcher.dispatch
        if delay is not None:
            dispatch = functools.partial(dispatch, delay_seconds=delay)
        args = (self.caller.timeout, f"{self.describe()}: dispatch", dispatch, message, self.target)
        return call_here(*args) if context is None else context.run(call_here, *args)

    # -- the failure loop ----------------------------------------------------------------------

    def run_failures(self) -> None:
        """Report every failed message to the error handler, until the dispatch loop left and all settled."""
        try:
            while True:
                with self.mutex:
                    while not self.failures:
                        if self.dispatch_done and not self.in_flight:
                            return
                        self.failure_ready.wait()
                    failed = self.failures.popleft()
                    if self.loop_waiting:
                        self._wake_loop()  # it may be held back by a full backlog
                self._report(failed)
        finally:
            with self.mutex:
                self.failures_done = True
            close_thread_loop()

    def _report(self, failed: FailedMessage[T]) -> None:
        handler = self.error_handler
        if handler is None:  # counted in stats() already (failed); the log says so without a line per message
            detail = f"{show(failed.message)} failed after {failed.attempts} attempt(s); it is lost"
            self.lost_log.dropped(1, detail=detail, exc_info=failed.error)
            return
        # In a copy of the producer's context (its log lines keep the trace id). A copy: the
        # dispatch loop may still be inside that context (a submit that failed synchronously).
        # call() contains a BaseException too: sys.exit() here would end this thread silently
        # (threading swallows SystemExit) and every later failure would go unreported.
        context = failed.context
        outcome = call(handler, failed) if context is None else context.copy().run(call, handler, failed)
        if outcome.error is not None:
            with self.mutex:
                self.handler_errors += 1
            _log.error(
                "%s: error_handler raised while reporting %s",
                self.describe(),
                show(failed.message),
                exc_info=outcome.error,
            )
