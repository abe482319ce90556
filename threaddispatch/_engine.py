"""The batching engine: per-key lanes, a time window, a size trigger, one worker thread.

Every batching face is a thin layer over :class:`BatchEngine`. The engine owns the
buffers (lanes), decides when a batch is due, takes it, and hands it to the face's
``deliver(key, items)`` on its one daemon worker thread. Nothing else in the library
runs a batching loop.

Locking: ``_lock`` guards every field of the engine and of its lanes, with three
exceptions: producers on the lock-free path (a face's enqueue, and :meth:`BatchEngine.put`
on FIFO lanes) look the lane up in its shard of ``_lanes`` and call ``lane.append`` and
``len(lane)`` without it (single C calls, atomic under the GIL), and then call :meth:`kick`
when the length reaches ``lane.trigger``. The worker re-arms ``trigger`` *before* it looks
at a lane's length, so an append is either seen by the worker or followed by a kick. A
keyed lane the worker found empty is deleted with its trigger at INACTIVE: an append that
looked it up before lands there and kicks, and :meth:`kick` moves it to the key's live lane.
``deliver``, ``on_drop``, ``on_skip`` and ``on_abandon`` are face (and so user) code:
they are always called with ``_lock`` released. ``gate`` is the exception: it runs with
``_lock`` held, so it must be cheap, run no user code, and read engine state only through
:attr:`BatchEngine.unsettled`.

The gate is one capacity for all lanes: once it refuses a lane, the worker stops taking
(the other due lanes, and those that become due meanwhile, wait in order, untried, with no
``on_skip``) until a batch settles. The lane it refused is held: retried when a batch
settles (one held lane per settled batch, oldest first, ahead of the lanes waiting) or when
its next window closes (the gate may open without a settle), whichever comes first;
reaching ``max_batch_size`` meanwhile does not retry it again. So a shut gate costs one
refusal per settle or held window, not one per due lane. While it is shut the worker closes
only the held lanes' windows: the others stay open until the gate opens, as lanes that could
not go anyway (a turn's worth of them closes with each held lane's window, which keeps
``_open`` bounded). A self-settling face's sending thread settles with :meth:`BatchEngine.settle_and_take`,
which gives the freed capacity to the next due batch (the held lane first, then the due lanes in
order, then the windows the shut gate left open) on that thread: while sends keep every slot
taken, a batch costs no wake-up of the worker, no refusal and no hand-off. Such a loop lets a
producer waiting for ``_lock`` in (it yields the GIL: see ``_producers_waiting``), so it does not
keep add-style callers out for a switch interval per looping thread.

Cost does not grow with the number of lanes: the open windows and the due lanes are
deques with lazy removal (O(1) at both ends, where a plain dict used as a FIFO rescans
the dead slots its pops leave; and a deque grows block by block, where a dict or an
OrderedDict of 100k lanes stops for an O(n) resize, ~7 ms, under the lock), and a shut
gate stops the take loop. An entry of ``_open`` is a lane and, at the same place in
``_open_at``, its deadline (two deques, not one of tuples: a tuple holding a lane is one
more object per lane for the collector to visit); it is live while ``lane.deadline is
deadline`` and the lane is not due. One of ``_due`` is a lane, live while ``lane.due``.
A stale entry is skipped when it reaches the head.

A bounded lossless engine (``max_queue_size`` with ``overflow="block"`` or ``"raise"``)
takes the lock only near the bound: see :meth:`BatchEngine.lossless_enqueue` for the bound it keeps.

Why one module of ~1,000 lines: it is one object whose every method reads or writes state
under the one ``_lock``, with invariants (the flush quotas, the trigger/length order, the
gate) that span producers, the worker, flush and close; split across modules, each part
would have to restate them.

Time: every wait is computed from one deadline on ``time.monotonic()``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, Generic, Literal, TypeVar, cast

from threaddispatch import _drop_log, _lifecycle
from threaddispatch._drop_log import DropLog
from threaddispatch._invoke import close_thread_loop
from threaddispatch._lanes import INACTIVE, SHARD_MASK, SPLIT_AT, FifoLane, Lane, LaneTable
from threaddispatch._timers import DelayQueue
from threaddispatch._validate import check_wait
from threaddispatch.errors import ConfigurationError, DispatcherClosedError, QueueFullError

__all__ = ["OVERFLOW_POLICIES", "BatchEngine", "Overflow"]

T = TypeVar("T")

Overflow = Literal["drop_newest", "drop_oldest", "block", "raise"]
OVERFLOW_POLICIES: tuple[str, ...] = ("drop_newest", "drop_oldest", "block", "raise")

_UNBOUNDED = 1 << 62
# The most windows one turn of the worker closes while it holds the lock: many lanes whose
# windows close together (a keyed face with 100k keys) would otherwise keep producers out.
_WINDOWS_PER_TURN = 256
_MAX_SLACK = 0.001  # seconds: the most a window closes late (see BatchEngine._slack)
_MAX_WAIT = 3600.0  # the longest single wait of the worker (seconds); a later due time is waited for in turns

_log = logging.getLogger("threaddispatch")
_yield_gil = time.sleep  # called with 0: lets the threads waiting for the GIL have it (a name tests can replace)


Deliver = Callable[[Hashable, list[Any]], "Future[Any] | None"]
# deliver(key, items, seq) of a self-settling engine: the face settles the batch itself (settle).
SettlingDeliver = Callable[[Hashable, list[Any], int], None]

_ENQUEUE_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("entry", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=None),
    ],
    return_annotation=None,
)


def lossless_margin(max_queue_size: int) -> int:
    """How far below ``max_queue_size`` a lossless enqueue leaves the lock-free path.

    An eighth of the buffer, at most 1024; a buffer under 128 entries has no lock-free
    path at all (its margin is the whole buffer), so its bound is exact.
    """
    if max_queue_size < 128:
        return max_queue_size
    return min(1024, max_queue_size // 8)


class BatchEngine(Generic[T]):
    """Buffers entries per key and delivers them in batches on one daemon thread.

    A lane's window opens when an entry arrives in it while it is empty and closes
    ``window`` seconds later; the lane's entries then go in batches of at most
    ``max_batch_size``. A lane holding ``max_batch_size`` entries goes at once. A
    ``max_queue_size`` below ``max_batch_size`` is the batch size in effect (a lane never
    holds more), and :attr:`max_batch_size` says so.
    ``deliver(key, items)`` returns None once the batch is settled, or a Future that
    settles it when done (faces that run sends on a pool). With ``self_settling=True``
    it is ``deliver(key, items, seq)`` instead, and the face settles the batch itself by
    :meth:`settle` (no Future per batch); if ``deliver`` raises, the engine settles.
    ``max_unsettled`` is the commonest gate, checked inline (no call per lane): it refuses
    while that many batches are unsettled; with ``gate`` too, both must let a lane go.
    Thread-safe.
    """

    def __init__(
        self,
        deliver: Deliver | SettlingDeliver,
        *,
        name: str,
        window: float,
        max_batch_size: int,
        max_queue_size: int | None = None,
        overflow: Overflow = "drop_newest",
        on_drop: Callable[[list[T]], None] | None = None,
        gate: Callable[[Hashable], bool] | None = None,
        max_unsettled: int | None = None,
        on_skip: Callable[[Hashable, int], None] | None = None,
        on_abandon: Callable[[Hashable, list[T]], None] | None = None,
        lane_factory: Callable[[Hashable], Lane[T]] = FifoLane,
        drop_log: DropLog | None = None,
        self_settling: bool = False,
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigurationError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}")
        self.name = name
        self.window = window
        # A lane never holds more than max_queue_size, so no batch can be larger: the size
        # trigger must fire there, or the lock-free path would overshoot the limit by a batch.
        self.max_batch_size = max_batch_size if max_queue_size is None else min(max_batch_size, max_queue_size)
        self.max_queue_size = max_queue_size
        self.overflow = overflow
        # The one of the two shapes of deliver this engine calls; the other is None.
        self._settling_deliver: SettlingDeliver | None = cast("SettlingDeliver", deliver) if self_settling else None
        self._plain_deliver: Deliver | None = None if self_settling else cast("Deliver", deliver)
        # A window closes up to this late, so that one wake-up of the worker closes every window
        # due within it: with many keys whose windows close microseconds apart, one wake-up per
        # window would cost a thread switch per key.
        self._slack = min(window / 20, _MAX_SLACK)
        self._on_drop = on_drop
        self._gate = gate
        # A gate checked inline: refuses while this many batches are unsettled (None: no such limit).
        self._max_unsettled = max_unsettled
        self._on_skip = on_skip
        self._on_abandon = on_abandon
        self._lane_factory = lane_factory
        # Says in the log that entries are dropped (and when that stops). None until the first
        # drop, unless the face brings its own (one that also counts its own drops).
        self._drop_log = drop_log
        self._own_drop_log = drop_log is None  # made here, so renewed here after fork
        # Above this length a producer on the lock-free path must kick: the overflow check.
        self._cap_trigger = _UNBOUNDED if max_queue_size is None else max_queue_size + 1
        # A bounded lossless engine refuses or waits at the bound instead of dropping.
        self._lossless = max_queue_size is not None and overflow in ("block", "raise")
        # put appends without the lock to a FIFO lane that exists and holds fewer than this (see put).
        self._free_below = _UNBOUNDED if max_queue_size is None else max_queue_size - lossless_margin(max_queue_size)
        self._fifo = lane_factory is FifoLane
        self._init_state()
        _lifecycle.register(self)

    def _init_state(self, default_lane: Lane[T] | None = None) -> None:
        # _lock guards all state below (see the module docstring for the lock-free exception).
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)  # the worker waits here
        self._space = threading.Condition(self._lock)  # producers blocked by overflow="block"
        self._settled = threading.Condition(self._lock)  # flush() and close() wait here
        self._lanes: LaneTable[Lane[T]] = LaneTable()
        # The same table, for put's lock-free path, when every lane is a FifoLane (else None).
        self._fifo_lanes: LaneTable[FifoLane] | None = cast("LaneTable[FifoLane]", self._lanes) if self._fifo else None
        if default_lane is None:
            self.default_lane: Lane[T] = self._new_lane(None)
        else:
            # After fork: the same object (faces cache it), emptied and re-armed.
            self.default_lane = default_lane
            while len(default_lane):
                default_lane.take(len(default_lane))
            default_lane.trigger = INACTIVE
            default_lane.deadline = None
            default_lane.due = False
            self._lanes[None] = default_lane
        # Lanes with an open window, in the order their windows close (all are equally long; see the module docstring).
        self._open: deque[Lane[T]] = deque()
        self._open_at: deque[float] = deque()  # the deadline of each entry of _open
        self._due: deque[Lane[T]] = deque()  # lanes to send now, in the order they became due
        self._held: OrderedDict[Lane[T], None] = OrderedDict()  # lanes the gate held back, oldest first
        # The gate refused and nothing that could change its answer happened since: take nothing.
        self._gate_shut = False
        # put_later entries as (key, item), on the shared delay queue under _lock (its pushes wake the worker).
        self._scheduled: DelayQueue[tuple[Hashable, T]] = DelayQueue(self._wakeup)
        self._batch_seq = 0
        self._unsettled: dict[int, int] = {}  # seq -> entries, of every batch taken and not yet settled
        self.settled_entries = 0  # entries of the batches settled (their deliver done), since start
        self._flush_requested = 0
        self._flush_taken = 0
        self._flush_target_seq = 0
        # Entries a flush still has to take from each lane. Invariant: 0 < quota <= len(lane)
        # for every lane here. Entries leave a lane only under _lock, by a take (which lowers
        # the quota by what it took: _start_batch) or a drop (which lowers it to what is left:
        # _drop); lock-free appends only lengthen a lane. So a lane that empties (and may then
        # be deleted) has no quota, and a flush never waits for entries that are gone.
        self._flush_quota: dict[Lane[T], int] = {}
        # One None per producer waiting for _lock on put's locked path (appended and popped without
        # the lock: atomic list operations), read by settle_and_take's loop to let them in.
        self._producers_waiting: list[None] = []
        self._space_waiters = 0
        self._settle_waiters = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        self._worker_waiting = False
        self.batches = 0
        self.taken = 0
        self.dropped = 0
        self.skipped = 0

    # -- producers ---------------------------------------------------------------------------

    def _new_lane(self, key: Hashable) -> Lane[T]:
        lane = self._lane_factory(key)
        lanes = self._lanes
        one = lanes.one
        # LaneTable.__setitem__ inline while it needs no split: once per new key.
        if one is None:
            lanes.shards[hash(key) & SHARD_MASK][key] = lane
        elif len(one) < SPLIT_AT - 1:
            one[key] = lane
        else:
            lanes[key] = lane
        return lane

    def kick(self, lane: Lane[T]) -> None:
        """Called by a lock-free producer whose append took ``lane`` to its trigger.

        The lane may be gone: the worker deletes a keyed lane it empties, and an append
        that found it just before lands in the lane after it was emptied (its trigger is
        then INACTIVE, so that append always kicks). Its entries move to the key's live lane.
        """
        dropped: list[T] | None = None
        with self._lock:
            if lane is not self.default_lane and self._lanes.get(lane.key) is not lane:
                if not len(lane):
                    return  # another producer's kick moved them already
                lane = self._adopt(lane)
            # A lossless lane is never trimmed (see lossless_enqueue for how far past its bound it may go).
            if self.max_queue_size is not None and len(lane) > self.max_queue_size and not self._lossless:
                dropped = self._trim(lane)
            self._arm(lane)
        if dropped:
            self._report_dropped(dropped)

    def lossless_enqueue(self, lane: FifoLane, misuse: Callable[[], Exception]) -> Callable[..., None]:
        """The hot path of ``enqueue(entry, *, timeout=None)`` into ``lane`` under ``"block"``/``"raise"``.

        Lock-free while the lane is below ``max_queue_size - margin`` (see :func:`lossless_margin`):
        a length check, the append, the trigger check, as the drop policies' path does.
        From there up the locked :meth:`put` decides, and waits (``"block"``, up to
        ``timeout``) or raises QueueFullError at the bound. A buffer too small for a
        margin is always on the locked path.

        The bound: every append follows a check that saw the lane below ``max_queue_size``,
        and each producer thread has at most one append pending, so the lane holds at most
        ``max_queue_size + producers - 1`` entries (producers: threads enqueueing at the
        same time). It is exact with one producer, and on a buffer too small for a margin;
        with several producers it is passed only when one of them is paused (by the GIL)
        between its check and its append while the others fill the whole margin.

        A second positional argument lands in ``_lane``, which has no ``lock_free_append``:
        that AttributeError becomes ``misuse()``. A closed lane (``ClosedFifoLane``) raises
        DispatcherClosedError.
        """
        limit = self.max_queue_size
        if not self._lossless or limit is None:
            raise ConfigurationError(f"{self.name}: lossless_enqueue needs a bounded block/raise engine")
        key, put = lane.key, self.put

        def near_the_bound(entry: object, given: object, timeout: float | None) -> None:
            if given is not lane:
                raise misuse() from None
            put(entry, key, timeout=timeout)  # type: ignore[arg-type]

        # Everything comes in as a positional default, none as a closure cell (a frame copies
        # its cells on every call): see _background_enqueue._lock_free_enqueue. A stray positional
        # argument lands in ``_lane`` (more than one also in ``_len``...): misuse().
        def enqueue(
            entry: object,
            _lane: FifoLane = lane,
            _len: Callable[[FifoLane], int] = len,
            _kick: Callable[[FifoLane], None] = self.kick,
            _below: int = limit - lossless_margin(limit),  # lock-free while len(lane) < _below
            _locked: Callable[[object, object, float | None], None] = near_the_bound,
            timeout: float | None = None,
        ) -> None:
            if timeout is not None:
                timeout = check_wait("timeout", timeout)  # at most MAX_WAIT: it may be waited for, at the bound
            try:
                if _len(_lane) < _below:
                    _lane.lock_free_append(entry)
                    if _len(_lane) >= _lane.trigger:
                        _kick(_lane)
                    return
            except (AttributeError, TypeError):
                if isinstance(_lane, FifoLane):
                    raise
            _locked(entry, _lane, timeout)  # near the bound, or misuse() when _lane is not the lane

        enqueue.__signature__ = _ENQUEUE_SIGNATURE  # type: ignore[attr-defined]
        return enqueue

    def _adopt(self, orphan: Lane[T]) -> Lane[T]:
        """Move the entries of a deleted lane into its key's live lane (made if none); holds _lock."""
        lane = self._lane_of(orphan.key)
        for item in orphan.take(len(orphan)):
            lane.requeue(item)
        return lane

    def put(self, item: T, key: Hashable = None, *, timeout: float | None = None) -> bool:
        """Add ``item`` to the lane of ``key``; returns False if it was dropped.

        Without the lock when the lanes are FIFO lanes, the lane of ``key`` exists and it
        is below the bound's margin (always, unbounded; see :func:`lossless_margin`): the
        append, then :meth:`kick` at the lane's trigger, as BackgroundDispatcher's enqueue
        does. Otherwise under the lock, where a full lane drops, waits or raises by
        ``overflow``. So a bounded lane holds at most ``max_queue_size + producers - 1``
        entries, as :meth:`lossless_enqueue` says, and a drop policy trims it back at the
        kick. Blocks only with ``overflow="block"`` while the lane is full, up to
        ``timeout`` seconds (None: until there is room), then raises QueueFullError.
        Raises DispatcherClosedError once the engine is closing (a put that races the
        close may still be accepted: its entry is delivered by the drain).
        """
        table = self._fifo_lanes
        if table is not None and not self._closing:
            one = table.one  # LaneTable.get inline (see it for the lock-free read)
            free = (one if one is not None else table.shards[hash(key) & SHARD_MASK]).get(key)
            if free is not None and len(free) < self._free_below:
                free.lock_free_append(item)
                if len(free) >= free.trigger:
                    self.kick(free)
                return True
        # The locked path, in this frame (a PriorityLane's every put comes here).
        dropped: list[T] | None = None
        accepted = True
        lock = self._lock
        if not lock.acquire(False):
            # Counted while it waits, so a sending thread that takes batch after batch lets it in
            # (settle_and_take); a list's append and pop are atomic without the lock.
            waiting = self._producers_waiting
            waiting.append(None)
            lock.acquire()
            waiting.pop()
        try:
            if self._closing:
                raise DispatcherClosedError(f"{self.name} is closed; {item!r} was not accepted")
            lanes = self._lanes
            whole = lanes.one  # _lane_of inline: once per put
            lane = (whole if whole is not None else lanes.shards[hash(key) & SHARD_MASK]).get(key)
            if lane is None:
                lane = self._new_lane(key)
            limit = self.max_queue_size
            if limit is not None and len(lane) >= limit:
                if self.overflow == "raise":
                    raise QueueFullError(f"{self.name}: queue is full ({limit} entries); {item!r} was not accepted")
                if self.overflow == "block":
                    lane = self._wait_for_space(key, limit, timeout, item)
                elif self.overflow == "drop_oldest":
                    dropped = self._drop(lane, 1)
                else:
                    dropped = [item]
                    self.dropped += 1
                    accepted = False
            if accepted:
                lane.append(item)
                self._arm(lane)
        finally:
            lock.release()
        if dropped:
            self._report_dropped(dropped)
        return accepted

    def put_many(self, items: list[T], key: Hashable = None, *, timeout: float | None = None) -> int:
        """:meth:`put` for each of ``items`` in order, into the lane of ``key``, under one acquisition of the lock.

        The same decisions per item as :meth:`put`, with the same locking: a full lane
        drops (``drop_newest``/``drop_oldest``), waits (``block``, up to ``timeout`` for
        each item that finds it full; the lock is released meanwhile) or raises
        QueueFullError (``raise``; the items before it stay accepted). Returns how many
        were accepted. Raises DispatcherClosedError once the engine is closing (before
        taking any of them, or, under ``block``, when it closes while an item waits).
        """
        dropped: list[T] = []
        accepted = 0
        with self._lock:
            if self._closing:
                raise DispatcherClosedError(f"{self.name} is closed; {len(items)} entries were not accepted")
            lane = self._lane_of(key)
            limit = self.max_queue_size
            try:
                for item in items:
                    if limit is not None and len(lane) >= limit:
                        if self.overflow == "raise":
                            raise QueueFullError(
                                f"{self.name}: queue is full ({limit} entries); {item!r} was not accepted"
                            )
                        if self.overflow == "block":
                            self._arm(lane)  # what is in the lane goes, so room can appear
                            lane = self._wait_for_space(key, limit, timeout, item)
                        elif self.overflow == "drop_oldest":
                            dropped += self._drop(lane, 1)
                        else:
                            dropped.append(item)
                            self.dropped += 1
                            continue
                    lane.append(item)
                    accepted += 1
            finally:
                self._arm(lane)
        if dropped:
            self._report_dropped(dropped)
        return accepted

    def _lane_of(self, key: Hashable) -> Lane[T]:
        """The live lane of ``key``, made if it has none; caller holds _lock."""
        lanes = self._lanes
        one = lanes.one  # LaneTable.get inline: once per put
        lane = (one if one is not None else lanes.shards[hash(key) & SHARD_MASK]).get(key)
        return self._new_lane(key) if lane is None else lane

    def _wait_for_space(self, key: Hashable, limit: int, timeout: float | None, item: T) -> Lane[T]:
        """Wait until the lane of ``key`` has room and return it; caller holds _lock (released meanwhile).

        The lane is looked up again after every wait: the worker deletes a keyed lane it
        empties, and an entry put in a deleted lane would be counted nowhere.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._space_waiters += 1
        try:
            while True:
                if self._closing:
                    raise DispatcherClosedError(f"{self.name} closed while {item!r} waited for room")
                lane = self._lane_of(key)
                if len(lane) < limit:
                    return lane
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise QueueFullError(
                        f"{self.name}: queue stayed full ({limit} entries) for {timeout}s; {item!r} was not accepted"
                    )
                self._space.wait(remaining)
        finally:
            self._space_waiters -= 1

    def put_later(self, item: T, key: Hashable, delay: float) -> None:
        """Add ``item`` to the lane of ``key`` after ``delay`` seconds (used for retries)."""
        with self._lock:
            if self._closing:
                raise DispatcherClosedError(f"{self.name} is closed")
            # A delay <= 0 is due at once; push_at notifies the worker when this is the earliest entry.
            self._scheduled.push_at((key, item), time.monotonic() + delay)
            self._ensure_worker()

    def _trim(self, lane: Lane[T]) -> list[T]:
        """Apply a drop policy to a lane over its limit; caller holds _lock."""
        assert self.max_queue_size is not None
        dropped = self._drop(lane, len(lane) - self.max_queue_size)
        if self._space_waiters:
            self._space.notify_all()
        return dropped

    def drop_first(self, key: Hashable) -> T | None:
        """Drop the entry the lane of ``key`` would send first and return it; None if the lane is empty.

        Counted in :attr:`dropped`, whatever the overflow policy; ``on_drop`` is not called
        (the caller has the entry). Wakes a producer waiting for room.
        """
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None or not len(lane):
                return None
            dropped = self._drop(lane, 1, oldest=True)
            if self._space_waiters:
                self._space.notify_all()
        return dropped[0]

    def _drop(self, lane: Lane[T], count: int, *, oldest: bool | None = None) -> list[T]:
        """Drop ``count`` entries of ``lane``: the oldest or newest (None: by the overflow policy); holds _lock.

        Every drop goes through here. Keeps the flush-quota invariant (see ``_init_state``):
        a flush may have counted entries the lock-free path appended past the limit, which
        are dropped only now.
        """
        if oldest is None:
            oldest = self.overflow == "drop_oldest"
        drop = lane.drop_oldest if oldest else lane.drop_newest
        dropped = [drop() for _ in range(count)]
        self.dropped += count
        quota = self._flush_quota.get(lane)
        if quota is not None and quota > len(lane):
            if len(lane):
                self._flush_quota[lane] = len(lane)
            else:
                del self._flush_quota[lane]
                self._flush_progress()
                if self._settle_waiters:
                    self._settled.notify_all()  # the flush may have been waiting on this quota
        return dropped

    def _report_dropped(self, items: list[T]) -> None:
        """After a drop by the overflow policy, with _lock released: log it, then the face's ``on_drop``."""
        self.drop_log.dropped(len(items))
        if self._on_drop is not None:
            try:
                self._on_drop(items)
            except Exception:  # noqa: BLE001 - a broken drop hook must not fail the producer
                _log.exception("%s: on_drop hook raised", self.name)

    @property
    def drop_log(self) -> DropLog:
        """The log of this engine's drops: the face's own, or one made at the first drop."""
        log = self._drop_log
        if log is None:
            with self._lock:
                if self._drop_log is None:
                    self._drop_log = DropLog(_log, self._label(), self._policy(), interval=_drop_log.INTERVAL)
                log = self._drop_log
        return log

    def _label(self) -> str:
        # A face names its default lane's owner (e.g. "BackgroundDispatcher 'audit'") after construction.
        owner = getattr(self.default_lane, "owner", "dispatcher")
        return owner if owner != "dispatcher" else f"dispatcher {self.name!r}"

    def _policy(self) -> str:
        return f"overflow={self.overflow!r}, max_queue_size={self.max_queue_size}"

    def _arm(self, lane: Lane[T]) -> None:
        """Open a window for a lane that has entries, or make it due when full; caller holds _lock."""
        count = len(lane)
        if not count:
            return
        if lane.deadline is None and not lane.due:
            lane.deadline = time.monotonic() + self.window
            lane.trigger = self.max_batch_size
            # Windows are equally long: a new one closes after those already open, so only
            # the first open window changes how long the worker sleeps. Waking it for every
            # other one (each lane of a keyed face) would only contend for the lock and GIL.
            # With the gate shut the worker waits for a settle, not for windows: no wake-up either.
            wake = not self._open and not self._gate_shut
            self._open.append(lane)  # _open_window inline: once per window of every key
            self._open_at.append(lane.deadline)
            if wake or self._thread is None:
                self._notify_worker()
        if count >= self.max_batch_size and not lane.due and lane not in self._held:
            self._make_due(lane)
            if not self._gate_shut or self._thread is None:
                self._notify_worker()

    def _open_window(self, lane: Lane[T], deadline: float) -> None:
        """Queue the window of ``lane``, just set to close at ``deadline`` (``lane.deadline``); holds _lock."""
        self._open.append(lane)
        self._open_at.append(deadline)

    def _pop_window(self) -> None:
        self._open.popleft()
        self._open_at.popleft()

    def _make_due(self, lane: Lane[T], *, first: bool = False) -> None:
        """Make a lane that is not due due: last in line, or ``first``. Its ``_open`` entry goes stale."""
        lane.due = True
        lane.trigger = self._cap_trigger
        if first:
            self._due.appendleft(lane)
        else:
            self._due.append(lane)

    def _notify_worker(self) -> None:
        if self._thread is None:
            self._ensure_worker()
        elif self._worker_waiting:
            self._wakeup.notify()

    def _ensure_worker(self) -> None:
        """Start the worker if it is not running; caller holds _lock. No thread starts during exit."""
        if self._thread is not None or _lifecycle.exiting():
            return
        thread = threading.Thread(target=self._run, name=f"threaddispatch-{self.name}", daemon=True)
        self._thread = thread
        thread.start()

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        """The one batching loop: wait for a due lane, take batches, deliver them, repeat."""
        try:
            while True:
                with self._lock:
                    work = self._next_work()
                    if work is None:
                        return
                batches, skipped = work
                for key, count in skipped:
                    self._report_skipped(key, count)
                for key, seq, items in batches:
                    self._deliver_one(key, seq, items)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                self._settled.notify_all()
            close_thread_loop()  # the loop an async deliver (or send) made on this thread

    def _report_skipped(self, key: Hashable, count: int) -> None:
        if self._on_skip is not None:
            try:
                self._on_skip(key, count)
            except Exception:  # noqa: BLE001 - face hook errors are logged, the loop lives
                _log.exception("%s: on_skip hook raised", self.name)

    def _deliver_one(self, key: Hashable, seq: int, items: list[T], *, inline: bool = False) -> None:
        try:
            settling = self._settling_deliver
            if settling is not None:
                settling(key, items, seq)
                return  # the face settles it
            assert self._plain_deliver is not None
            pending = self._plain_deliver(key, items)
        except Exception:  # noqa: BLE001 - faces report their own errors; this is the last guard
            _log.exception("%s: delivering a batch of %d entries raised", self.name, len(items))
            pending = None
        except BaseException:
            # sys.exit() in a deliver: on our worker thread it would end the thread silently and
            # leave the batch unsettled forever (close/flush would never return): contain it.
            # Run inline (the exit drain, on the caller's thread) it propagates, batch settled.
            if inline:
                self._settle(seq)
                raise
            _log.exception("%s: delivering a batch of %d entries raised", self.name, len(items))
            pending = None
        if pending is None:
            self._settle(seq)
        else:
            pending.add_done_callback(functools.partial(self._settle_future, seq))

    def _settle_future(self, seq: int, _future: Future[Any]) -> None:
        self.settle(seq)

    def _refuses(self, key: Hashable) -> bool:
        """Whether the gate (``max_unsettled``, then ``gate``) holds ``key`` back now; holds _lock."""
        limit = self._max_unsettled
        if limit is not None and len(self._unsettled) >= limit:
            return True
        return self._gate is not None and not self._gate(key)

    def settle(self, seq: int) -> None:
        """Mark batch ``seq`` done (one taken by :meth:`take_now`, or a self-settling deliver's).

        Counts it settled (nothing if it was already), wakes flush/close, retries the oldest
        held lane and reopens the gate. One call per batch, written out: it runs once per batch.
        """
        # A batch was delivered: a dropping episode may end here (before the settle, so a
        # flush that sees the batch settled also sees the recovery logged).
        drop_log = self._drop_log
        if drop_log is not None:
            drop_log.delivered()
        with self._lock:
            entries = self._unsettled.pop(seq, None)
            if entries is None:
                return  # settled already
            self.settled_entries += entries
            if self._settle_waiters:
                self._settled.notify_all()
            if self._held:
                self._release_held()
            if self._gate_shut:
                self._gate_shut = False  # capacity freed: the waiting due lanes may go
                if self._due or self._open:  # windows the shut gate left unclosed may be due by now
                    self._notify_worker()

    _settle = settle

    def settle_and_take(self, seq: int) -> tuple[Hashable, int, list[T]] | None:
        """:meth:`settle` batch ``seq``, then take the next due batch for the caller to send: its ``(key, seq, items)``.

        What a self-settling face's sending thread calls when a send ends: the capacity
        the batch frees goes to the batch the worker would take next (a held lane first),
        on this thread, so while sends keep the gate full no batch costs a wake-up of the
        worker, a refusal or a hand-off. The caller must settle the batch it gets, as one
        ``deliver`` gave it. None (after the plain settle's work) when nothing is due, the
        gate refuses, the engine is closing (the worker drains) or ``seq`` was settled already.
        """
        drop_log = self._drop_log
        if drop_log is not None:
            drop_log.delivered()
        # Under the lock, in this frame: it runs once per batch.
        result: tuple[Hashable, int, list[T]] | None = None
        with self._lock:
            unsettled = self._unsettled
            entries = unsettled.pop(seq, None)
            if entries is None:
                return None
            self.settled_entries += entries
            if self._settle_waiters:
                self._settled.notify_all()
            due = self._due
            made_due = False
            held = self._held
            while held:
                # The oldest held lane goes first (as _release_held does), with no wake-up for it yet.
                lane, _ = held.popitem(last=False)
                if len(lane) and not lane.due:
                    self._make_due(lane, first=True)
                    made_due = True
                    break
            limit = self._max_unsettled
            if not self._closing and self._gate is None and (limit is None or len(unsettled) < limit):
                # The clock is read only when a window may open or close (not for a lane the take empties).
                if not due and self._gate_shut:
                    self._close_windows(time.monotonic())  # a shut gate left them to whoever reopens it: this thread
                while due:
                    lane = due.popleft()
                    if not lane.due:
                        continue  # stale: take_now took it
                    lane.due = False
                    if not len(lane):
                        self._rearm(lane, None)
                        continue
                    items = lane.take(self.max_batch_size)
                    # _start_batch inline: once per batch on this path.
                    self._batch_seq = taken = self._batch_seq + 1
                    unsettled[taken] = count = len(items)
                    self.batches += 1
                    self.taken += count
                    if held:
                        held.pop(lane, None)
                    if self._flush_quota:
                        self._lower_quota(lane, count)
                    self._rearm(lane, None)  # the clock is read only if a window opens
                    if self._flush_taken:
                        self._flush_progress()
                    if self._space_waiters:
                        self._space.notify_all()
                    if self._gate_shut and (limit is None or len(unsettled) < limit):
                        self._gate_shut = False  # capacity left over: the worker takes the rest
                        self._notify_worker()
                    # Otherwise a shut gate stays shut: the capacity this settle freed is taken again.
                    result = lane.key, taken, items
                    break
            if result is None:
                if self._gate_shut:
                    self._gate_shut = False  # capacity freed: the waiting due lanes may go
                    if due or self._open:  # windows the shut gate left unclosed may be due by now
                        self._notify_worker()
                elif made_due:
                    self._notify_worker()
                return None
        if self._producers_waiting:
            # A producer waits for the lock this loop keeps taking: let it have the lock and the
            # GIL now, not after a switch interval per sending thread that loops like this one.
            _yield_gil(0)
        return result

    def _release_held(self) -> None:
        """A batch settled and freed the capacity the gate waits for: retry the oldest held lane. Holds _lock."""
        held = self._held
        while held:
            lane, _ = held.popitem(last=False)
            if len(lane) and not lane.due:
                self._make_due(lane, first=True)  # it waited longest: ahead of the untried
                self._notify_worker()
                return

    def _close_windows(self, now: float) -> int:
        """Make due the lanes whose windows closed by ``now`` (the slack included), at most a turn's worth.

        Returns how many, the stale entries passed included. A held lane whose window closed
        goes first and reopens the gate (its answer may have changed without a settle). Holds _lock.
        """
        closed = 0
        open_lanes, open_at = self._open, self._open_at
        until = now - self._slack
        held_lanes, due, cap_trigger = self._held, self._due, self._cap_trigger
        # _pop_window and _make_due inline: once per window closed (per batch, with many keys).
        while open_lanes and closed < _WINDOWS_PER_TURN:
            lane, deadline = open_lanes[0], open_at[0]
            if lane.deadline is not deadline or lane.due:
                open_lanes.popleft()  # stale: the lane went due or its window moved
                open_at.popleft()
                closed += 1  # counted: a turn's work under the lock stays bounded
                continue
            if deadline > until and not self._closing:
                break
            open_lanes.popleft()
            open_at.popleft()
            lane.due = True
            lane.trigger = cap_trigger
            closed += 1
            if held_lanes and lane in held_lanes:
                # A held lane's window closed: ask the gate again, for it first.
                due.appendleft(lane)
                self._gate_shut = False
            else:
                due.append(lane)
        return closed

    def _close_held_windows(self, now: float) -> None:
        """With the gate shut: make due, first, the held lanes whose windows closed by ``now``; holds _lock.

        They ask the gate again (its answer may change without a settle), so the gate opens
        for them. The other windows stay open until the gate opens: closing them all now would
        move lanes that cannot go anyway, under the lock every producer needs.
        """
        until = now - self._slack
        ripe = [lane for lane in self._held if not lane.due and lane.deadline is not None and lane.deadline <= until]
        for lane in reversed(ripe):  # the oldest held ends up first
            self._make_due(lane, first=True)
        if ripe:
            self._gate_shut = False

    def _next_work(
        self,
    ) -> tuple[list[tuple[Hashable, int, list[T]]], list[tuple[Hashable, int]]] | None:
        """Wait until a lane is due and take its batch; None when closed and empty. Holds _lock."""
        while True:
            now = time.monotonic()
            self._release_scheduled(now)
            if self._flush_requested > self._flush_taken:
                self._start_flush()
            if self._gate_shut:
                self._close_held_windows(now)  # may reopen the gate
            # With the gate shut, windows close only when a held lane's does (the gate opens for it):
            # a turn's worth at a time, so _open stays bounded (a held lane reopens its window).
            closed_windows = 0 if self._gate_shut else self._close_windows(now)
            if self._due and not self._gate_shut:
                return self._take_due(now)
            if closed_windows == _WINDOWS_PER_TURN:
                return [], []  # more windows closed: the next turn, after producers had the lock
            if self._closing and not self._scheduled:
                return None
            timeout = self._window_wait(now)
            due = self._scheduled.next_due()
            if due is not None:
                until = due - now
                timeout = until if timeout is None else min(timeout, until)
            if timeout is not None:
                # A wait past threading.TIMEOUT_MAX raises; the loop works out the rest again.
                timeout = min(timeout, _MAX_WAIT)
            self._worker_waiting = True
            try:
                self._wakeup.wait(timeout)
            finally:
                self._worker_waiting = False

    def _window_wait(self, now: float) -> float | None:
        """Seconds until the worker must close a window (None: none), the slack included. Holds _lock.

        With the gate shut nothing can be taken, so only the held lanes' windows matter (one
        retries the gate); the others are closed when a settle opens it and wakes the worker.
        """
        if self._gate_shut:
            # A held lane made due meanwhile (by a flush) waits for the gate like the others.
            deadlines = [lane.deadline for lane in self._held if lane.deadline is not None and not lane.due]
            if not deadlines:
                return None
            first = min(deadlines)
        else:
            open_lanes, open_at = self._open, self._open_at
            while open_lanes:
                lane, deadline = open_lanes[0], open_at[0]
                if lane.deadline is deadline and not lane.due:
                    break
                self._pop_window()  # stale
            else:
                return None
            first = deadline
        return first + self._slack - now

    def _release_scheduled(self, now: float) -> None:
        scheduled = self._scheduled
        if not scheduled:
            return
        for key, item in scheduled.pop_all() if self._closing else scheduled.pop_due(now):
            lane = self._lane_of(key)
            lane.requeue(item)  # a closed lane refuses producers, not the engine's own entries
            self._arm(lane)

    def _start_flush(self) -> None:
        # Everything in a lane now was enqueued before the flush; send that many from each lane.
        for lane in self._lanes.values():
            count = len(lane)
            if count:
                self._flush_quota[lane] = count
                self._arm(lane)
                if not lane.due:
                    self._make_due(lane)
        self._flush_taken = self._flush_requested
        if not self._flush_quota:
            self._flush_target_seq = self._batch_seq
            if self._settle_waiters:
                self._settled.notify_all()

    def _take_due(self, now: float) -> tuple[list[tuple[Hashable, int, list[T]]], list[tuple[Hashable, int]]]:
        batches: list[tuple[Hashable, int, list[T]]] = []
        skipped: list[tuple[Hashable, int]] = []
        due = self._due
        gate = None if self._closing else self._gate
        limit = _UNBOUNDED if self._closing or self._max_unsettled is None else self._max_unsettled
        unsettled = self._unsettled
        # One batch per lane due now: a lane made due again by its take (_rearm) goes next time.
        for _ in range(len(due)):
            lane = due.popleft()
            if not lane.due:
                continue  # stale: take_now took it
            lane.due = False
            if not len(lane):
                self._rearm(lane, now)
                continue
            if len(unsettled) >= limit or (gate is not None and not gate(lane.key)):
                skipped.append((lane.key, len(lane)))
                self.skipped += 1
                # Held back: try again when a batch settles or its next window closes. The
                # gate is one capacity for every lane: the lanes still due wait, untried.
                self._held[lane] = None
                lane.deadline = deadline = now + self.window
                self._open_window(lane, deadline)
                self._gate_shut = True
                break
            items = lane.take(self.max_batch_size)
            batches.append((lane.key, self._start_batch(lane, items), items))
            self._rearm(lane, now)
        self._flush_progress()
        if self._space_waiters:
            self._space.notify_all()
        return batches, skipped

    def _start_batch(self, lane: Lane[T], items: list[T]) -> int:
        """Count ``items``, just taken from ``lane``, as a batch in flight; returns its seq. Holds _lock."""
        self._batch_seq += 1
        self._unsettled[self._batch_seq] = len(items)
        self.batches += 1
        self.taken += len(items)
        self._held.pop(lane, None)
        self._lower_quota(lane, len(items))
        return self._batch_seq

    def _lower_quota(self, lane: Lane[T], taken: int) -> None:
        """``taken`` entries left ``lane`` by a take: a flush waits for that many fewer of it. Holds _lock."""
        quota = self._flush_quota.get(lane)
        if quota is not None:
            if quota <= taken:
                del self._flush_quota[lane]
            else:
                self._flush_quota[lane] = quota - taken

    def _flush_progress(self) -> None:
        """Once a flush's quotas are all taken, fix the last batch it waits for. Holds _lock."""
        if self._flush_taken and not self._flush_quota and self._flush_target_seq < self._batch_seq:
            self._flush_target_seq = self._batch_seq
            if self._settle_waiters:
                self._settled.notify_all()

    def _rearm(self, lane: Lane[T], now: float | None) -> None:
        """After a take: close the lane's window if it is empty, or open the next one (at ``now``; None:
        the clock is read then, as an empty lane needs no time). Holds _lock."""
        # Order matters: trigger first, then the length, so a concurrent append is never missed.
        lane.trigger = INACTIVE
        count = len(lane)
        if not count:
            lane.deadline = None  # its _open entry, if any, is stale now
            if lane is not self.default_lane:
                key = lane.key
                lanes = self._lanes
                one = lanes.one  # LaneTable.get and __delitem__ inline: once per batch that empties its lane
                table = one if one is not None else lanes.shards[hash(key) & SHARD_MASK]
                if table.get(key) is lane:
                    del table[key]  # a lock-free append may still land in it: kick adopts it
            return
        lane.trigger = self.max_batch_size
        if count >= self.max_batch_size or self._closing or lane in self._flush_quota:
            self._make_due(lane)
        else:
            # The next window starts now: at most one partial batch per window.
            lane.deadline = deadline = (time.monotonic() if now is None else now) + self.window
            self._open_window(lane, deadline)  # the old entry, if any, is stale now

    # -- flush, close, exit, fork ------------------------------------------------------------

    def pending(self) -> int:
        """Entries waiting in lanes or scheduled, not yet taken by the worker."""
        with self._lock:
            return sum(len(lane) for lane in self._lanes.values()) + len(self._scheduled)

    def in_flight(self) -> int:
        """Batches taken and not yet settled."""
        with self._lock:
            return len(self._unsettled)

    def lane_length(self, key: Hashable) -> int:
        """How many entries wait in the lane of ``key``."""
        with self._lock:
            lane = self._lanes.get(key)
            return 0 if lane is None else len(lane)

    def keys_with_entries(self) -> list[Hashable]:
        """Keys whose lanes hold entries now."""
        with self._lock:
            return [key for key, lane in self._lanes.items() if len(lane)]

    def snapshot(self) -> tuple[dict[Hashable, int], int, int]:
        """One consistent view: ({key: entries} of lanes holding entries, batches in flight, entries scheduled)."""
        with self._lock:
            lengths = {key: len(lane) for key, lane in self._lanes.items() if len(lane)}
            return lengths, len(self._unsettled), len(self._scheduled)

    @property
    def unsettled(self) -> int:
        """Batches taken and not yet settled, read without the lock: for ``gate``, which runs with it held."""
        return len(self._unsettled)

    def take_now(self, key: Hashable, count: int) -> tuple[int, list[T]]:
        """Take up to ``count`` entries of ``key``'s lane for the caller to send; settle with :meth:`settle`.

        Returns ``(0, [])`` when the lane is empty, or when the gate holds it back: then
        ``on_skip`` is called on this thread, as the worker would, and the entries stay.
        """
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None or not len(lane):
                return 0, []
            if not self._closing and self._refuses(key):
                self.skipped += 1
                held_back = len(lane)
            else:
                items = lane.take(count)
                lane.due = False  # its _due entry, if any, is stale now
                seq = self._start_batch(lane, items)
                self._rearm(lane, time.monotonic())
                self._flush_progress()
                return seq, items
        self._report_skipped(key, held_back)
        return 0, []

    def on_worker_thread(self) -> bool:
        """Whether the caller is the engine's worker thread."""
        return threading.current_thread() is self._thread

    def flush(self, timeout: float | None = None) -> bool:
        """Send every entry enqueued before this call and wait until those batches settle.

        Blocks up to ``timeout`` seconds (None: no limit); returns whether all were settled.
        Called from the worker thread itself (inside ``deliver``) it cannot wait and returns False.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.on_worker_thread():
            return False
        with self._lock:
            if self._thread is None and not self._unsettled and not self._has_entries():
                return True
            self._flush_requested += 1
            generation = self._flush_requested
            if self._thread is None and _lifecycle.exiting():
                inline = True
            else:
                inline = False
                self._ensure_worker()
                self._wakeup.notify()
        if inline:
            return self._drain_inline(deadline)
        with self._lock:
            self._settle_waiters += 1
            try:
                while self._flush_taken < generation or self._flush_quota:
                    if not self._wait_settled(deadline):
                        return False
                target = self._flush_target_seq
                while any(seq <= target for seq in self._unsettled):
                    if not self._wait_settled(deadline):
                        return False
                return True
            finally:
                self._settle_waiters -= 1

    def _wait_settled(self, deadline: float | None) -> bool:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        self._settled.wait(remaining)
        return True

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` (or the exit drain) has begun."""
        return self._closing

    def close_unreferenced(self, then: Callable[[], object] | None = None) -> None:
        """What a face's ``weakref.finalize`` calls: drain in the background; never blocks.

        The collector may run a finalizer on a thread that already holds this engine's
        lock (a collection inside a locked section), so nothing here waits for the lock:
        when it is free the close begins on this thread, otherwise a short-lived daemon
        thread begins it. ``then`` (e.g. shutting down a face's pool) runs after the
        drain, on a daemon thread. At exit the lifecycle drain has the engine instead.
        """
        if _lifecycle.exiting():
            return
        if then is None and self._lock.acquire(blocking=False):
            self._lock.release()
            self.begin_close()
            return

        def close_in_background() -> None:
            self.close(None)
            if then is not None:
                then()

        threading.Thread(target=close_in_background, name=f"threaddispatch-{self.name}-close", daemon=True).start()

    def begin_close(self) -> None:
        """Stop intake and wake the worker to drain everything; returns at once."""
        abandoned: list[tuple[Hashable, list[T]]] = []
        with self._lock:
            if not self._closing:
                self._closing = True
                self._gate_shut = False  # closing bypasses the gate
                if self._on_abandon is not None:
                    by_key: dict[Hashable, list[T]] = {}
                    for key, item in self._scheduled.pop_all():
                        by_key.setdefault(key, []).append(item)
                    abandoned = list(by_key.items())
                for lane in self._lanes.values():
                    if len(lane) and not lane.due:
                        self._make_due(lane)
                self._space.notify_all()
                if self._due or self._scheduled:
                    self._ensure_worker()
                self._wakeup.notify()
        for key, items in abandoned:
            try:
                assert self._on_abandon is not None
                self._on_abandon(key, items)
            except Exception:  # noqa: BLE001 - the drain goes on whatever the hook does
                _log.exception("%s: on_abandon hook raised", self.name)

    def close(self, timeout: float | None = None) -> bool:
        """Stop intake, deliver everything pending, and stop the worker; idempotent.

        Blocks up to ``timeout`` seconds (None: no limit); returns whether everything was
        delivered and settled in time. A hung ``deliver`` does not stretch the wait.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.begin_close()
        if self.on_worker_thread():
            # Called from inside deliver: the batch in hand cannot settle while we wait for it.
            return False
        with self._lock:
            thread = self._thread
        if thread is None and _lifecycle.exiting():
            return self._drain_inline(deadline)
        if thread is not None and thread is not threading.current_thread():
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._settle_waiters += 1
            try:
                while self._unsettled:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._settled.wait(remaining)
                return not self._unsettled and self._thread is None and not self._has_entries()
            finally:
                self._settle_waiters -= 1

    def _has_entries(self) -> bool:
        return any(len(lane) for lane in self._lanes.values()) or bool(self._scheduled)

    def _drain_inline(self, deadline: float | None) -> bool:
        """Run the batching loop on this thread (exit drain with no worker: no new thread)."""
        with self._lock:
            if self._thread is not None:
                return False
            self._thread = threading.current_thread()
            self._closing = True
            for lane in self._lanes.values():
                if len(lane) and not lane.due:
                    self._make_due(lane)
        try:
            while True:
                with self._lock:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    if not self._due:
                        self._release_scheduled(time.monotonic())
                    if not self._due:
                        break
                    batches, _skipped = self._take_due(time.monotonic())
                for key, seq, items in batches:
                    self._deliver_one(key, seq, items, inline=True)
        finally:
            with self._lock:
                self._thread = None
        with self._lock:
            return not self._has_entries() and not self._unsettled

    def drain_at_exit(self, deadline: float) -> tuple[int, int]:
        """Close against the global exit deadline; returns (entries delivered, entries lost).

        Delivered counts only batches that settled meanwhile: a batch whose deliver is
        still running (a hung send, an abandoned call) is lost, like the entries that
        were never taken.
        """
        with self._lock:
            settled_before = self.settled_entries
        self.close(max(0.0, deadline - time.monotonic()))
        with self._lock:
            lost = sum(len(lane) for lane in self._lanes.values()) + len(self._scheduled)
            lost += sum(self._unsettled.values())
            return self.settled_entries - settled_before, lost

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's entries (the parent delivers them) and worker."""
        closing = self._closing
        self._init_state(self.default_lane)
        self._closing = closing
        if self._own_drop_log:
            self._drop_log = None  # its lock may have been held at fork; the next drop makes a new one

    def use_drop_log(self, drop_log: DropLog) -> None:
        """Log drops (and recoveries) to ``drop_log`` from now on: a face's own, renewed after fork."""
        self._own_drop_log = False
        self._drop_log = drop_log

    # The lifecycle registry calls these two.
    def _drain_at_exit(self, deadline: float) -> tuple[int, int]:
        return self.drain_at_exit(deadline)

    def _reset_after_fork(self) -> None:
        self.reset_after_fork()
