"""The ``flask threaddispatch`` command group that :meth:`ThreadDispatch.init_app` adds to ``app.cli``.

``flask threaddispatch worker`` runs the app's engine as ``threaddispatch worker`` does
(the same options, made here as click options from that command's ``OPTIONS``, and the same
log lines and exit codes: it is that command's :func:`run_worker`, handed
:func:`~threaddispatch.contrib.flask.current_engine`); ``flask threaddispatch jobs list``
lists the app's jobs. Both run inside the app context the ``flask`` command makes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from flask.cli import AppGroup

from threaddispatch import _cli_admin, _cli_worker
from threaddispatch._cli_common import print_json
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine
from threaddispatch.stores.base import JobState

__all__ = ["cli_group"]

#: What ``threaddispatch worker`` imports to get the engine: the current app's.
ENGINE_TARGET = "threaddispatch.contrib.flask:current_engine"

_Command = Callable[..., None]

if TYPE_CHECKING:
    _ParamType = click.ParamType[Any]
else:  # generic only in recent click releases
    _ParamType = click.ParamType


class _OptionType(_ParamType):
    """A worker option's own parsing (``Option.parse``) as a click type: a bad value is click's usage error."""

    def __init__(self, option: _cli_worker.Option) -> None:
        self.option = option
        self.name = option.metavar or "value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str) or self.option.parse is None:
            return value  # already parsed (a default given as a value)
        try:
            return self.option.parse(value)
        except ConfigurationError as error:
            self.fail(str(error), param, ctx)


def worker_options(command: _Command) -> _Command:
    """Decorate a click command with every option of ``threaddispatch worker`` (its ``OPTIONS``), by the same names."""
    for option in reversed(_cli_worker.OPTIONS):
        if option.parse is None:
            command = click.option(option.flag, is_flag=True, default=False, help=option.help)(command)
        else:
            command = click.option(option.flag, type=_OptionType(option), default=option.default,
                                   metavar=option.metavar, help=option.help)(command)  # fmt: skip
    return command


def cli_group(current_engine: Callable[[], JobEngine]) -> AppGroup:
    """A new ``threaddispatch`` group (one per app): ``worker`` and ``jobs list``.

    ``current_engine`` returns the current app's engine (the commands run in its app context).
    """
    group = AppGroup("threaddispatch", help="Run and inspect this app's threaddispatch jobs.")

    @group.command("worker")
    @worker_options
    def worker(**options: Any) -> None:
        """Run the app's job workers until SIGINT/SIGTERM (claimed jobs not started go back to pending)."""
        args = argparse.Namespace(command="worker", target=ENGINE_TARGET, **options)
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
