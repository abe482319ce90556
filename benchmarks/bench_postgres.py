"""JobEngine on PostgresStore: jobs/s end to end with 1, 2 and 4 worker processes on one PostgreSQL.

Starts a throwaway PostgreSQL server in a temp dir (initdb + pg_ctl, as tests/pg_server.py
does; as a non-root user when run as root), or uses ``--dsn``. For each number of worker
processes P, in a fresh schema:

1. P worker processes start (each a JobEngine, ``--concurrency`` threads) and wait;
2. the clock starts; N no-op jobs (default 10,000) are enqueued with ``enqueue_many``
   (one COPY) and LISTEN/NOTIFY wakes the workers;
3. the clock stops when no job is pending or running any more (polled every 5 ms with
   a cheap EXISTS on a separate connection); all N must then be completed.

Printed per P: enqueue jobs/s (step 2 alone) and end-to-end jobs/s (steps 2-3), best of
``--repeat``. The server runs with its defaults except ``fsync`` (``--fsync off`` by
default: this measures the engine and the SQL, not the disk; pass ``--fsync on`` for a
durable server) and ``max_connections``. Run ``python benchmarks/bench_postgres.py --help``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from threaddispatch.jobs import JobEngine  # noqa: E402
from threaddispatch.stores import JobState  # noqa: E402
from threaddispatch.stores.postgres import PostgresStore  # noqa: E402


def worker(dsn: str, schema: str, ready: Path, concurrency: int) -> int:
    """A worker process: run no-op jobs until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = PostgresStore(dsn, schema=schema, max_size=4)
    engine = JobEngine(store, concurrency=concurrency, poll_interval=0.05, max_poll_interval=0.2,
                       heartbeat_interval=5.0, stale_job_threshold=60.0)  # fmt: skip
    engine.register("noop", lambda ctx, payload: None, max_retries=0, timeout=None)
    engine.start()
    ready.write_text("ready")
    stop.wait()
    engine.stop(10)
    store.close()
    return 0


def run_once(dsn: str, jobs: int, processes: int, concurrency: int, workdir: Path) -> tuple[float, float]:
    """One measurement: (enqueue jobs/s, end-to-end jobs/s)."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(dsn, schema=schema)
    store.migrate()
    producer = JobEngine(store)
    producer.register("noop", lambda ctx, payload: None, max_retries=0, timeout=None)
    # The clock's own poll must not load the server: EXISTS stops at the first unfinished job.
    watch = psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}")
    unfinished = "SELECT EXISTS (SELECT 1 FROM dispatch_jobs WHERE state IN ('pending', 'retrying', 'running'))"
    procs = []
    for index in range(processes):
        ready = workdir / f"ready-{schema}-{index}"
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", dsn, schema, str(ready),
                                        str(concurrency)]), ready))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not all(ready.exists() for _, ready in procs):
            if time.monotonic() > deadline or any(proc.poll() is not None for proc, _ in procs):
                raise RuntimeError("workers did not start")
            time.sleep(0.02)
        time.sleep(0.3)  # let every listener connect
        start = time.perf_counter()
        producer.enqueue_many("noop", [None] * jobs)
        enqueued = time.perf_counter()
        while (row := watch.execute(unfinished).fetchone()) and row[0]:
            if time.perf_counter() - start > 300:
                raise RuntimeError("jobs did not complete within 300 s")
            time.sleep(0.005)
        done = time.perf_counter()
        completed = store.counts()[JobState.COMPLETED]
        if completed != jobs:
            raise RuntimeError(f"{completed} of {jobs} jobs completed")
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.close()
        watch.execute(f'DROP SCHEMA "{schema}" CASCADE')
        watch.close()
    return jobs / (enqueued - start), jobs / (done - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=32, help="worker threads per process (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--dsn", default=None, help="use this server instead of starting one")
    parser.add_argument("--fsync", choices=["on", "off"], default="off")
    parser.add_argument("--worker", nargs=4, metavar=("DSN", "SCHEMA", "READY", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        dsn, schema, ready, concurrency = args.worker
        sys.exit(worker(dsn, schema, Path(ready), int(concurrency)))

    server = None
    dsn = args.dsn
    if dsn is None:
        from pg_server import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            sys.exit("no PostgreSQL binaries found (initdb, pg_ctl); install PostgreSQL or pass --dsn")
        server = PostgresServer(bindir, settings={"fsync": args.fsync, "full_page_writes": args.fsync}).start()
        dsn = server.dsn
    try:
        import psycopg

        with psycopg.connect(dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(f"PostgreSQL {version[0] if version else '?'}, fsync={args.fsync}, {os.cpu_count()} CPUs, "
              f"Python {sys.version.split()[0]}, {args.jobs} no-op jobs, {args.concurrency} threads per process, "
              f"best of {args.repeat}")  # fmt: skip
        print(f"{'processes':>9}  {'enqueue jobs/s':>14}  {'end-to-end jobs/s':>17}")
        with tempfile.TemporaryDirectory() as workdir:
            for processes in args.processes:
                results = [run_once(dsn, args.jobs, processes, args.concurrency, Path(workdir))
                           for _ in range(args.repeat)]  # fmt: skip
                enqueue = max(r[0] for r in results)
                end_to_end = max(r[1] for r in results)
                print(f"{processes:>9}  {enqueue:>14,.0f}  {end_to_end:>17,.0f}", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
