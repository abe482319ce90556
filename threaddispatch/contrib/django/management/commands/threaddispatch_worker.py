"""``python manage.py threaddispatch_worker``: run the project's job engine until SIGINT/SIGTERM.

It is ``threaddispatch worker`` (its :func:`~threaddispatch._cli_worker.run_worker`: the same
``--log-level``, log lines and exit codes), handed the project's engine
(:func:`~threaddispatch.contrib.django.conf.get_engine`, after Django's setup: the
``tasks`` modules are imported and their jobs registered), plus a line on stdout at start
and at a clean stop.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from threaddispatch import _cli_worker
from threaddispatch.contrib.django.conf import get_engine, get_settings
from threaddispatch.errors import ThreadDispatchError


def _queues(text: str) -> list[str]:
    queues = [name.strip() for name in text.split(",") if name.strip()]
    if not queues:
        raise argparse.ArgumentTypeError(f"expected comma-separated queue names, got {text!r}")
    return queues


#: What ``threaddispatch worker`` imports to get the engine: the project's, cached by ``get_engine``.
ENGINE_TARGET = "threaddispatch.contrib.django.conf:get_engine"
_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _concurrency(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


class Command(BaseCommand):
    """Start the engine of ``settings.THREADDISPATCH["ENGINE"]`` and block until a signal, then stop cleanly."""

    help = (
        "Run the threaddispatch job workers of settings.THREADDISPATCH['ENGINE'] until SIGINT/SIGTERM: "
        "claimed jobs that have not started go back to pending, running ones get shutdown_timeout to finish."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """``--queues a,b`` and ``--concurrency N`` (defaults: QUEUES / CONCURRENCY, then the engine's)."""
        parser.add_argument("--queues", type=_queues, default=None, help="comma-separated queues to process")
        parser.add_argument("--concurrency", type=_concurrency, default=None, help="worker threads")
        parser.add_argument("--log-level", type=str.upper, default="INFO", choices=_LEVELS, help="logging level")

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the workers; blocks until SIGINT/SIGTERM (or the engine is stopped from another thread)."""
        try:
            config = get_settings()
            if config.engine is None:
                raise ImproperlyConfigured(
                    "settings.THREADDISPATCH['ENGINE'] must name your JobEngine (its jobs must be registered)"
                )
            engine = get_engine()
            queues = options["queues"] or (list(config.queues) if config.queues else None)
            concurrency = options["concurrency"] or config.concurrency
            self.stdout.write(
                f"threaddispatch worker: {config.engine}, queues={queues or list(engine.config.queues)}, "
                f"concurrency={concurrency or engine.config.concurrency}"
            )
            self.stdout.flush()
            worker_args = argparse.Namespace(command="worker", target=ENGINE_TARGET, queues=queues,
                                      concurrency=concurrency, log_level=options["log_level"])  # fmt: skip
            status = _cli_worker.run_worker(worker_args)
        except (ImproperlyConfigured, ThreadDispatchError) as error:
            raise CommandError(str(error)) from None
        if status == 2:
            raise CommandError("the engine could not be loaded (see above)", returncode=2)
        if status:
            raise CommandError("stopped with jobs still running: they were handed back to pending", returncode=1)
        self.stdout.write("threaddispatch worker: stopped cleanly")
