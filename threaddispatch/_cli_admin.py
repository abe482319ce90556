"""The management subcommands of the ``threaddispatch`` command line.

jobs, dlq, crons, queues, workers, locks, enqueue, stats, migrate and serve. ``threaddispatch.cli``
calls :func:`add_parsers`. Every subcommand takes ``--store URL`` (default: the
``THREADDISPATCH_STORE`` environment variable) and ``--json`` (machine output). Every
error (a bad URL, an unknown id, a bad state name, a missing token, a store that is
down) is one line with exit code 2; never a traceback. Cancel and retry are the
engine's (:meth:`JobEngine.cancel` / :meth:`JobEngine.retry`), the rule the admin API
follows too. ``dlq replay ID...`` replays every id it can: each one refused (a held
unique key, a failed dependency, a letter replayed meanwhile) is a line on stderr naming
it and why (``--json`` lists them under ``refused``), and the exit code is 1 when any
was; an unknown id replays nothing (exit 2). ``dlq replay --all`` replays the others past
a refused letter, as :meth:`JobEngine.replay_all` does, and reports the refused ones the
same way (a line each on stderr, ``refused`` in ``--json``, exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from threaddispatch._admin_locks import lock_holds
from threaddispatch._admin_stats import cluster_queues, cluster_stats
from threaddispatch._cli_common import (
    STORE_ENV,
    CommandError,
    command,
    count,
    fail,
    open_engine,
    open_store,
    print_json,
)
from threaddispatch.errors import InvalidStateError, JobNotFoundError
from threaddispatch.stores.base import JobState

if TYPE_CHECKING:
    from threaddispatch.stores.base import CronEntry, DeadLetter, JobRecord

__all__ = ["add_parsers"]

TOKEN_ENV = "THREADDISPATCH_TOKEN"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")

# -- argument types ---------------------------------------------------------------------------------


def _state(text: str) -> JobState:
    try:
        return JobState(text.strip().lower())
    except ValueError:
        known = ", ".join(s.value for s in JobState)
        raise argparse.ArgumentTypeError(f"unknown job state {text!r}; known: {known}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _name(text: str) -> str:
    if not text or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty name without surrounding spaces, got {text!r}")
    return text


def _json_value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"the payload is not JSON ({error}): {text[:60]!r}") from None


def _priority(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _base_path(text: str) -> str:
    if text and (not text.startswith("/") or text == "/"):
        raise argparse.ArgumentTypeError(f"expected '' or a path starting with '/', got {text!r}")
    return text.rstrip("/")


# -- output -------------------------------------------------------------------------------------------


def _when(epoch: float | None) -> str:
    """``epoch`` as UTC time; one no ``datetime`` holds (a job stored due at 1e15) as its number. Never raises."""
    if epoch is None or not math.isfinite(epoch):
        return "-"
    try:
        return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # past year 9999 or before year 1, or the platform's time_t
        return f"{'far future' if epoch > 0 else 'far past'} (epoch {epoch:.6g})"


def _last_line(text: str | None, width: int = 60) -> str:
    lines = (text or "").strip().splitlines()
    line = lines[-1] if lines else "-"
    return line if len(line) <= width else line[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells)
    return "\n".join(line.rstrip() for line in lines)


def _show_fields(data: dict[str, Any]) -> None:
    """One ``key: value`` line per field: times as UTC, payload and result as JSON, the error last, in full."""
    for key in ("created_at", "updated_at", "run_at", "started_at", "finished_at", "heartbeat_at", "failed_at"):
        if key in data:
            data[key] = _when(data[key])
    error = data.pop("error", None)
    for key, value in data.items():
        shown = json.dumps(value, ensure_ascii=False) if key in ("payload", "result") else value
        print(f"{key + ':':<14}{'-' if value is None else shown}")
    if error:
        print(f"{'error:':<14}\n{error.rstrip()}")


def _show_job(job: JobRecord) -> None:
    _show_fields(job.to_dict())


_JOB_COLUMNS = ["ID", "NAME", "QUEUE", "STATE", "ATTEMPTS", "CREATED"]
_CRON_COLUMNS = ["NAME", "EXPRESSION", "JOB", "QUEUE", "LAST TICK", "STATE"]


def _job_rows(jobs: Sequence[JobRecord]) -> list[list[object]]:
    return [[j.id, j.name, j.queue, j.state.value, j.attempts, _when(j.created_at)] for j in jobs]


def _output(args: argparse.Namespace, data: object, human: str | Callable[[], None]) -> None:
    """``data`` as JSON with ``--json``, else ``human``: a line, or a function printing the human form."""
    if args.json:
        print_json(data)
    elif callable(human):
        human()
    else:
        print(human)


def _listing(
    args: argparse.Namespace, data: object, headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str
) -> None:
    """``data`` as JSON with ``--json``, else a table of ``rows`` (``empty`` when there is none)."""
    if args.json:
        print_json(data)
    else:
        print(_table(headers, rows) if rows else empty)


def _state_columns() -> list[str]:
    return [state.value.upper() for state in JobState]


def _state_cells(counts: dict[str, int]) -> list[object]:
    return [counts.get(state.value, 0) for state in JobState]


def _cron_rows(entries: Sequence[CronEntry]) -> list[list[object]]:
    return [[e.name, e.expression, e.job_name, e.queue, _when(e.last_tick) if e.enabled else "-",
             "enabled" if e.enabled else "disabled"] for e in entries]  # fmt: skip


def _queue_rows(queues: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [
        [q["name"], "paused" if q["paused"] else "active", q["workers"], *_state_cells(q["counts"])] for q in queues
    ]


_WORKER_COLUMNS = ["ID", "HOST", "PID", "QUEUES", "RUNNING", "STARTED", "HEARTBEAT"]


def _worker_rows(workers: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [[w["id"], w["host"], w["pid"], ",".join(w["queues"]), f"{w['running']}/{w['concurrency']}",
             _when(w["started_at"]), _when(w["heartbeat_at"])] for w in workers]  # fmt: skip


_HOLD_COLUMNS = ["LOCK", "HOLDER", "JOB", "NAME", "STATE", "ATTEMPT", "WORKER", "SINCE", "HEARTBEAT"]


def _hold_rows(holds: Sequence[dict[str, Any]]) -> list[list[object]]:
    return [[h["lock"], h["held_by"], h["job_id"], h["job_name"] or "-", h["job_state"] or "purged", h["attempts"],
             h["worker_id"], _when(h["held_since"]), _when(h["heartbeat_at"])] for h in holds]  # fmt: skip


def _letter_rows(letters: Sequence[DeadLetter]) -> list[list[object]]:
    return [[d.id, d.job_id, d.name, d.queue, d.attempts, _when(d.failed_at), _last_line(d.error)] for d in letters]


# -- jobs ---------------------------------------------------------------------------------------------


@command
def _jobs_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        jobs = engine.list_jobs(state=args.state, queue=args.queue, limit=args.limit, offset=args.offset)
        _listing(args, [job.to_dict() for job in jobs], _JOB_COLUMNS, _job_rows(jobs), "no jobs")
    return 0


@command
def _jobs_show(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        job = engine.get_job(args.id)
        _output(args, job.to_dict(), lambda: _show_job(job))
    return 0


@command
def _jobs_retry(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        engine.retry(args.id)
        job = engine.get_job(args.id)
        _output(args, job.to_dict(), f"job {job.id} ({job.name}) is {job.state.value} again")
    return 0


@command
def _jobs_cancel(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        engine.cancel(args.id)
        job = engine.get_job(args.id)
        _output(args, job.to_dict(), f"job {job.id} ({job.name}) cancelled")
    return 0


@command
def _jobs_counts(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        counts = engine.counts(queue=args.queue)
        _output(args, counts, _table(["STATE", "JOBS"], [[state, count] for state, count in counts.items()]))
    return 0


# -- dead letters -------------------------------------------------------------------------------------


@command
def _dlq_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        letters = engine.dlq(limit=args.limit, offset=args.offset, queue=args.queue)
        headers = ["ID", "JOB", "NAME", "QUEUE", "ATTEMPTS", "FAILED", "ERROR"]
        _listing(args, [letter.to_dict() for letter in letters], headers, _letter_rows(letters), "no dead letters")
    return 0


@command
def _dlq_replay(args: argparse.Namespace) -> int:
    if args.all == bool(args.ids):
        raise CommandError("give dead letter ids, or --all (not both)")
    if args.queue is not None and not args.all:
        raise CommandError("--queue goes with --all")
    refused: list[dict[str, str]] = []
    with open_engine(args) as engine:
        if args.all:
            replayed = engine.replay_all(args.queue)  # a refused letter is skipped, kept and named
            job_ids = list(replayed)
            refused = [{"dead_letter_id": i, "error": error} for i, error in replayed.refused.items()]
        else:
            # An unknown id is a typo: nothing is replayed. A refusal is the letter's state: the others go on.
            missing = [i for i in args.ids if engine.store.get_dead_letter(i) is None]
            if missing:
                raise CommandError(f"no dead letter with id {missing[0]!r}")
            job_ids = []
            for letter_id in args.ids:
                try:
                    job_ids.append(engine.replay(letter_id))
                except (InvalidStateError, JobNotFoundError) as error:  # not found: replayed or purged meanwhile
                    refused.append({"dead_letter_id": letter_id, "error": str(error)})
        if args.json:
            print_json({"replayed": len(job_ids), "job_ids": job_ids, "refused": refused})
        else:
            print(f"replayed {len(job_ids)} dead letter(s)")
            for job_id in job_ids:
                print(f"  new job {job_id}")
    for entry in refused:
        fail(args.command, f"dead letter {entry['dead_letter_id']} not replayed: {entry['error']}", 1)
    return 1 if refused else 0


@command
def _dlq_purge(args: argparse.Namespace) -> int:
    if args.all == (args.older_than is not None):
        raise CommandError("give --older-than SECONDS, or --all to delete every dead letter")
    with open_engine(args) as engine:
        purged = engine.purge_dlq(args.older_than)
        _output(args, {"purged": purged}, f"purged {purged} dead letter(s)")
    return 0


@command
def _dlq_show(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        letter = engine.get_dead_letter(args.id)
        _output(args, letter.to_dict(), lambda: _show_fields(letter.to_dict()))
    return 0


# -- crons and queues ---------------------------------------------------------------------------------


@command
def _crons_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        entries = engine.crons()
        _listing(args, [entry.to_dict() for entry in entries], _CRON_COLUMNS, _cron_rows(entries), "no cron entries")
    return 0


@command
def _crons_switch(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        entry = engine.enable_cron(args.name) if args.enable else engine.disable_cron(args.name)
        _output(args, entry.to_dict(), f"cron entry {entry.name} {'enabled' if entry.enabled else 'disabled'}")
    return 0


@command
def _crons_remove(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        if not engine.remove_cron(args.name):
            raise CommandError(f"no cron entry named {args.name!r}")
        _output(
            args,
            {"removed": args.name},
            f"cron entry {args.name} removed (a process declaring it in code stores it again at its next start)",
        )
    return 0


@command
def _queues_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        queues = cluster_queues(engine, engine.workers())
        _listing(args, queues, ["QUEUE", "STATE", "WORKERS", *_state_columns()], _queue_rows(queues), "no queues")
    return 0


@command
def _queues_switch(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        if args.pause:
            engine.pause_queue(args.queue)
        else:
            engine.resume_queue(args.queue)
        _output(
            args,
            {"queue": args.queue, "paused": args.pause},
            f"queue {args.queue} {'paused' if args.pause else 'resumed'}",
        )
    return 0


# -- enqueue and stats --------------------------------------------------------------------------------


def _unused_handler(ctx: object, payload: object) -> None:
    raise AssertionError("the CLI's engine never runs jobs")  # pragma: no cover - it is never started


@command
def _enqueue(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        # The CLI has no handlers: the job is stored with these options for the workers that have one.
        engine.register(args.name, _unused_handler, max_retries=args.max_retries, timeout=args.timeout)
        job_id = engine.enqueue(args.name, args.payload, queue=args.queue, priority=args.priority, delay=args.delay)
        _output(args, engine.get_job(job_id).to_dict(), job_id)
    return 0


def _print_stats(data: dict[str, Any]) -> None:
    print(_table(["STATE", "JOBS"], [*([state, n] for state, n in data["counts"].items()), ["total", data["total"]]]))
    rows = _queue_rows(data["queues"])
    if any(data["other_queues"].values()):
        rows.append(["(other queues)", "-", 0, *_state_cells(data["other_queues"])])
    print()
    print(_table(["QUEUE", "STATE", "WORKERS", *_state_columns()], rows) if rows else "no queues")
    print()
    print(f"dead letters: {data['dead_letters']}")
    print(f"paused queues: {', '.join(data['paused_queues']) or '-'}")
    workers = data["workers"]
    print(f"live workers: {len(workers)}")
    if workers:
        print(_table(_WORKER_COLUMNS, _worker_rows(workers)))


@command
def _stats(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        data = cluster_stats(engine)
    _output(args, data, lambda: _print_stats(data))
    return 0


# -- workers, migrate and serve -----------------------------------------------------------------------


@command
def _workers(args: argparse.Namespace) -> int:
    from threaddispatch._job_workers import list_workers

    with open_engine(args) as engine:
        if args.stale_after is None:
            found = engine.workers()
        else:
            found = list_workers(engine.store, stale_after=args.stale_after)
        workers = [worker.to_dict() for worker in found]
        _listing(args, workers, _WORKER_COLUMNS, _worker_rows(workers), "no workers")
    return 0


@command
def _locks_list(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        holds, total = lock_holds(engine, lock=args.lock, limit=args.limit)
    if args.json:
        print_json({"holds": holds, "total": total})
    elif not holds:
        print("no lock holds")
    else:
        print(_table(_HOLD_COLUMNS, _hold_rows(holds)))
        if total > len(holds):
            print(f"({len(holds)} of {total} shown; raise --limit for more)")
    return 0


@command
def _migrate(args: argparse.Namespace) -> int:
    store = open_store(args, create=True)
    try:
        version = store.migrate()
        described = dict(store.describe())
    finally:
        store.close()
    _output(
        args, {"version": version, "store": described}, f"{described.get('kind', 'store')}: schema at version {version}"
    )
    return 0


@command
def _serve(args: argparse.Namespace) -> int:
    from threaddispatch.admin import make_server, make_wsgi_app

    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not args.allow_unauthenticated:
        raise CommandError(f"set {TOKEN_ENV} to the bearer token clients must send (or --allow-unauthenticated)")
    if token is None and args.host not in _LOOPBACK:
        raise CommandError(f"refusing to serve without a token on {args.host}; set {TOKEN_ENV}")
    with open_engine(args) as engine:
        app = make_wsgi_app(engine, args.base_path, token, allow_unauthenticated=args.allow_unauthenticated)
        try:
            server = make_server(app, args.host, args.port)
        except OSError as error:
            raise CommandError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
        stop = threading.Event()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="threaddispatch-admin-server", daemon=True)  # fmt: skip
        thread.start()
        try:
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"threaddispatch serve: admin API on http://{host}:{server.server_port}{args.base_path}/",
                  file=sys.stderr, flush=True)  # fmt: skip
            stop.wait()
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        print("threaddispatch serve: stopped", file=sys.stderr, flush=True)
    return 0


# -- parsers ------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="URL", default=None,
                        help=f"store URL: sqlite:///path.db, postgresql://... (default: ${STORE_ENV})")  # fmt: skip
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    return common


def add_parsers(subparsers: Any) -> None:
    """Add the ``jobs``, ``dlq``, ``migrate`` and ``serve`` subcommands to the CLI's subparsers."""
    common = _common()
    paging = argparse.ArgumentParser(add_help=False)
    paging.add_argument("--queue", type=_name, default=None, help="only this queue")
    paging.add_argument("--limit", type=count(1, 100_000), default=50, help="at most this many (default 50)")
    paging.add_argument("--offset", type=count(0, 10**12), default=0, help="skip this many first (default 0)")

    jobs = subparsers.add_parser("jobs", help="list, inspect, retry and cancel jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    jobs_sub.required = True
    p = jobs_sub.add_parser("list", parents=[common, paging], help="jobs, newest first")
    p.add_argument("--state", type=_state, default=None,
                   help=f"only jobs in this state: {', '.join(state.value for state in JobState)}")  # fmt: skip
    p.set_defaults(handler=_jobs_list)
    for action, handler, text in (
        ("show", _jobs_show, "one job in full"),
        ("retry", _jobs_retry, "run a failed or cancelled job again"),
        ("cancel", _jobs_cancel, "cancel a pending, retrying or running job"),
    ):
        p = jobs_sub.add_parser(action, parents=[common], help=text)
        p.add_argument("id", help="the job id")
        p.set_defaults(handler=handler)
    p = jobs_sub.add_parser("counts", parents=[common], help="jobs per state")
    p.add_argument("--queue", type=_name, default=None, help="only this queue")
    p.set_defaults(handler=_jobs_counts)

    dlq = subparsers.add_parser("dlq", help="list, replay and purge dead letters")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", metavar="ACTION")
    dlq_sub.required = True
    p = dlq_sub.add_parser("list", parents=[common, paging], help="dead letters, newest first")
    p.set_defaults(handler=_dlq_list)
    p = dlq_sub.add_parser("replay", parents=[common], help="enqueue dead letters again as new jobs")
    p.add_argument("ids", nargs="*", metavar="ID", help="dead letter ids")
    p.add_argument("--all", action="store_true", help="replay every dead letter")
    p.add_argument("--queue", type=_name, default=None, help="with --all: only this queue")
    p.set_defaults(handler=_dlq_replay)
    p = dlq_sub.add_parser("purge", parents=[common], help="delete dead letters")
    p.add_argument("--older-than", type=_seconds, default=None, metavar="SECONDS", help="only those older than this")
    p.add_argument("--all", action="store_true", help="delete every dead letter")
    p.set_defaults(handler=_dlq_purge)
    p = dlq_sub.add_parser("show", parents=[common], help="one dead letter in full")
    p.add_argument("id", help="the dead letter id")
    p.set_defaults(handler=_dlq_show)

    _add_crons_and_queues(subparsers, common)
    _add_enqueue_and_stats(subparsers, common)

    p = subparsers.add_parser("workers", parents=[common], help="the live workers of the store")
    p.add_argument("--stale-after", type=_seconds, default=None, metavar="SECONDS",
                   help="listed while the last heartbeat is this recent (default 30)")  # fmt: skip
    p.set_defaults(handler=_workers)

    locks = subparsers.add_parser("locks", help="who holds each serial lock: running jobs, outlived handlers")
    locks_sub = locks.add_subparsers(dest="locks_command", metavar="ACTION")
    locks_sub.required = True
    p = locks_sub.add_parser("list", parents=[common], help="the lock holders, oldest heartbeat first",
                             description="Who holds each serial lock: a running job with a lock (held by "
                             "'running', its claim), or a handler that outlived its claim (held by 'outlived': "
                             "a timeout, a cancel, a hand-back at stop), whose lock no job is claimed for until "
                             "the handler returns.")  # fmt: skip
    p.add_argument("--lock", default=None, metavar="KEY", help="only the holds of this lock key")
    p.add_argument("--limit", type=count(1, 100_000), default=50, help="at most this many (default 50)")
    p.set_defaults(handler=_locks_list)

    p = subparsers.add_parser("migrate", parents=[common], help="create or upgrade the store's schema")
    p.set_defaults(handler=_migrate)

    p = subparsers.add_parser("serve", parents=[common],
                              help=f"serve the admin API over HTTP (token from ${TOKEN_ENV})")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=count(0, 65535), default=8080, help="port (default 8080; 0: any free port)")
    p.add_argument("--base-path", type=_base_path, default="/api/dispatch", help="URL prefix (default /api/dispatch)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve without a token (only on a loopback host)")  # fmt: skip
    p.set_defaults(handler=_serve)


def _add_crons_and_queues(subparsers: Any, common: argparse.ArgumentParser) -> None:
    crons = subparsers.add_parser("crons", help="list, enable, disable and remove cron entries")
    crons_sub = crons.add_subparsers(dest="crons_command", metavar="ACTION")
    crons_sub.required = True
    p = crons_sub.add_parser("list", parents=[common], help="every cron entry in the store")
    p.set_defaults(handler=_crons_list)
    for action, text in (("enable", "let a cron entry fire again"), ("disable", "stop a cron entry firing")):
        p = crons_sub.add_parser(action, parents=[common], help=text)
        p.add_argument("name", help="the cron entry's name")
        p.set_defaults(handler=_crons_switch, enable=action == "enable")
    p = crons_sub.add_parser("remove", parents=[common], help="delete a cron entry from the store")
    p.add_argument("name", help="the cron entry's name")
    p.set_defaults(handler=_crons_remove)

    queues = subparsers.add_parser("queues", help="list, pause and resume queues")
    queues_sub = queues.add_subparsers(dest="queues_command", metavar="ACTION")
    queues_sub.required = True
    p = queues_sub.add_parser("list", parents=[common], help="queues with job counts, pause state and live workers")
    p.set_defaults(handler=_queues_list)
    for action, text in (("pause", "stop every worker claiming from a queue"), ("resume", "claim from it again")):
        p = queues_sub.add_parser(action, parents=[common], help=text)
        p.add_argument("queue", type=_name, help="the queue's name")
        p.set_defaults(handler=_queues_switch, pause=action == "pause")


def _add_enqueue_and_stats(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("enqueue", parents=[common], help="store a new job; prints its id",
                              description="Store a job NAME with a JSON payload for the workers that "
                              "registered NAME; prints the new job's id.")  # fmt: skip
    p.add_argument("name", type=_name, help="the job's name, as the workers registered it")
    p.add_argument("payload", type=_json_value, metavar="JSON", help='the payload as JSON, e.g. \'{"to": "a@b.c"}\'')
    p.add_argument("--queue", type=_name, default="default", help="the queue (default: default)")
    p.add_argument("--delay", type=_seconds, default=None, metavar="SECONDS", help="run it this much later")
    p.add_argument("--priority", type=_priority, default=0, help="higher runs first (default 0)")
    p.add_argument("--max-retries", type=count(0, 1000), default=3, help="attempts after the first (default 3)")
    p.add_argument("--timeout", type=_seconds, default=300.0, metavar="SECONDS",
                   help="the handler's time budget (default 300)")  # fmt: skip
    p.set_defaults(handler=_enqueue)

    text = "the cluster from the store: jobs by state and queue, dead letters, workers"
    p = subparsers.add_parser("stats", parents=[common], help=text)
    p.set_defaults(handler=_stats)
