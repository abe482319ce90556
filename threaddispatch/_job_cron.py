"""The JobEngine's cron runner: declares cron entries and fires the stored ones under leader leases.

One :class:`CronRunner` per engine holds the entries this engine declared; while the engine
runs, its ``threaddispatch-jobs-cron`` thread calls :meth:`CronRunner.run`, which lists the
store's entries at every turn and fires each entry whose job this engine registered while it
holds that entry's lease, so each tick fires once across every process. Cron expressions
themselves are :mod:`threaddispatch.cron`'s. The loop survives any ``Exception`` from a store
call (logged with its traceback; that step waits for the next turn, at most ``ttl / 3`` away).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timezone
from typing import Any

from threaddispatch._job_config import JobDefinition, check_optional_queue, check_priority
from threaddispatch._validate import check_text, show
from threaddispatch.cron import CronSchedule
from threaddispatch.cron import parse as parse_cron
from threaddispatch.errors import ConfigurationError
from threaddispatch.events import EventEmitter
from threaddispatch.stores.base import CRON_OVERLAP_POLICIES, CronEntry, JobRecord, Store

__all__ = ["CronRunner", "cron_lease"]

_CRON_LEASE = "cron-leader"

#: Builds the job of a cron tick: (entry, its job's definition, tick, now) -> the record to store.
BuildTick = Callable[[CronEntry, JobDefinition, float, float], JobRecord]


def cron_lease(name: str) -> str:
    """The store lease whose holder fires the cron entry ``name``."""
    return f"{_CRON_LEASE}:{name}"


def zoned_expression(expression: str, schedule: CronSchedule, tz: object) -> str:
    """``expression`` as stored: prefixed ``CRON_TZ=<zone>`` when ``tz`` gives its zone, for every process.

    ConfigurationError for a ``tz`` without an IANA name (a fixed-offset ``timezone``): another
    process reading the entry could not know it.
    """
    if tz is None or schedule.interval is not None or expression.lstrip().upper().startswith(("CRON_TZ=", "TZ=")):
        return expression
    zone = schedule.tz
    name = "UTC" if zone is timezone.utc else getattr(zone, "key", None)
    if not isinstance(name, str):
        raise ConfigurationError(
            f"cron tz {tz!r} has no IANA name: give one (e.g. 'Europe/Berlin') or a zoneinfo.ZoneInfo, "
            "so that every process sharing the store reads the entry in the same zone"
        )
    return f"CRON_TZ={name} {expression}"


class CronRunner:
    """An engine's cron entries: what it declared, and the loop that fires the stored ones.

    ``definitions`` returns the engine's registered jobs and ``lookup`` one of them (ConfigurationError
    for an unknown name); ``encode`` makes a payload's JSON text (PayloadError); ``build`` makes a
    tick's job record; ``enqueued`` tells the engine a tick's job was stored. Thread-safe.
    """

    def __init__(
        self,
        store: Store,
        logger: logging.Logger,
        events: EventEmitter,
        *,
        definitions: Callable[[], Mapping[str, JobDefinition]],
        lookup: Callable[[str], JobDefinition],
        encode: Callable[[str, object], str],
        build: BuildTick,
        enqueued: Callable[[Sequence[JobRecord]], None],
    ) -> None:
        self._store = store
        self._logger = logger
        self._events = events
        self._definitions = definitions
        self._lookup = lookup
        self._encode = encode
        self._build = build
        self._enqueued = enqueued
        # _lock guards the three fields below; no store call or user code runs with it held.
        self._lock = threading.Lock()
        self._declared: dict[str, tuple[CronSchedule, CronEntry]] = {}
        self._warned: set[str] = set()  # stored entries this engine said it cannot fire
        self._leased: set[str] = set()  # entries whose leader lease a run took

    def declare(
        self,
        expression: str,
        job_name: str,
        payload: object,
        *,
        queue: str | None,
        priority: int | None,
        name: str | None,
        tz: Any,
        overlap: str = "skip",
    ) -> CronEntry:
        """Check and store the entry of :meth:`JobEngine.cron <threaddispatch.JobEngine.cron>`; returns it as stored."""
        if overlap not in CRON_OVERLAP_POLICIES:
            raise ConfigurationError(f"cron overlap must be 'skip', 'queue' or 'allow', got {show(overlap)}")
        schedule = parse_cron(expression, tz=tz)
        stored_expression = zoned_expression(expression, schedule, tz)
        definition = self._lookup(job_name)
        entry_name = name if name is not None else f"{job_name}@{expression}"
        check_text("cron name", entry_name)
        check_optional_queue(queue)
        if priority is not None:
            check_priority(priority)
        now = time.time()
        entry = CronEntry(
            name=entry_name,
            expression=stored_expression,
            job_name=job_name,
            payload=self._encode(f"payload of cron {entry_name!r}", payload),
            queue=definition.queue if queue is None else queue,
            priority=definition.priority if priority is None else priority,
            last_tick=schedule.last_at(now),
            overlap=overlap,
        )
        stored = self._store.upsert_cron(entry, now=now)
        with self._lock:
            self._declared[entry_name] = (schedule, stored)
        return stored

    def forget(self, name: str) -> None:
        """Drop ``name`` from this engine's declarations (the store entry is the caller's)."""
        with self._lock:
            self._declared.pop(name, None)

    def run(self, worker_id: str, stop: threading.Event, ttl: float) -> None:
        """Fire due ticks as ``worker_id`` until ``stop`` is set (the cron thread's loop)."""
        fired_up_to: dict[str, float] = {}
        schedules: dict[str, CronSchedule | None] = {}  # stored expression -> its schedule (None: invalid)
        while not stop.is_set():
            wait = ttl / 3
            try:
                wait = self._turn(worker_id, ttl, fired_up_to, schedules)
            except Exception:  # the thread must outlive any one turn; the next comes after ttl / 3
                self._logger.exception("the cron thread's turn failed; it goes on in %.3gs", wait)
            stop.wait(max(wait, 0.001))

    def _turn(
        self, worker_id: str, ttl: float, fired_up_to: dict[str, float], schedules: dict[str, CronSchedule | None]
    ) -> float:
        """One turn of :meth:`run`: fire the due ticks whose leases this worker holds; seconds to wait.

        ``fired_up_to`` (entry name -> last tick fired here) and ``schedules`` (the parse
        cache of :meth:`_plan`) are the loop's, updated in place. A store call that raises
        (anything, not only a StoreError) is logged and skips its entry for this turn.
        """
        wait = ttl / 3
        plan, used = self._plan(schedules)
        if used is not schedules:
            schedules.clear()
            schedules.update(used)
        now = time.time()
        for name, schedule, entry in plan:
            # One lease per entry: whichever engine holds it fires the entry, so an entry
            # fires as long as some engine that registered its job runs.
            try:
                leader = self._store.acquire_lease(cron_lease(name), holder=worker_id, ttl=ttl, now=now)
            except Exception:
                self._logger.warning("cron %r: could not take the leader lease", name, exc_info=True)
                leader = False
            if leader:
                with self._lock:
                    self._leased.add(name)
                tick = schedule.last_at(now)
                stored_tick = -math.inf if entry.last_tick is None else entry.last_tick
                if tick > max(fired_up_to.get(name, -math.inf), stored_tick):
                    self._fire(entry, tick, now)
                    fired_up_to[name] = tick
                wait = min(wait, schedule.next_after(now) - time.time())
        return wait

    def release_leases(self, worker_id: str, deadline: float) -> None:
        """Give back every lease ``worker_id`` may hold, until ``deadline`` (the rest expire after their ttl)."""
        with self._lock:
            names = sorted({*self._declared, *self._leased})
            self._leased.clear()
        try:
            for index, name in enumerate(names):
                if index and time.monotonic() >= deadline:
                    break
                self._store.release_lease(cron_lease(name), holder=worker_id)
        except Exception:
            self._logger.warning("could not release the cron leases at stop", exc_info=True)

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (a parent thread may have held it), no leases (they are the parent's)."""
        self._lock = threading.Lock()
        self._leased = set()

    def _plan(
        self, schedules: dict[str, CronSchedule | None]
    ) -> tuple[list[tuple[str, CronSchedule, CronEntry]], dict[str, CronSchedule | None]]:
        """The enabled stored cron entries this engine can fire, with their schedules; one store read.

        ``schedules`` caches parsed stored expressions between turns (the returned dict
        replaces it). When the store cannot be read, this engine's own declarations stand in.
        """
        with self._lock:
            declared = dict(self._declared)
        registered = self._definitions()
        try:
            stored = self._store.list_crons()
        except Exception:
            self._logger.warning("could not list the stored cron entries; firing this engine's own", exc_info=True)
            return [(name, schedule, entry) for name, (schedule, entry) in declared.items()], schedules
        plan = []
        used: dict[str, CronSchedule | None] = {}
        for entry in stored:
            if not entry.enabled:
                continue
            if entry.job_name not in registered:
                self._cannot_fire(entry, f"its job {entry.job_name!r} is not registered here")
                continue
            local = declared.get(entry.name)
            if local is not None and local[1].expression == entry.expression:
                schedule: CronSchedule | None = local[0]
            elif entry.expression in schedules:
                schedule = schedules[entry.expression]
            else:
                try:
                    schedule = parse_cron(entry.expression)
                except ConfigurationError as error:
                    self._cannot_fire(entry, str(error))
                    schedule = None
            used[entry.expression] = schedule
            if schedule is not None:
                plan.append((entry.name, schedule, entry))
        return plan, used

    def _cannot_fire(self, entry: CronEntry, reason: str) -> None:
        """Warn, once per engine and entry name, that a stored cron entry does not fire here."""
        with self._lock:
            if entry.name in self._warned:
                return
            self._warned.add(entry.name)
        self._logger.warning(
            "cron %r is stored but cannot fire in this engine (%s); engines that can fire it do", entry.name, reason
        )

    def _skipped(self, job: JobRecord) -> bool:
        """Whether the fired tick's ``job`` was not stored (its entry's previous job, or a lock hold of its
        abandoned handler, holds the lock)."""
        try:
            return self._store.get(job.id) is None
        except Exception:  # noqa: BLE001 - unknown, whatever the error: report it as fired
            return False

    def _fire(self, entry: CronEntry, tick: float, now: float) -> None:
        definition = self._definitions().get(entry.job_name)
        if definition is None:
            return
        job = self._build(entry, definition, tick, now)
        try:
            fired = self._store.fire_cron(entry.name, tick=tick, job=job)
        except Exception:
            self._logger.warning("cron %r: firing tick %r failed", entry.name, tick, exc_info=True)
            return
        if fired and entry.overlap == "skip" and self._skipped(job):
            self._logger.info("cron %r: tick %r skipped, its previous job has not finished (or its handler still "
                              "runs past a timeout or a cancel)", entry.name, tick)  # fmt: skip
            return
        if fired:
            self._enqueued((job,))
            if self._events.has_listeners("cron_fired"):
                self._events.emit("cron_fired", entry.name, job.id)
