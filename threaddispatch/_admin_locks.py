"""Who holds each serial lock, as ``GET /locks``, ``threaddispatch locks list`` and the dashboard show it.

Two kinds of holder (:meth:`JobEngine.lock_holders`): a running job with a lock
(``held_by: "running"``), and a :class:`~threaddispatch.stores.base.LockHold` that keeps a
job's lock past its running state while its handler still runs (a timeout, a cancel of a
running job, a hand-back at stop; ``held_by: "outlived"``): until it goes, no job of that lock
is claimed. Every face builds its answer with :func:`lock_holds`, so they agree. Blocks for
the engine's reads and one :meth:`Store.get` per holder shown (for its job's name and
state); thread-safe as the store is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from threaddispatch._validate import check_positive_int, check_text
from threaddispatch.stores.base import JobRecord, JobState

if TYPE_CHECKING:
    from threaddispatch.jobs import JobEngine

__all__ = ["lock_holds"]


def lock_holds(
    engine: JobEngine, *, lock: str | None = None, limit: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Who holds each lock (of ``lock``, or every lock), oldest heartbeat first, and how many holders there are.

    At most ``limit`` are returned (None: all); the count is of all of them. Each is the
    hold's fields (``lock``, ``job_id``, ``attempts``, ``worker_id``, ``heartbeat_at``) with
    the job's ``job_name`` and ``job_state`` (None for a job purged meanwhile) and
    ``held_by`` (``"running"``: the job's claim; ``"outlived"``: its handler past its claim) and
    ``held_since``: when the attempt holding it started (the job's ``started_at`` while its record
    still shows that attempt; None once it does not, e.g. purged). A hold's heartbeat is its
    worker's: one older than the engine's ``stale_job_threshold`` is a dead worker's, which the
    next reap deletes. Raises ConfigurationError for a bad ``lock`` or ``limit``.
    """
    if lock is not None:
        check_text("lock", lock)
    if limit is not None:
        check_positive_int("limit", limit)
    holds = engine.lock_holders(lock)
    shown = holds if limit is None else holds[:limit]
    jobs: dict[str, JobRecord | None] = {}
    for hold in shown:
        if hold.job_id not in jobs:
            jobs[hold.job_id] = engine.store.get(hold.job_id)
    answer = []
    for hold in shown:
        job = jobs[hold.job_id]
        # The job running in the hold's own attempt on its worker: its claim holds the lock. Any
        # other state is a handler that outlived its claim (a hold blocks the lock's claims, its
        # own job's next attempt too, so the two never meet).
        running = (
            job is not None
            and job.state is JobState.RUNNING
            and (job.attempts, job.worker_id) == (hold.attempts, hold.worker_id)
        )
        answer.append(
            {
                **hold.to_dict(),
                "job_name": None if job is None else job.name,
                "job_state": None if job is None else job.state.value,
                "held_by": "running" if running else "outlived",
                # The hold blocks its own job's next attempt, so the record shows the holding attempt
                # (and its start) until the hold goes, unless an operator's retry or a purge reset it.
                "held_since": job.started_at if job is not None and job.attempts == hold.attempts else None,
            }
        )
    return answer, len(holds)
