"""The cluster's statistics, read from the store: what ``GET /stats`` and ``threaddispatch stats`` answer.

Both build their answer with :func:`cluster_stats`, so the two agree: job counts by state
and by queue, dead letters, paused queues and the live workers of every process sharing
the store, never the counters of the engine that happens to serve the request (the admin
app adds those under their own key). Blocks for a handful of short store reads; thread-safe
as the engine's management reads are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores.base import WorkerInfo

__all__ = ["cluster_queues", "cluster_stats"]


def cluster_queues(engine: JobEngine, workers: Sequence[WorkerInfo]) -> list[dict[str, Any]]:
    """Every queue known to ``engine`` or served by one of ``workers``, by name: counts, pause state, workers.

    Known: the engine's configured queues and those of its definitions, the paused queues
    and the cron entries' queues (:meth:`JobEngine.queue_stats`), and every queue a live
    worker serves. Each is ``{"name", "paused", "counts": {state: n}, "workers": n}``,
    ``workers`` counting the live workers serving it.
    """
    serving: dict[str, int] = {}
    for worker in workers:
        for queue in worker.queues:
            serving[queue] = serving.get(queue, 0) + 1
    known = {entry["name"]: entry for entry in engine.queue_stats()}
    paused = {name for name, entry in known.items() if entry["paused"]}
    counts = {name: entry["counts"] for name, entry in known.items()}
    for name in sorted(set(serving) - set(known)):
        counts[name] = engine.counts(queue=name)
    return [
        {"name": name, "paused": name in paused, "counts": counts[name], "workers": serving.get(name, 0)}
        for name in sorted(counts)
    ]


def cluster_stats(engine: JobEngine) -> dict[str, Any]:
    """The cluster's state as the store holds it (``engine`` need not run; its own counters are not in it).

    ``{"counts": {state: n}, "total": n, "queues": [...] (see :func:`cluster_queues`),
    "other_queues": {state: n}, "dead_letters": n, "paused_queues": [...], "workers":
    [worker dicts], "store": {...}}``. ``other_queues`` counts the jobs of queues no one
    knows (no worker serves them, no cron or definition names them): jobs nothing will
    claim until a worker serves their queue.
    """
    workers = engine.workers()
    counts = engine.counts()
    queues = cluster_queues(engine, workers)
    # The reads are not one snapshot: a job moving between them could make a difference negative.
    other = {state: max(0, total - sum(q["counts"].get(state, 0) for q in queues)) for state, total in counts.items()}
    return {
        "counts": counts,
        "total": sum(counts.values()),
        "queues": queues,
        "other_queues": other,
        "dead_letters": engine.dlq_count(),
        "paused_queues": sorted(engine.paused_queues()),
        "workers": [worker.to_dict() for worker in workers],
        "store": engine.describe_store(),
    }
