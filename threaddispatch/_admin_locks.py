"""The serial-lock holds of a store, as ``GET /locks`` and ``threaddispatch locks list`` show them.

A hold (:class:`~threaddispatch.stores.base.LockHold`) keeps a job's serial lock past its
running state while its handler still runs (a timeout, a cancel of a running job, a hand-back
at stop): until it goes, no job of that lock is claimed. Both faces build their answer with
:func:`lock_holds`, so the two agree. A running job holds its lock without a hold: it is
listed by ``GET /jobs?state=running`` (its ``lock`` field), not here.

The engine has no read of holds, so this module reads :meth:`Store.list_holds` through
``engine.store``: one read, and nothing is changed. Blocks for that read and one
:meth:`Store.get` per job shown (for its name and state); thread-safe as the store is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from threaddispatch._validate import check_positive_int, check_text

if TYPE_CHECKING:
    from threaddispatch.jobs import JobEngine

__all__ = ["lock_holds"]


def lock_holds(
    engine: JobEngine, *, lock: str | None = None, limit: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The holds of ``engine``'s store (of ``lock``, or of every lock), oldest heartbeat first, and how many there are.

    At most ``limit`` are returned (None: all); the count is of all of them. Each is the
    hold's fields (``lock``, ``job_id``, ``attempts``, ``worker_id``, ``heartbeat_at``) with
    the job's ``job_name`` and ``job_state`` (None for a job purged meanwhile). A hold's
    heartbeat is its worker's: one older than the engine's ``stale_job_threshold`` is a dead
    worker's, which the next reap deletes. Raises ConfigurationError for a bad ``lock`` or ``limit``.
    """
    if lock is not None:
        check_text("lock", lock)
    if limit is not None:
        check_positive_int("limit", limit)
    holds = engine.store.list_holds(lock=lock)
    shown = holds if limit is None else holds[:limit]
    jobs: dict[str, tuple[str | None, str | None]] = {}
    for hold in shown:
        if hold.job_id not in jobs:
            job = engine.store.get(hold.job_id)
            jobs[hold.job_id] = (None, None) if job is None else (job.name, job.state.value)
    answer = []
    for hold in shown:
        name, state = jobs[hold.job_id]
        answer.append({**hold.to_dict(), "job_name": name, "job_state": state})
    return answer, len(holds)
