"""``python manage.py threaddispatch_worker``: run the project's job engine until SIGINT/SIGTERM.

It is ``threaddispatch worker`` (its :func:`~threaddispatch._cli_worker.run_worker` and its
options, added from the same ``OPTIONS``: ``--queues``, ``--concurrency``, ``--processes``,
``--burst``, ``--max-jobs``, ``--pidfile``, ``--log-level`` ...; the same log lines and exit
codes), handed the project's engine (:func:`~threaddispatch.contrib.django.conf.get_engine`,
after Django's setup: the ``tasks`` modules are imported and their jobs registered), plus a
line on stdout at start and at stop.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from threaddispatch import _cli_worker
from threaddispatch.contrib.django.conf import get_engine, get_settings
from threaddispatch.errors import ThreadDispatchError

#: What ``threaddispatch worker`` imports to get the engine: the project's, cached by ``get_engine``.
ENGINE_TARGET = "threaddispatch.contrib.django.conf:get_engine"


class Command(BaseCommand):
    """Start the engine of ``settings.THREADDISPATCH["ENGINE"]`` and block until a signal, then stop cleanly."""

    help = (
        "Run the threaddispatch job workers of settings.THREADDISPATCH['ENGINE'] until SIGINT/SIGTERM: "
        "claimed jobs that have not started go back to pending, running ones get shutdown_timeout to finish."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """The options of ``threaddispatch worker`` (``--queues``/``--concurrency`` default to QUEUES/CONCURRENCY)."""
        _cli_worker.add_options(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the workers; blocks until SIGINT/SIGTERM (or the engine is stopped from another thread)."""
        try:
            config = get_settings()
            if config.engine is None:
                raise ImproperlyConfigured(
                    "settings.THREADDISPATCH['ENGINE'] must name your JobEngine (its jobs must be registered)"
                )
            get_engine()  # errors in the ENGINE setting surface here, as Django errors
        except (ImproperlyConfigured, ThreadDispatchError) as error:
            raise CommandError(str(error)) from None
        worker = {option.dest: options[option.dest] for option in _cli_worker.OPTIONS}
        worker["queues"] = worker["queues"] or (list(config.queues) if config.queues else None)
        worker["concurrency"] = worker["concurrency"] or config.concurrency
        worker_args = argparse.Namespace(command="worker", target=ENGINE_TARGET, label=config.engine, **worker)
        status = _cli_worker.run_worker(worker_args, echo=self._echo)
        if status == 2:
            raise CommandError("the worker could not start (see above)", returncode=2)
        if status:
            raise CommandError("stopped with jobs still running: they were handed back to pending", returncode=1)

    def _echo(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
