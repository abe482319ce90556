"""The upkeep of a running JobEngine's claims: heartbeats, job timeouts, reaping stale jobs, purging.

One :class:`Maintenance` per runtime, and two loops, each on its own thread:

- :meth:`Maintenance.run_heartbeats`, the ``threaddispatch-jobs-heartbeat`` thread,
  heartbeats the jobs running here (learning which are no longer this worker's claim) and
  the serial lock holds of handlers still running after their claim ended (a timeout, a
  cancel: see ``Store.hold_locks``), refreshes the run's worker-registry row with their
  count (:mod:`threaddispatch._job_workers`) and times out jobs at their deadline.
- :meth:`Maintenance.run_upkeep`, the ``threaddispatch-jobs-upkeep`` thread, recovers
  the stale jobs (and deletes the stale registry rows) of dead workers, settles waiting
  jobs whose dependencies finished and purges finished jobs past ``retention``, once per
  heartbeat interval, until stop begins.

Two threads, not one, because a heartbeat must never wait behind housekeeping: a reap on
a slow store, or a purge of a million finished rows (a thousand short transactions), could
outlast ``stale_job_threshold`` minus one interval, and another worker would then take this
worker's running jobs for a dead one's and run them twice; a job's timeout would be late
by as much. It decides; the runtime records (a timeout goes through the one completion
path like any outcome).

Each loop survives any ``Exception``: a store call that raises (a StoreError, or anything
else: a store bug, a codec error) is logged with its traceback and that step is skipped
until the next turn, which bounds the log to one line per step and interval.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from threaddispatch._job_shared import Shared, Slot
from threaddispatch._job_workers import Registration

__all__ = ["Host", "Maintenance"]


class Host(Protocol):
    """What the maintenance loop needs of its runtime. Fields are read with the shared lock held."""

    shared: Shared
    worker_id: str
    inflight: dict[str, Slot]
    registration: Registration  # its own lock; beaten without the shared lock
    stop_event: threading.Event  # set as stop begins: the upkeep loop leaves (no reaping or purging then)

    def leaving(self) -> bool:
        """Whether the loop should end now (lock held)."""

    def time_out(self, slot: Slot) -> None:
        """Record that ``slot`` (already settled and abandoned) ran past its deadline."""

    def lose(self, slot: Slot) -> None:
        """``slot`` is no longer this worker's claim (already settled and abandoned)."""

    def reaped(self, job_ids: list[str], now: float) -> None:
        """The store put back ``job_ids`` of dead workers at ``now``: claim them."""

    def beat_holds(self) -> None:
        """Heartbeat the serial lock holds of handlers still running after their claim ended (no lock held)."""


class Maintenance:
    """The heartbeat thread's work for one runtime (see the module docstring)."""

    def __init__(self, host: Host) -> None:
        self._host = host

    def run_heartbeats(self) -> None:
        """The heartbeat loop: wake at the next heartbeat or job deadline, whichever comes first, until stop lets go."""
        host = self._host
        shared = host.shared
        interval = shared.config.heartbeat_interval
        next_beat = time.monotonic()
        while True:
            with shared.lock:
                if host.leaving():
                    return
                now = time.monotonic()
                slots = [slot for slot in host.inflight.values() if not slot.settled]
                deadlines = [slot.ctx.deadline for slot in slots if slot.ctx.deadline]
                wake_at = min([next_beat, *deadlines])
                if wake_at > now:
                    shared.maint.wait(wake_at - now)
                    continue
                expired = [slot for slot in slots if slot.ctx.deadline is not None and slot.ctx.deadline <= now]
                for slot in expired:
                    slot.settled = slot.abandoned = True
                beat = now >= next_beat
            if beat:
                next_beat = time.monotonic() + interval
            try:
                for slot in expired:
                    host.time_out(slot)
                if beat:
                    self._heartbeat()
            except Exception:  # the thread must outlive any one turn; the next waits for next_beat
                shared.logger.exception("the heartbeat thread's turn failed; it goes on at the next heartbeat")

    def run_upkeep(self) -> None:
        """The upkeep loop: reap, settle waiting jobs (and purge, every ``retention / 2``) once per
        heartbeat interval, the first turn at once, until stop begins."""
        host = self._host
        shared = host.shared
        config = shared.config
        interval = config.heartbeat_interval
        retention = config.retention
        purge_every = max(interval, min(3600.0, (retention or 0.0) / 2))
        next_purge = time.monotonic()
        while not host.stop_event.is_set():
            turn_began = time.monotonic()
            try:
                self._reap()
                if retention is not None and time.monotonic() >= next_purge and not host.stop_event.is_set():
                    next_purge = time.monotonic() + purge_every
                    self._purge(retention)
            except Exception:  # the thread must outlive any one turn; the next comes an interval later
                shared.logger.exception("the upkeep thread's turn failed; it goes on at the next interval")
            # One interval from the turn's start (a long turn is followed by the next at once), or stop.
            host.stop_event.wait(max(0.0, turn_began + interval - time.monotonic()))

    def _heartbeat(self) -> None:
        host = self._host
        shared = host.shared
        with shared.lock:
            ids = [job_id for job_id, slot in host.inflight.items() if not slot.settled]
        # The jobs' heartbeat first, then the serial lock holds', then the worker row: a late job
        # heartbeat gets a running job reaped and run twice, a late worker row only shows it late
        # in the admin listing. Measured on PostgreSQL under two busy loops: the two writes before
        # it delayed the jobs' by up to 135 ms (0.1 s interval; the gap reached 261 ms).
        alive = self._beat_jobs(ids)
        host.beat_holds()
        host.registration.beat(len(ids))
        if alive is None or len(alive) == len(ids):
            return
        with shared.lock:
            lost = [host.inflight[i] for i in ids if i not in alive and i in host.inflight]
            lost = [slot for slot in lost if not slot.settled]
            for slot in lost:
                slot.settled = slot.abandoned = True
        for slot in lost:
            host.lose(slot)

    def _beat_jobs(self, ids: list[str]) -> set[str] | None:
        """Heartbeat the jobs ``ids`` (one store call); the ids still this worker's, None if it failed."""
        if not ids:
            return set()
        shared = self._host.shared
        try:
            return shared.store.heartbeat(ids, worker_id=self._host.worker_id, now=time.time())
        except Exception:
            shared.logger.warning("heartbeat failed for %d jobs", len(ids), exc_info=True)
            return None

    def _reap(self) -> None:
        shared = self._host.shared
        now = time.time()
        try:
            reaped = shared.store.reap_stale(older_than=now - shared.config.stale_job_threshold, now=now)
        except Exception:
            shared.logger.warning("recovering stale jobs failed", exc_info=True)
            return
        if reaped:
            self._host.reaped(reaped, now)
            shared.logger.warning("recovered %d stale job(s) of dead workers: %s", len(reaped), ", ".join(reaped))
        try:
            gone = shared.store.reap_workers(older_than=now - shared.config.stale_job_threshold)
        except Exception:
            shared.logger.warning("deleting stale worker rows failed", exc_info=True)
        else:
            if gone:
                shared.logger.info("deleted %d stale worker row(s)", gone)
        try:
            settled = shared.store.release_waiting(now=now)
        except Exception:
            shared.logger.warning("settling waiting jobs failed", exc_info=True)
        else:
            if settled:
                shared.logger.info("settled %d waiting job(s) whose dependencies had finished", settled)

    def _purge(self, retention: float) -> None:
        shared = self._host.shared
        try:
            purged = shared.store.purge_finished(older_than=time.time() - retention)
        except Exception:
            shared.logger.warning("purging finished jobs failed", exc_info=True)
        else:
            if purged:
                shared.logger.info("purged %d finished jobs older than %.3gs", purged, retention)
