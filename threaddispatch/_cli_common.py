"""What every ``threaddispatch`` subcommand shares: argument types, opening the store, output, the error exit.

The CLI modules import this one and never each other except downward: ``cli`` (``main``,
the parser, ``bench``) imports ``_cli_admin`` (jobs, dlq, migrate, serve) and
``_cli_worker`` (worker); both of those import only this module. Every error is one line
on stderr with exit code 2, never a traceback: bad input is a :class:`CommandError`; a store
failing at run time (a PostgreSQL server that is down) is a :class:`StoreFailedError` or a
library :class:`~threaddispatch.errors.StoreError`, its message naming the store without
its password.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from threaddispatch._dsn import sqlite_path
from threaddispatch._redact import redact, scrub
from threaddispatch.errors import StoreError, StoreUnavailableError, ThreadDispatchError

if TYPE_CHECKING:
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores.base import Store

__all__ = [
    "STORE_ENV",
    "CommandError",
    "Handler",
    "StoreFailedError",
    "command",
    "count",
    "fail",
    "one_line",
    "open_engine",
    "open_store",
    "positive_int",
    "print_json",
    "store_url",
]

#: The environment variable standing in for ``--store URL``.
STORE_ENV = "THREADDISPATCH_STORE"

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class StoreFailedError(Exception):
    """The store failed at run time (not the user's input): one line, exit code 2."""


# -- argument types ---------------------------------------------------------------------------------


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def count(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        value = _whole(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a number from {low} to {high}, got {text!r}")
        return value

    return parse


# -- output and the error exit ----------------------------------------------------------------------


def print_json(data: object) -> None:
    """``data`` as indented JSON on stdout (anything JSON does not know is shown as ``str``)."""
    import json  # here: ``--help`` and the text output never load json

    print(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def one_line(message: str) -> str:
    """``message`` on one line: a driver's multi-line text (libpq's hint lines) joined with spaces."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def fail(command: str, message: str, status: int) -> int:
    """Print ``threaddispatch COMMAND: MESSAGE`` on stderr, on one line; returns ``status`` (the exit code)."""
    print(f"threaddispatch {command}: {one_line(message)}", file=sys.stderr)
    return status


# -- the store --------------------------------------------------------------------------------------


def store_url(args: argparse.Namespace) -> str:
    """The store URL the command was given (``--store``, else the environment), or ''."""
    return getattr(args, "store", None) or os.environ.get(STORE_ENV, "")


def open_store(args: argparse.Namespace, *, create: bool = False) -> Store:
    """The store of ``args``; a SQLite file must exist unless ``create``. Errors name the URL, never its password."""
    from threaddispatch import stores

    url = store_url(args)
    if not url:
        raise CommandError(f"no store: give --store URL or set {STORE_ENV} (e.g. sqlite:///jobs.db)")
    path = sqlite_path(url)  # None: not SQLite, or not a valid SQLite URL (open_store names it)
    if path is not None and not create and not os.path.exists(path):
        raise CommandError(f"no store file {path!r}; create it with: threaddispatch migrate --store {redact(url)}")
    if path is not None and not os.path.isdir(os.path.dirname(path) or "."):
        raise CommandError(f"no directory {os.path.dirname(path)!r} for the store file {path!r}")
    try:
        return stores.open_store(url)
    except StoreUnavailableError as error:
        raise StoreFailedError(f"cannot open store {redact(url)}: {scrub(str(error), url)}") from None
    except (ThreadDispatchError, OSError, _sqlite_error()) as error:
        raise CommandError(f"cannot open store {redact(url)}: {scrub(str(error), url)}") from None


@contextmanager
def open_engine(args: argparse.Namespace, *, create: bool = False) -> Iterator[JobEngine]:
    """An engine over the store of ``args`` (not started: the store is all management needs)."""
    from threaddispatch.jobs import JobEngine

    store = open_store(args, create=create)
    try:
        yield JobEngine(store)
    finally:
        store.close()


def _sqlite_error() -> type[Exception]:
    """``sqlite3.Error``, for an ``except`` clause: evaluated only as an exception is matched (no sqlite3 at start)."""
    import sqlite3

    return sqlite3.Error


def command(handler: Handler) -> Handler:
    """Turn library errors into one-line errors with exit code 2 (bad input and a failing store alike).

    A closed stdout (BrokenPipeError) goes through to ``main``, which ends quietly.
    """

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (CommandError, KeyboardInterrupt, BrokenPipeError):
            raise
        # Errors from the store may quote its URL: every message is scrubbed of its password.
        except (StoreFailedError, StoreError, ThreadDispatchError, ValueError) as error:
            raise CommandError(scrub(str(error), store_url(args))) from None
        except (OSError, _sqlite_error()) as error:
            raise CommandError(f"{type(error).__name__}: {scrub(str(error), store_url(args))}") from None

    return run
