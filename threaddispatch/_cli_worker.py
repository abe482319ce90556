"""The ``threaddispatch worker module:engine`` subcommand, and the one worker run the framework commands share.

``cli.py`` owns ``main()``; it wires this in with :func:`add_parsers` and then calls
``args.handler(args)``. :func:`main` runs the subcommand on its own (tests, or
``python -m threaddispatch._cli_worker module:engine``).

The worker's options are listed once, in :data:`OPTIONS`: :func:`add_options` puts them on an
argparse parser (this command, Django's ``threaddispatch_worker``), ``contrib._flask_cli`` on a
click command (``flask threaddispatch worker``); all three run :func:`run_worker`, so they print
the same lines. One process (:func:`serve`), or with ``--processes N`` a supervisor
(:mod:`threaddispatch._supervisor`) forking N worker processes that each run :func:`serve`.
It runs a little past 600 lines because the worker's options, their checks and their help
text are listed here once for the three commands that share them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from threaddispatch._cli_common import fail
from threaddispatch._validate import check_int, check_positive_int, check_seconds, check_text
from threaddispatch.errors import ConfigurationError, InvalidStateError, ThreadDispatchError

if TYPE_CHECKING:  # at run time imported where used: ``threaddispatch --help`` does not load the engine
    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores.base import JobState

__all__ = [
    "OPTIONS",
    "Option",
    "PidFile",
    "add_options",
    "add_parsers",
    "add_worker_parser",
    "load_engine",
    "main",
    "run_worker",
    "serve",
]


def load_engine(target: str) -> JobEngine:
    """Import ``module:attribute`` (dots allowed in both) and return the JobEngine it names.

    The attribute may also be a callable taking no argument that returns an engine. The
    current directory is put on ``sys.path`` first, as gunicorn does. Raises
    ConfigurationError naming ``target`` when it cannot be resolved.
    """
    from threaddispatch.jobs import JobEngine

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


# -- the options, listed once ---------------------------------------------------------------------------

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
#: The most worker processes ``--processes`` forks.
MAX_PROCESSES = 1024
_TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
_TICK = 0.2  # how often the waiting worker looks at its engine (stopped elsewhere? parent gone?)
_PAGE = 500  # jobs a --burst look reads at a time when some wait


def _whole(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, got {text!r}") from None


def _count(name: str, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _whole(name, text)
        return check_positive_int(name, value) if maximum is None else check_int(name, value, 1, maximum)

    return parse


def _seconds(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigurationError(f"{name} must be a number of seconds, got {text!r}") from None
        return check_seconds(name, value, allow_zero=False)

    return parse


def _file(name: str) -> Callable[[str], str]:
    """A file to write: its absolute path; its directory must exist (so a typo fails at once, not at start)."""

    def parse(text: str) -> str:
        path = os.path.abspath(check_text(name, text))
        if not os.path.isdir(os.path.dirname(path)):
            raise ConfigurationError(f"{name}: no directory {os.path.dirname(path)!r} for {text!r}")
        if os.path.isdir(path):
            raise ConfigurationError(f"{name} {text!r} is a directory")
        return path

    return parse


def _choice(name: str, choices: Sequence[str], fold: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = fold(text)
        if value not in choices:
            raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def _queues(text: str) -> list[str]:
    queues = [name.strip() for name in text.split(",") if name.strip()]
    if not queues:
        raise ConfigurationError(f"expected comma-separated queue names, got {text!r}")
    return [check_text("queue", queue) for queue in queues]


@dataclass(frozen=True)
class Option:
    """One worker option: its ``--flag``, help, and ``parse`` (text -> value; ConfigurationError for a bad
    value; None for a flag that takes no value). ``dest`` is the flag's name as argparse and click spell it."""

    flag: str
    help: str
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


#: The options of ``threaddispatch worker``, Django's ``threaddispatch_worker`` and ``flask threaddispatch worker``.
# fmt: off
OPTIONS: tuple[Option, ...] = (
    Option("--queues", "comma-separated queues to process (default: the engine's)", _queues, "A,B"),
    Option("--concurrency", "worker threads per process (default: the engine's)", _count("concurrency"), "N"),
    Option(
        "--processes",
        "fork N worker processes once the target is imported, and supervise them: one that dies is replaced "
        "(after a backoff while it keeps dying), SIGTERM/SIGINT are passed on and waited for; for CPU-bound "
        "handlers, which threads cannot run in parallel",
        _count("processes", MAX_PROCESSES),
        "N",
    ),
    Option(
        "--max-poll-interval",
        "the longest an idle worker waits between two looks at the store, in seconds (default: the engine's "
        "max_poll_interval; its poll_interval is lowered to it if larger)",
        _seconds("max_poll_interval"),
        "SECONDS",
    ),
    Option(
        "--burst",
        "exit (0 when clean) once no job of the served queues is due now or running; jobs delayed to later "
        "(delay, run_at, a retry's backoff) and paused queues do not keep the worker running",
        default=False,
    ),
    Option(
        "--max-jobs",
        "exit (0 when clean) once N jobs (attempts) ran here: the N-th start stops the claiming, and the jobs "
        "started finish first (with --concurrency above 1, jobs claimed with the N-th may start beside it); "
        "with --processes, per process, which is then replaced",
        _count("max_jobs"),
        "N",
    ),
    Option(
        "--pidfile",
        "write the worker's pid (the supervisor's with --processes) to PATH at start and remove it at stop; "
        "refuse to start while it names a live process",
        _file("pidfile"),
        "PATH",
    ),
    Option("--log-level", "DEBUG, INFO (default), WARNING or ERROR", _choice("log level", LEVELS, str.upper), "LEVEL",
           default="INFO"),
    Option("--log-format", "text (default), or json: one JSON object per line (for containers)",
           _choice("log format", FORMATS, str.lower), "FORMAT", default="text"),
    Option("--log-file", "append the log to PATH instead of writing it to stderr", _file("log file"), "PATH"),
)
# fmt: on


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigurationError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add every :data:`OPTIONS` entry to an argparse ``parser`` (the CLI's, Django's command's)."""
    for option in OPTIONS:
        if option.parse is None:
            parser.add_argument(option.flag, action="store_true", help=option.help)
        else:
            parser.add_argument(option.flag, type=_argparse_type(option.parse), default=option.default,
                                metavar=option.metavar, help=option.help)  # fmt: skip


@dataclass(frozen=True)
class _Run:
    """The options of one worker run, by :attr:`Option.dest`."""

    queues: list[str] | None
    concurrency: int | None
    processes: int | None
    max_poll_interval: float | None
    burst: bool
    max_jobs: int | None
    pidfile: str | None
    log_level: str
    log_format: str
    log_file: str | None

    @classmethod
    def of(cls, args: argparse.Namespace) -> _Run:
        """From parsed ``args``; an option missing there (a Namespace built by hand) takes its default."""
        values: dict[str, Any] = {option.dest: getattr(args, option.dest, option.default) for option in OPTIONS}
        return cls(**values)


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
            "pending, running ones get the engine's shutdown_timeout to finish. Exit status: 0 "
            "clean, 1 when jobs were handed back, 2 for a bad target or option."
        ),
    )
    parser.add_argument("target", help="module:attribute naming the JobEngine, e.g. myapp.tasks:engine")
    add_options(parser)
    parser.set_defaults(func=run_worker)
    return parser


def add_parsers(subparsers: Any) -> None:
    """The hook ``threaddispatch.cli`` calls: add ``worker``, run through ``args.handler`` like every subcommand."""
    add_worker_parser(subparsers).set_defaults(handler=run_worker)


# -- the pidfile -------------------------------------------------------------------------------------------


def _pid_in(path: str) -> int | None:
    """The pid written in ``path``, or None (no file, or not a pid)."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read(64).strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class PidFile:
    """A pidfile held by this process: :meth:`acquire` writes it, :meth:`release` removes it. Not thread-safe."""

    def __init__(self, path: str, pid: int) -> None:
        self.path = path
        self.pid = pid

    @classmethod
    def acquire(cls, path: str) -> PidFile:
        """Write this process's pid to ``path`` (created exclusively); a stale one (its process gone) is replaced.

        Raises ConfigurationError when ``path`` names a live process, or cannot be written.
        """
        log = logging.getLogger("threaddispatch.worker")
        for _attempt in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _pid_in(path)
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise ConfigurationError(
                        f"pidfile {path!r} names process {owner}, which is running (another worker?)"
                    ) from None
                log.info("replacing the stale pidfile %r (process %s is gone)", path, owner)
                with suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            except OSError as error:
                raise ConfigurationError(f"cannot write pidfile {path!r}: {error.strerror}") from None
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(f"{os.getpid()}\n")
            return cls(path, os.getpid())
        raise ConfigurationError(f"pidfile {path!r} keeps being written by another process")

    def release(self) -> None:
        """Remove the pidfile if it is still this process's (a forked child never removes it)."""
        if os.getpid() == self.pid and _pid_in(self.path) == self.pid:
            with suppress(FileNotFoundError):
                os.unlink(self.path)


# -- one worker process ------------------------------------------------------------------------------------


class _JobLimit:
    """``--max-jobs``: a ``job_started`` listener that sets ``reached`` at the ``limit``-th start here, and holds
    that start until the engine's stop has begun (then nothing more is claimed), so the job runs as the last one.

    Called on the engine's worker threads; ``_lock`` guards ``_started``. The hold is bounded by ``_HOLD``.
    """

    _HOLD = 10.0

    def __init__(self, engine: JobEngine, limit: int, reached: threading.Event) -> None:
        self._engine = engine
        self._limit = limit
        self.reached = reached
        self._lock = threading.Lock()
        self._started = 0

    @property
    def started(self) -> int:
        """Attempts started here so far: at least ``limit`` once reached, more when jobs claimed together with
        the ``limit``-th started beside it (up to the concurrency minus one)."""
        with self._lock:
            return self._started

    def __call__(self, *_args: object) -> None:
        with self._lock:
            self._started += 1
            if self._started != self._limit:
                return
        self.reached.set()
        deadline = time.monotonic() + self._HOLD
        # The stop has begun once the engine no longer runs; the thread that serves waits on ``reached``.
        while self._engine.running and time.monotonic() < deadline:
            time.sleep(0.001)


@contextmanager
def _stop_signals(requested: threading.Event, received: list[int]) -> Iterator[None]:
    """While open, SIGTERM/SIGINT set ``requested`` and are listed in ``received``; their handlers are restored
    after. Only on the main thread (the only one Python runs handlers on); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    log = logging.getLogger("threaddispatch.worker")

    def on_signal(signum: int, _frame: FrameType | None) -> None:  # runs on the main thread
        log.info("received signal %d: stopping", signum)
        received.append(signum)
        requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _any_due(engine: JobEngine, waiting: Sequence[tuple[str, JobState]]) -> bool:
    """Whether one of the jobs in these (queue, state) pairs is due now (pages of store reads)."""
    now = time.time()
    for queue, state in waiting:
        offset = 0
        while True:
            page = engine.list_jobs(state=state, queue=queue, limit=_PAGE, offset=offset)
            if any(job.run_at <= now for job in page):
                return True
            if len(page) < _PAGE:
                break
            offset += _PAGE
    return False


def _drained(engine: JobEngine, queues: Sequence[str]) -> bool:
    """Whether, at one look, ``engine`` has nothing in flight and the unpaused ``queues`` have no job due now
    nor running (in any process). Store reads: the paused queues, the counts, the waiting jobs if some wait."""
    from threaddispatch.stores.base import JobState

    before = engine.stats()
    if before["in_flight"]:
        return False
    paused = engine.paused_queues()
    live = [queue for queue in queues if queue not in paused]
    if live:
        counts = engine.store.counts_by_queue(live)
        if any(counts[queue].get(JobState.RUNNING, 0) for queue in live):
            return False
        waiting = [(queue, state) for queue in live for state in (JobState.PENDING, JobState.RETRYING)
                   if counts[queue].get(state, 0)]  # fmt: skip
        if waiting:
            if _any_due(engine, waiting):
                return False
            # A due job claimed during the scan is running now: one count read after it sees it.
            counts = engine.store.counts_by_queue(live)
            if any(counts[queue].get(JobState.RUNNING, 0) for queue in live):
                return False
    after = engine.stats()
    # A claim of ours that the store reads missed shows in the engine's own counters.
    return not after["in_flight"] and after["claimed"] == before["claimed"]


def _until_stop(engine: JobEngine, requested: threading.Event, *, burst: bool, parent: int | None) -> str:
    """Wait while the engine runs; returns why it should stop: requested, stopped, burst or orphaned."""
    log = logging.getLogger("threaddispatch.worker")
    served = list(engine.stats()["queues"])
    next_look = time.monotonic()
    while not requested.wait(_TICK):
        if not engine.running:
            return "stopped"
        if parent is not None and os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone: stopping", parent)
            return "orphaned"
        if burst and time.monotonic() >= next_look:
            try:
                if _drained(engine, served):
                    log.info("burst: no job due nor running on %s: stopping", served)
                    return "burst"
            except ThreadDispatchError:
                log.warning("burst: could not read the store; looking again", exc_info=True)
            next_look = time.monotonic() + engine.config.poll_interval
    return "requested"


def serve(
    engine: JobEngine,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    burst: bool = False,
    max_jobs: int | None = None,
    parent: int | None = None,
) -> tuple[bool, str]:
    """Run ``engine``'s workers in this process until a stop; returns (clean, why it stopped).

    It stops at SIGTERM/SIGINT (handled while it runs, when called on the main thread), when
    the engine is stopped from elsewhere, with ``burst`` once no job of the served (unpaused)
    queues is due now or running, once ``max_jobs`` attempts ran here, or once this
    process's parent is no longer ``parent`` (its supervisor died). ``why``: "signal",
    "stopped", "burst", "max-jobs" or "orphaned"; ``clean``: what ``engine.stop()`` returned.
    Blocks until then and for the stop (at most the engine's shutdown_timeout plus a store call).
    """
    requested = threading.Event()
    received: list[int] = []
    limit = None if max_jobs is None else _JobLimit(engine, max_jobs, requested)
    with _stop_signals(requested, received):
        # The listener stays on through the stop: jobs claimed with the limit-th may start beside it, and count.
        off = None if limit is None else engine.events.on("job_started", limit)
        try:
            engine.start(queues=queues, concurrency=concurrency)
            why = _until_stop(engine, requested, burst=burst, parent=parent)
            clean = engine.stop()
        finally:
            if off is not None:
                off()
    if why == "requested":
        why = "signal" if received or limit is None else "max-jobs"
    if why == "max-jobs":
        assert limit is not None
        logging.getLogger("threaddispatch.worker").info("ran %d jobs (--max-jobs %d): stopped", limit.started, max_jobs)
    return clean, why


def _tune(engine: JobEngine, max_poll_interval: float | None) -> None:
    """Apply ``--max-poll-interval`` to the engine before it starts (its poll_interval lowered to it if larger)."""
    if max_poll_interval is None:
        return
    engine.configure(
        max_poll_interval=max_poll_interval, poll_interval=min(engine.config.poll_interval, max_poll_interval)
    )


def _supervise(engine: JobEngine, run: _Run) -> int:
    """``--processes N``: fork the worker processes (each runs :func:`serve`) and supervise them."""
    from threaddispatch._supervisor import RECYCLE, Supervisor

    supervisor_pid = os.getpid()
    assert run.processes is not None

    def work(_index: int) -> int:
        clean, why = serve(engine, queues=run.queues, concurrency=run.concurrency, burst=run.burst,
                           max_jobs=run.max_jobs, parent=supervisor_pid)  # fmt: skip
        if not clean:
            return 1
        return RECYCLE if why == "max-jobs" else 0

    supervisor = Supervisor(run.processes, work, stop_timeout=engine.config.shutdown_timeout, burst=run.burst)
    return supervisor.run()


# -- the run every front end shares ------------------------------------------------------------------------


def _log_handler(run: _Run) -> logging.Handler | None:
    """The worker's log handler: to ``--log-file``, else to stderr unless the root logger already has one
    (the application's logging configuration stands, as with ``logging.basicConfig``). OSError for the file."""
    handler: logging.Handler
    if run.log_file is not None:
        from logging.handlers import WatchedFileHandler  # not ``import logging.handlers``: a local ``logging``

        handler = WatchedFileHandler(run.log_file, encoding="utf-8")
    elif not logging.getLogger().handlers:
        handler = logging.StreamHandler()
    else:
        return None
    if run.log_format == "json":
        from threaddispatch._log_json import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    return handler


@contextmanager
def _logging(handler: logging.Handler | None, level: str) -> Iterator[None]:
    """``handler`` on the root logger and its level at ``level`` while open; both undone after."""
    root = logging.getLogger()
    previous = root.level
    if handler is not None:
        root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)
        if handler is not None:
            root.removeHandler(handler)
            handler.close()


def run_worker(args: argparse.Namespace, *, echo: Callable[[str], object] | None = None) -> int:
    """Run the worker described by parsed ``args`` (:data:`OPTIONS`, ``target``); blocks until it stops.

    Returns the exit status: 0 when it stopped cleanly (at a signal, or with ``--burst`` /
    ``--max-jobs`` when done), 1 when some jobs were handed back (or a worker process did not stop
    cleanly), 2 for a bad target or option (one line on stderr). ``echo`` also gets a start and a
    stop line (Django's command writes them to its stdout); ``args.label``, when set, names the
    engine there instead of the target.
    """
    run = _Run.of(args)
    try:
        handler = _log_handler(run)
    except OSError as error:
        return fail("worker", f"cannot open the log file {run.log_file!r}: {error.strerror}", 2)
    with _logging(handler, run.log_level):
        try:
            pidfile = None if run.pidfile is None else PidFile.acquire(run.pidfile)
        except ConfigurationError as error:
            return fail("worker", str(error), 2)
        try:
            return _run(args.target, run, getattr(args, "label", None) or args.target, echo)
        finally:
            if pidfile is not None:
                pidfile.release()


def _run(target: str, run: _Run, label: str, echo: Callable[[str], object] | None) -> int:
    try:
        engine = load_engine(target)
        _tune(engine, run.max_poll_interval)
    except (ConfigurationError, InvalidStateError) as error:  # InvalidStateError: the module started its engine
        return fail("worker", str(error), 2)
    log = logging.getLogger("threaddispatch.worker")
    queues = run.queues or list(engine.config.queues)
    concurrency = run.concurrency or engine.config.concurrency
    processes = "" if run.processes is None else f", processes={run.processes}"
    log.info("worker starting: %s on %s, queues=%s, concurrency=%s%s",
             target, dict(engine.store.describe()), queues, concurrency, processes)  # fmt: skip
    if echo is not None:
        echo(f"threaddispatch worker: {label}, queues={queues}, concurrency={concurrency}{processes}")
    try:
        if run.processes is None:
            clean, _why = serve(engine, queues=run.queues, concurrency=run.concurrency, burst=run.burst,
                                max_jobs=run.max_jobs)  # fmt: skip
            status = 0 if clean else 1
        else:
            status = _supervise(engine, run)
    except ThreadDispatchError as error:  # the store is down, the engine cannot start, --processes off main
        return fail("worker", str(error), 2)
    log.info("worker stopped (%s)", "clean" if status == 0 else "some jobs were handed back")
    if echo is not None:
        echo("threaddispatch worker: stopped cleanly" if status == 0 else
             "threaddispatch worker: stopped; some jobs were handed back")  # fmt: skip
    return status


class _Parser(argparse.ArgumentParser):
    """Errors on one line, exit status 2 (as ``threaddispatch``'s own parser)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` as ``worker`` arguments (without the word ``worker``) and run it."""
    parser = _Parser(prog="threaddispatch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_worker_parser(subparsers)
    args = parser.parse_args(["worker", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
