"""The admin app's route handlers: each reads its request's parameters and makes the engine calls it answers with.

A handler is ``handler(app, request) -> (status, data)``, ``app`` being the
:class:`AdminContext` (the app: its engine and route table). Handlers manage through the
:class:`~threaddispatch.jobs.JobEngine` API only, never its store; they raise
:class:`~threaddispatch._wsgi.HttpError` or the engine's errors, which the app turns into
answers. Each blocks for the engine's store calls (one to a few short ones).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from threaddispatch._admin_cursor import DEFAULT_LIMIT, MAX_LIMIT, Anchor, keyset_page
from threaddispatch._admin_locks import lock_holds
from threaddispatch._admin_params import Request
from threaddispatch._admin_stats import cluster_stats
from threaddispatch._wsgi import bad
from threaddispatch.errors import JobNotFoundError, StoreError
from threaddispatch.stores.base import JobRecord, JobState

if TYPE_CHECKING:
    from threaddispatch._admin_routes import RouteTable
    from threaddispatch.jobs import JobEngine

_log = logging.getLogger("threaddispatch.admin")
_MAX_REPLAY_ALL = 100_000
_MAX_THROUGHPUT_MINUTES = 24 * 60
_NAME_SCAN_CHUNK = 500  # jobs per store read while filtering by name
Answer = tuple[int, object]


class AdminContext(Protocol):
    """What a handler sees of the app: the engine it manages and the routes it serves."""

    @property
    def engine(self) -> JobEngine: ...

    @property
    def routes(self) -> RouteTable[AdminContext]: ...


def index(app: AdminContext, request: Request) -> Answer:
    return 200, {"routes": app.routes.listing(request.script_name)}


# -- jobs -----------------------------------------------------------------------------------------------


def list_jobs(app: AdminContext, request: Request) -> Answer:
    state = request.state()
    queue = request.text("queue")
    name = request.text("name")

    def fetch(after: Anchor | None, limit: int, position: int) -> list[JobRecord]:
        if name is None:
            return app.engine.list_jobs_after(after, state=state, queue=queue, limit=limit, position=position)
        return _jobs_named(app.engine, name, after, state=state, queue=queue, limit=limit)

    filters: list[object] = [None if state is None else state.value, queue]
    if name is not None:
        filters.append(name)  # a cursor of the unnamed listing keeps its two filters
    page, next_cursor = keyset_page(request, "jobs", filters, fetch, lambda job: (job.id, job.created_at))
    return 200, {"jobs": [job.to_dict() for job in page], "next_cursor": next_cursor}


def _jobs_named(
    engine: JobEngine, name: str, after: Anchor | None, *, state: JobState | None, queue: str | None, limit: int
) -> list[JobRecord]:
    """The first ``limit`` jobs named ``name`` after ``after``: the store has no name filter, so this scans.

    The scan reads keyset pages of _NAME_SCAN_CHUNK jobs (the other filters applied by
    the store) until ``limit`` match or the listing ends: a rare name costs a read of the
    whole filtered listing, in bounded chunks.
    """
    found: list[JobRecord] = []
    while True:
        chunk = engine.list_jobs_after(after, state=state, queue=queue, limit=_NAME_SCAN_CHUNK)
        found.extend(job for job in chunk if job.name == name)
        if len(found) >= limit or len(chunk) < _NAME_SCAN_CHUNK:
            return found[:limit]
        after = (chunk[-1].id, chunk[-1].created_at)


def job_counts(app: AdminContext, request: Request) -> Answer:
    counts = app.engine.counts(queue=request.text("queue"))
    return 200, {"counts": counts, "total": sum(counts.values())}


def get_job(app: AdminContext, request: Request) -> Answer:
    return 200, {"job": app.engine.get_job(request.groups[0]).to_dict()}


def cancel_job(app: AdminContext, request: Request) -> Answer:
    # The engine's rule, as the CLI's: pending, retrying and running jobs cancel (a running
    # one's handler gets ctx.cancelled and its outcome is discarded); others are 409.
    job_id = request.groups[0]
    app.engine.cancel(job_id)
    return 200, {"job": app.engine.get_job(job_id).to_dict()}


def retry_job(app: AdminContext, request: Request) -> Answer:
    # The engine's rule, as the CLI's: failed and cancelled jobs run again; others are 409.
    job_id = request.groups[0]
    app.engine.retry(job_id)
    return 200, {"job": app.engine.get_job(job_id).to_dict()}


# -- dead letters ---------------------------------------------------------------------------------------


def list_dead_letters(app: AdminContext, request: Request) -> Answer:
    queue = request.text("queue")
    page, next_cursor = keyset_page(
        request, "dlq", [queue],
        lambda after, limit, position: app.engine.list_dead_letters_after(
            after, queue=queue, limit=limit, position=position
        ),
        lambda letter: (letter.id, letter.failed_at),
    )  # fmt: skip
    return 200, {"dead_letters": [letter.to_dict() for letter in page], "next_cursor": next_cursor}


def count_dead_letters(app: AdminContext, request: Request) -> Answer:
    return 200, {"count": app.engine.dlq_count(request.text("queue"))}


def replay_all(app: AdminContext, request: Request) -> Answer:
    queue = request.text("queue")
    limit = request.integer("limit", None, 1, _MAX_REPLAY_ALL)
    replayed = app.engine.replay_all(queue, limit=limit)
    refused = [{"dead_letter_id": letter_id, "error": error} for letter_id, error in replayed.refused.items()]
    return 200, {"replayed": len(replayed), "job_ids": list(replayed), "refused": refused}


def purge_dead_letters(app: AdminContext, request: Request) -> Answer:
    # Purging everything takes an explicit all=true: no missing or null parameter widens it.
    older_than = request.seconds("older_than")
    everything = request.flag("all")
    if everything is False:
        raise bad("all", "all must be true to purge every dead letter; to purge by age give only older_than")
    if everything and older_than is not None:
        raise bad("all", "give older_than or all=true, not both")
    if older_than is None and not everything:
        raise bad("older_than", "give older_than (seconds) to purge older dead letters, or all=true for every one")
    return 200, {"purged": app.engine.purge_dlq(older_than)}


def get_dead_letter(app: AdminContext, request: Request) -> Answer:
    return 200, {"dead_letter": app.engine.get_dead_letter(request.groups[0]).to_dict()}


def replay(app: AdminContext, request: Request) -> Answer:
    return 200, {"job_id": app.engine.replay(request.groups[0])}


# -- crons ----------------------------------------------------------------------------------------------


def list_crons(app: AdminContext, request: Request) -> Answer:
    return 200, {"crons": [entry.to_dict() for entry in app.engine.crons()]}


def get_cron(app: AdminContext, request: Request) -> Answer:
    return 200, {"cron": app.engine.get_cron(request.groups[0]).to_dict()}


def delete_cron(app: AdminContext, request: Request) -> Answer:
    name = request.groups[0]
    if not app.engine.remove_cron(name):
        raise JobNotFoundError(f"no cron entry named {name!r}")
    return 200, {"deleted": name}


def enable_cron(app: AdminContext, request: Request) -> Answer:
    return 200, {"cron": app.engine.enable_cron(request.groups[0]).to_dict()}


def disable_cron(app: AdminContext, request: Request) -> Answer:
    return 200, {"cron": app.engine.disable_cron(request.groups[0]).to_dict()}


# -- queues ---------------------------------------------------------------------------------------------


def list_queues(app: AdminContext, request: Request) -> Answer:
    return 200, {"queues": app.engine.queue_stats()}


def pause_queue(app: AdminContext, request: Request) -> Answer:
    name = _queue_name(request)
    app.engine.pause_queue(name)
    return 200, {"queue": name, "paused": True}


def resume_queue(app: AdminContext, request: Request) -> Answer:
    name = _queue_name(request)
    app.engine.resume_queue(name)
    return 200, {"queue": name, "paused": False}


def _queue_name(request: Request) -> str:
    name = request.groups[0]
    if not name or name != name.strip():
        raise bad("name", f"queue name must be non-empty without surrounding spaces, got {name!r}")
    return name


# -- stats and health -----------------------------------------------------------------------------------


def stats(app: AdminContext, request: Request) -> Answer:
    # The cluster's, from the store (as ``threaddispatch stats``); the serving engine's own counters apart.
    return 200, {**cluster_stats(app.engine), "serving_engine": app.engine.stats()}


def list_workers(app: AdminContext, request: Request) -> Answer:
    return 200, {"workers": [worker.to_dict() for worker in app.engine.workers()]}


def list_locks(app: AdminContext, request: Request) -> Answer:
    # Holders are few (running jobs with a lock, handlers that outlived their claim): capped by limit, with the total.
    limit = request.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    holds, total = lock_holds(app.engine, limit=limit)
    return 200, {"holds": holds, "total": total}


def get_lock(app: AdminContext, request: Request) -> Answer:
    # A lock is no stored entity: a key nothing holds answers an empty list, not a 404.
    key = request.groups[0]
    limit = request.integer("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    holds, total = lock_holds(app.engine, lock=key, limit=limit)
    return 200, {"lock": key, "holds": holds, "total": total}


def throughput(app: AdminContext, request: Request) -> Answer:
    minutes = request.integer("minutes", 60, 1, _MAX_THROUGHPUT_MINUTES)
    assert minutes is not None
    return 200, {"minutes": minutes, "buckets": app.engine.throughput(minutes)}


def health(app: AdminContext, request: Request) -> Answer:
    try:
        app.engine.paused_queues()  # one cheap read: does the store answer?
    except StoreError as error:
        _log.warning("admin health check: the store does not answer: %s", error)
        return 503, {"status": "unavailable", "store": "unavailable", "engine": app.engine.stats()["state"]}
    return 200, {"status": "ok", "store": "ok", "engine": app.engine.stats()["state"]}
