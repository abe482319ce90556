"""The ``flask threaddispatch`` command group that :meth:`ThreadDispatch.init_app` adds to ``app.cli``.

``flask threaddispatch worker`` runs the app's engine as ``threaddispatch worker`` does
(the same options, log lines and exit codes: it is that command's :func:`run_worker`,
handed :func:`~threaddispatch.contrib.flask.current_engine`); ``flask threaddispatch jobs
list`` lists the app's jobs. Both run inside the app context the ``flask`` command makes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import click
from flask.cli import AppGroup

from threaddispatch import _cli_admin, _cli_worker
from threaddispatch._cli_common import print_json
from threaddispatch.jobs import JobEngine
from threaddispatch.stores.base import JobState

__all__ = ["cli_group"]

#: What ``threaddispatch worker`` imports to get the engine: the current app's.
ENGINE_TARGET = "threaddispatch.contrib.flask:current_engine"
_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _queues(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    queues = [name.strip() for name in value.split(",") if name.strip()]
    if not queues:
        raise click.BadParameter(f"expected comma-separated queue names, got {value!r}")
    return queues


def cli_group(current_engine: Callable[[], JobEngine]) -> AppGroup:
    """A new ``threaddispatch`` group (one per app): ``worker`` and ``jobs list``.

    ``current_engine`` returns the current app's engine (the commands run in its app context).
    """
    group = AppGroup("threaddispatch", help="Run and inspect this app's threaddispatch jobs.")

    @group.command("worker")
    @click.option("--queues", callback=_queues, default=None, help="comma-separated queues (default: the engine's)")
    @click.option("--concurrency", type=click.IntRange(min=1), default=None, help="worker threads")
    @click.option("--log-level", type=click.Choice(_LEVELS, case_sensitive=False), default="INFO", show_default=True)
    def worker(queues: list[str] | None, concurrency: int | None, log_level: str) -> None:
        """Run the app's job workers until SIGINT/SIGTERM (claimed jobs not started go back to pending)."""
        args = argparse.Namespace(
            command="worker", target=ENGINE_TARGET, queues=queues, concurrency=concurrency, log_level=log_level.upper()
        )
        status = _cli_worker.run_worker(args)
        if status:
            raise SystemExit(status)

    jobs = AppGroup("jobs", help="Inspect the app's jobs.")
    group.add_command(jobs)

    @jobs.command("list")
    @click.option("--state", type=click.Choice([s.value for s in JobState]), default=None, help="only this state")
    @click.option("--queue", default=None, help="only this queue")
    @click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
    @click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
    def list_jobs(state: str | None, queue: str | None, limit: int, offset: int, as_json: bool) -> None:
        """The app's jobs, newest first (as ``threaddispatch jobs list``)."""
        found = current_engine().list_jobs(
            state=None if state is None else JobState(state), queue=queue, limit=limit, offset=offset
        )
        if as_json:
            print_json([job.to_dict() for job in found])
        elif found:
            # The table of ``threaddispatch jobs list`` (its helpers are private to the CLI; same columns).
            headers = ["ID", "NAME", "QUEUE", "STATE", "ATTEMPTS", "CREATED"]
            click.echo(_cli_admin._table(headers, _cli_admin._job_rows(found)))
        else:
            click.echo("no jobs")

    return group
