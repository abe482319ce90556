"""The ``threaddispatch worker module:engine`` subcommand.

``cli.py`` owns ``main()``; it wires this in with :func:`add_parsers` and then calls
``args.handler(args)``. :func:`main` runs the subcommand on its own (tests, or
``python -m threaddispatch._cli_worker module:engine``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from threaddispatch._cli_common import fail, positive_int
from threaddispatch.errors import ConfigurationError
from threaddispatch.jobs import JobEngine

__all__ = ["add_parsers", "add_worker_parser", "load_engine", "main", "run_worker"]


def load_engine(target: str) -> JobEngine:
    """Import ``module:attribute`` (dots allowed in both) and return the JobEngine it names.

    The attribute may also be a callable taking no argument that returns an engine. The
    current directory is put on ``sys.path`` first, as gunicorn does. Raises
    ConfigurationError naming ``target`` when it cannot be resolved.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"worker target must look like 'module:engine', got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(f"cannot import module {module_name!r} of {target!r}: {error}") from error
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{target!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(obj, JobEngine) and callable(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise ConfigurationError(
                f"{target!r} is not a JobEngine nor a callable taking no argument that returns one"
            ) from None
        except ValueError:
            pass  # no signature to check (some builtins): just call it
        obj = obj()
    if not isinstance(obj, JobEngine):
        raise ConfigurationError(f"{target!r} is not a JobEngine (got {type(obj).__name__})")
    return obj


def _queues(text: str) -> list[str]:
    queues = [name.strip() for name in text.split(",") if name.strip()]
    if not queues:
        raise argparse.ArgumentTypeError(f"expected comma-separated queue names, got {text!r}")
    return queues


def add_worker_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``worker`` subcommand to an ``argparse`` subparsers object; returns its parser.

    Sets ``func=run_worker`` as the parser default, so ``main()`` calls ``args.func(args)``.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker",
        help="run a JobEngine's workers until SIGINT/SIGTERM",
        description=(
            "Import module:engine (a JobEngine, or a callable returning one) and run its workers. "
            "SIGTERM or SIGINT stops them cleanly: claimed jobs that have not started go back to "
            "pending, running ones get the engine's shutdown_timeout to finish."
        ),
    )
    parser.add_argument("target", help="module:attribute naming the JobEngine, e.g. myapp.tasks:engine")
    parser.add_argument(
        "--queues", type=_queues, default=None, help="comma-separated queues to process (default: the engine's)"
    )
    parser.add_argument("--concurrency", type=positive_int, default=None, help="worker threads (default: the engine's)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level"
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"],
        help="log lines as text, or as one JSON object per line (for containers)",
    )  # fmt: skip
    parser.set_defaults(func=run_worker)
    return parser


def add_parsers(subparsers: Any) -> None:
    """The hook ``threaddispatch.cli`` calls: add ``worker``, run through ``args.handler`` like every subcommand."""
    add_worker_parser(subparsers).set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    """Run the worker described by parsed ``args``; blocks until a signal; returns the exit status.

    0 when every job finished cleanly at stop, 1 when some were handed back, 2 for a bad target.
    """
    handler = logging.StreamHandler()
    if getattr(args, "log_format", "text") == "json":
        from threaddispatch._log_json import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    try:
        engine = load_engine(args.target)
    except ConfigurationError as error:
        return fail("worker", str(error), 2)
    log = logging.getLogger("threaddispatch.worker")
    log.info(
        "worker starting: %s on %s, queues=%s, concurrency=%s",
        args.target, dict(engine.store.describe()), args.queues or list(engine.config.queues),
        args.concurrency or engine.config.concurrency,
    )  # fmt: skip
    clean = engine.run(queues=args.queues, concurrency=args.concurrency)
    log.info("worker stopped (%s)", "clean" if clean else "some jobs were handed back")
    return 0 if clean else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as ``worker`` arguments (without the word ``worker``) and run it."""
    parser = argparse.ArgumentParser(prog="threaddispatch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_worker_parser(subparsers)
    args = parser.parse_args(["worker", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
