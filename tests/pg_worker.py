"""A worker process for the PostgreSQL tests: ``python tests/pg_worker.py DSN SCHEMA OUTDIR MODE [options]``.

Runs a JobEngine on a PostgresStore until SIGTERM, then stops it cleanly (exit 0). It
writes ``OUTDIR/ready-<pid>`` once started, and one line per job run to
``OUTDIR/runs-<pid>`` (appends of one short line: atomic, so nothing interleaves).

Modes:
- ``run``: job ``record`` writes ``run <n>`` and returns.
- ``hang``: job ``record`` writes ``start <n>`` and then blocks (the test SIGKILLs it).
- ``cron``: registers job ``tick`` and the cron entry ``shared`` (``@every 300ms``); each
  run writes ``tick <unique_key>``.

``--wait-listener`` writes the ready file only once the process's LISTEN session is up (its
"look now" wake-up arrived), so a NOTIFY sent after it reaches this process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores.postgres import PostgresStore


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("schema")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("mode", choices=("run", "hang", "cron"))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--stale", type=float, default=10.0)
    parser.add_argument("--work", type=float, default=0.0, help="seconds each job takes")
    parser.add_argument("--poll", type=float, default=0.05, help="poll_interval")
    parser.add_argument("--max-poll", type=float, default=0.5, help="max_poll_interval")
    parser.add_argument("--queue", action="append", help="a queue to serve (repeatable; default: 'default')")
    parser.add_argument("--wait-listener", action="store_true", help="write ready once the LISTEN session is up")
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    runs = os.open(args.outdir / f"runs-{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(runs, (line + "\n").encode())

    store = PostgresStore(args.dsn, schema=args.schema)
    engine = JobEngine(
        store,
        concurrency=args.concurrency,
        poll_interval=args.poll,
        max_poll_interval=args.max_poll,
        heartbeat_interval=0.2,
        stale_job_threshold=args.stale,
        shutdown_timeout=5.0,
    )

    @engine.job("record", max_retries=3)
    def record(ctx: JobContext, payload: dict[str, int]) -> int:
        if args.mode == "hang":
            note(f"start {payload['n']}")
            ctx.wait(600)
            return payload["n"]
        if args.work:
            ctx.wait(args.work)
        note(f"run {payload['n']}")
        return payload["n"]

    @engine.job("tick", max_retries=0)
    def tick(ctx: JobContext, payload: object) -> None:
        note(f"tick {ctx.job.unique_key}")

    if args.mode == "cron":
        engine.cron("@every 300ms", "tick", {"k": 1}, name="shared")
    listening = threading.Event()
    unsubscribe = store.subscribe_wakeups(lambda queue, run_at: listening.set() if queue is None else None)
    engine.start(queues=args.queue)
    if args.wait_listener and not listening.wait(30):
        return 4
    unsubscribe()  # the engine's own subscription keeps the LISTEN session
    (args.outdir / f"ready-{os.getpid()}").write_text("ready")
    stop.wait()
    clean = engine.stop(10.0)
    store.close()
    return 0 if clean else 3


if __name__ == "__main__":
    sys.exit(main())
