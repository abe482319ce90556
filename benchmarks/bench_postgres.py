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
``--repeat``. Then (``--parts``):

- ``claims``: one claim of 4 (and of 32) jobs with 75k ready jobs over three queues, on one queue and
  on all three, by the store and by the claim of schema 1 (``queue = ANY(...)``, one sort
  over the whole ready set) side by side; then claim+complete (``complete_and_claim`` of 4)
  and an idle claim as retained finished rows grow (``--retained``, default 1k, 100k, 1M,
  loaded with ``INSERT ... SELECT generate_series``), not vacuumed and vacuumed (see
  :func:`retained`). Per operation:
  wall time, this process's CPU and the server backend's CPU (from ``/proc``, when the
  server is local), and the ratios to the smallest case.
- ``pickup``: a job enqueued in this process, run by an idle JobEngine worker in another
  (polling every 30 s, so only LISTEN/NOTIFY wakes it): enqueue-to-start latency, p50/p99;
  then pairs A, B (B ``depends_on`` A) enqueued here and both run there: from A's handler
  returning to B's start (B is released by A's completion, and announced by its trigger),
  enqueued as one ``chain`` and as two enqueues (B right after A, racing A's completion:
  released by whichever commits second); then the lateness after ``run_at`` of a job
  enqueued with ``run_at`` 200 ms on and of one retried by this process for 300 ms on
  (:func:`due_later`).

The throughput part runs the peers installed (``--peers``: pgqueuer, on asyncpg when
installed, else psycopg; procrastinate on psycopg), each with its own defaults, on the same
server, job count and process counts, side by side in the same run (best of
``--peer-repeat``), with their ratio to this engine's end-to-end jobs/s.
The server runs with its defaults except ``fsync`` (``--fsync off`` by
default: this measures the engine and the SQL, not the disk; pass ``--fsync on`` for a
durable server) and ``max_connections``. Run ``python benchmarks/bench_postgres.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from threaddispatch.jobs import JobEngine  # noqa: E402
from threaddispatch.stores import JobState  # noqa: E402
from threaddispatch.stores.base import Completion  # noqa: E402
from threaddispatch.stores.postgres import PostgresStore  # noqa: E402


def worker(dsn: str, schema: str, ready: Path, concurrency: int, idle: bool = False) -> int:
    """A worker process: run no-op jobs until SIGTERM (``idle``: polling every 30 s, woken by NOTIFY)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = PostgresStore(dsn, schema=schema, max_size=4)
    poll = (30.0, 30.0) if idle else (0.05, 0.2)
    engine = JobEngine(store, concurrency=concurrency, poll_interval=poll[0], max_poll_interval=poll[1],
                       heartbeat_interval=5.0, stale_job_threshold=60.0)  # fmt: skip
    engine.register("noop", lambda ctx, payload: None, max_retries=0, timeout=None)
    engine.register("stamp", stamp, max_retries=0, timeout=None)
    engine.register("clock", clock, max_retries=0, timeout=None)
    engine.start()
    ready.write_text("ready")
    stop.wait()
    engine.stop(10)
    store.close()
    return 0


def stamp(ctx: object, payload: float) -> float:
    """The pickup job: how long after its enqueue (``payload``, a time.time()) it started."""
    return time.time() - payload


def clock(ctx: object, payload: object) -> float:
    """The released-dependent pickup's jobs: the time.time() at which the handler ran."""
    return time.time()


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
    try:
        with worker_processes(["--worker", dsn, schema], str(concurrency), processes, workdir / schema):
            start = time.perf_counter()
            producer.enqueue_many("noop", [None] * jobs)
            enqueued = time.perf_counter()
            done = wait_done(watch, unfinished, start)
        completed = store.counts()[JobState.COMPLETED]
        if completed != jobs:
            raise RuntimeError(f"{completed} of {jobs} jobs completed")
    finally:
        store.close()
        watch.execute(f'DROP SCHEMA "{schema}" CASCADE')
        watch.close()
    return jobs / (enqueued - start), jobs / (done - start)


@contextlib.contextmanager
def worker_processes(argv: list[str], concurrency: str, processes: int, ready: Path) -> Iterator[None]:
    """``processes`` worker processes of this script (``argv``, a ready file, ``concurrency``), started
    and their listeners connected; SIGTERMed (killed after 20 s) at the end."""
    procs = []
    for index in range(processes):
        path = ready.with_name(f"ready-{ready.name}-{index}")
        procs.append((subprocess.Popen([sys.executable, __file__, *argv, str(path), concurrency]), path))
    try:
        deadline = time.monotonic() + 60
        while not all(path.exists() for _, path in procs):
            if time.monotonic() > deadline or any(proc.poll() is not None for proc, _ in procs):
                raise RuntimeError(f"workers {argv[0]} did not start")
            time.sleep(0.02)
        time.sleep(0.5)  # let every listener connect
        yield
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_done(watch: Any, unfinished: str, start: float) -> float:
    """Poll ``unfinished`` (an EXISTS, cheap for the server) every 5 ms until false: the perf_counter then."""
    while (row := watch.execute(unfinished).fetchone()) and row[0]:
        if time.perf_counter() - start > 300:
            raise RuntimeError("jobs did not complete within 300 s")
        time.sleep(0.005)
    return time.perf_counter()


# -- peers: pgqueuer and procrastinate, the same no-op jobs on the same server --------------------------

PEERS = ("pgqueuer", "procrastinate")


def peer(name: str) -> Any:
    """A peer's module, imported by name (installed or not, the type check does not follow it)."""
    import importlib

    return importlib.import_module(name)


def peer_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def peer_worker(name: str, dsn: str, schema: str, ready: Path, concurrency: int) -> int:
    """A peer's worker process: run no-op jobs until SIGTERM (each peer's defaults, ``concurrency`` tasks)."""
    import asyncio

    return asyncio.run(_pgqueuer_worker(dsn, schema, ready, concurrency) if name == "pgqueuer"
                       else _procrastinate_worker(dsn, schema, ready, concurrency))  # fmt: skip


async def _pgqueuer_worker(dsn: str, schema: str, ready: Path, concurrency: int) -> int:
    import asyncio

    pgqueuer = peer("pgqueuer")
    conn, driver = await _pgqueuer_connect(dsn, schema)
    manager = pgqueuer.QueueManager(pgqueuer.Queries(driver))
    manager.entrypoint("noop")(_pgqueuer_noop)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, manager.shutdown.set)
    ready.write_text("ready")
    await manager.run()  # its defaults: batches of 10, no cap
    await conn.close()
    return 0


async def _pgqueuer_connect(dsn: str, schema: str) -> tuple[Any, Any]:
    """A connection on ``schema`` and pgqueuer's driver for it: asyncpg (its first driver) when installed."""
    import importlib.util

    if importlib.util.find_spec("asyncpg") is not None:
        conn = await peer("asyncpg").connect(_url(dsn), server_settings={"search_path": schema})
        return conn, peer("pgqueuer").AsyncpgDriver(conn)
    import psycopg

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, options=f"-c search_path={schema}")
    return conn, peer("pgqueuer").PsycopgDriver(conn)


def _url(dsn: str) -> str:
    """``dsn`` as a URL (asyncpg takes no libpq key=value string)."""
    if "://" in dsn:
        return dsn
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    host = str(parts.get("host", "localhost"))
    hostpart = "" if host.startswith("/") else host
    query = f"?host={host}" if host.startswith("/") else ""
    auth = f"{parts['user']}@" if "user" in parts else ""
    return f"postgresql://{auth}{hostpart}:{parts.get('port', 5432)}/{parts.get('dbname', 'postgres')}{query}"


async def _pgqueuer_noop(job: object) -> None:
    return None


def _procrastinate_noop() -> None:
    return None


async def _procrastinate_worker(dsn: str, schema: str, ready: Path, concurrency: int) -> int:
    app = peer("procrastinate").App(connector=_procrastinate_connector(dsn, schema))
    app.task(name="noop")(_procrastinate_noop)
    async with app.open_async():
        ready.write_text("ready")
        await app.run_worker_async(concurrency=concurrency, install_signal_handlers=True)
    return 0


def _procrastinate_connector(dsn: str, schema: str) -> Any:
    import logging

    logging.getLogger("procrastinate").setLevel(logging.ERROR)  # its warning about an App in __main__

    return peer("procrastinate").PsycopgConnector(conninfo=dsn, kwargs={"options": f"-c search_path={schema}"})


def peer_run_once(name: str, dsn: str, jobs: int, processes: int, concurrency: int, workdir: Path) -> float:
    """One measurement of a peer: end-to-end jobs/s (enqueue of ``jobs`` in one batch to the last done)."""
    import asyncio

    import psycopg

    schema = f"peer_{uuid.uuid4().hex[:10]}"
    watch = psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}")
    watch.execute(f'CREATE SCHEMA "{schema}"')
    if name == "pgqueuer":
        unfinished = "SELECT EXISTS (SELECT 1 FROM pgqueuer)"  # done jobs leave the table
        asyncio.run(_pgqueuer_install(dsn, schema))
    else:
        unfinished = "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"
        asyncio.run(_procrastinate_install(dsn, schema))
    try:
        with worker_processes(["--peer-worker", name, dsn, schema], str(concurrency), processes, workdir / schema):
            start = time.perf_counter()
            asyncio.run(_pgqueuer_enqueue(dsn, schema, jobs) if name == "pgqueuer"
                        else _procrastinate_enqueue(dsn, schema, jobs))  # fmt: skip
            done = wait_done(watch, unfinished, start)
    finally:
        watch.execute(f'DROP SCHEMA "{schema}" CASCADE')
        watch.close()
    return jobs / (done - start)


async def _pgqueuer_install(dsn: str, schema: str) -> None:
    conn, driver = await _pgqueuer_connect(dsn, schema)
    try:
        await peer("pgqueuer").Queries(driver).install()
    finally:
        await conn.close()


async def _pgqueuer_enqueue(dsn: str, schema: str, jobs: int) -> None:
    conn, driver = await _pgqueuer_connect(dsn, schema)
    try:
        await peer("pgqueuer").Queries(driver).enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
    finally:
        await conn.close()


async def _procrastinate_install(dsn: str, schema: str) -> None:
    app = peer("procrastinate").App(connector=_procrastinate_connector(dsn, schema))
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def _procrastinate_enqueue(dsn: str, schema: str, jobs: int) -> None:
    app = peer("procrastinate").App(connector=_procrastinate_connector(dsn, schema))
    noop = app.task(name="noop")(_procrastinate_noop)
    async with app.open_async():
        await noop.batch_defer_async(*([{}] * jobs))


# -- claims -----------------------------------------------------------------------------------------------

# The claim over several queues of schema version 1, for the side-by-side rows: one ORDER BY
# over every ready row of the queues (a sort of the whole ready set).
V1_CLAIM_ANY = (
    "UPDATE dispatch_jobs SET state = 'running', worker_id = %(worker)s, attempts = attempts + 1, "
    "started_at = %(now)s, heartbeat_at = %(now)s, updated_at = %(now)s "
    "WHERE seq IN (SELECT seq FROM dispatch_jobs WHERE state IN ('pending', 'retrying') "
    "AND queue = ANY(%(queues)s) AND run_at <= %(now)s "
    "ORDER BY priority DESC, run_at, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED) RETURNING id"
)
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def backend_cpu(pid: int) -> float:
    """CPU seconds the server process ``pid`` has used (nan when it is not on this machine)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK


def per_op(op: Callable[[], object], count: int, pid: int) -> tuple[float, float, float]:
    """``op`` run ``count`` times: (wall, client CPU, server backend CPU) in microseconds per call."""
    server, wall, cpu = backend_cpu(pid), time.perf_counter(), time.process_time()
    for _ in range(count):
        op()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall / count * 1e6, cpu / count * 1e6, (backend_cpu(pid) - server) / count * 1e6


def fresh_store(dsn: str) -> tuple[PostgresStore, str, int]:
    """A store on a new schema with one connection: (store, schema, its backend pid)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(dsn, schema=schema, min_size=1, max_size=1)
    store.migrate()
    pid = store._run("reading the backend pid", lambda conn: conn.info.backend_pid, idempotent=True)
    return store, schema, pid


def load(conn: Any, state: str, count: int, queues: int, start: int = 0) -> None:
    """``count`` jobs in ``state`` over ``queues`` queues, random priorities 0-4, due in the past."""
    finished = "extract(epoch FROM now()) - 500" if state == "completed" else "NULL"
    conn.execute(
        "INSERT INTO dispatch_jobs (id, name, payload, queue, state, priority, attempts, max_retries, run_at, "
        "created_at, updated_at, finished_at) SELECT md5(random()::text || g), 'noop', 'null', "
        "'q' || (g %% %(queues)s), %(state)s, floor(random() * 5), 0, 0, extract(epoch FROM now()) - 1000 + g * 1e-6, "
        f"extract(epoch FROM now()) - 1000, extract(epoch FROM now()), {finished} "
        "FROM generate_series(%(start)s::bigint, %(end)s::bigint) AS g",
        {"queues": queues, "state": state, "start": start, "end": start + count - 1},
    )


def row(label: str, cost: tuple[float, float, float], base: tuple[float, float, float] | None = None) -> None:
    ratio = "" if base is None else f"  x{cost[0] / base[0]:5.2f} wall  x{cost[2] / base[2]:5.2f} server"
    print(f"  {label:<58} {cost[0]:>9,.0f} {cost[1]:>9,.0f} {cost[2]:>9,.0f}{ratio}", flush=True)


def header(title: str) -> None:
    print(f"\n{title}\n  {'':<58} {'wall us':>9} {'client':>9} {'server':>9}  (per operation)")


def multi_queue(dsn: str, ready: int = 75_000, count: int = 200) -> None:
    """Claims of 4 and of 32 over 1 and 3 queues with ``ready`` ready jobs: this store's claim and schema 1's."""
    import psycopg

    store, schema, pid = fresh_store(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}") as conn:
            load(conn, "pending", ready, 3)
            conn.execute("VACUUM ANALYZE dispatch_jobs")
            old_pid = conn.info.backend_pid
            three = ["q0", "q1", "q2"]
            for limit in (4, 32):
                header(f"claim of {limit}, {ready:,} ready jobs over 3 queues")

                def claim(queues: list[str], limit: int = limit) -> Callable[[], object]:
                    return lambda: store.claim(queues, limit, worker_id="w", now=time.time())

                def v1_claim(limit: int = limit) -> object:
                    params = {"worker": "w", "now": time.time(), "limit": limit, "queues": three}
                    return conn.execute(V1_CLAIM_ANY, params).fetchall()

                one = per_op(claim(["q0"]), count, pid)
                row("store, one queue", one)
                row("store, three queues (LATERAL per queue)", per_op(claim(three), count, pid), one)
                row(
                    "schema 1 claim, three queues (= ANY, one sort)",
                    per_op(v1_claim, max(5, count // 10), old_pid),
                    one,
                )
    finally:
        store.close()
        drop(dsn, schema)


def retained(dsn: str, sizes: list[int], ready: int = 2_000) -> None:
    """Claim+complete and an idle claim as finished rows grow, before and after a vacuum.

    The finished rows get there as the engine's do (pending, then running, then completed:
    bulk UPDATEs), over two queues: q0 also holds ``ready`` jobs to claim and complete 4 at
    a time, q1 none (its claims are idle). Each finished job leaves dead row versions and a
    dead claim-index entry until a vacuum; autovacuum is off during the measurement and
    ``VACUUM`` stands for it. Schema 1 left the default threshold (a vacuum after 20% of the
    table changed: 200k rows at 1M), schema 2 vacuums after 1%.
    """
    import psycopg

    header(f"as finished rows grow ({ready // 2:,} jobs claimed+completed 4 at a time, 200 idle claims)")
    base: dict[str, tuple[float, float, float]] = {}
    for size in sizes:
        store, schema, pid = fresh_store(dsn)
        try:
            with psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}") as conn:
                conn.execute("ALTER TABLE dispatch_jobs SET (autovacuum_enabled = off)")
                load(conn, "pending", size, 2)
                conn.execute("UPDATE dispatch_jobs SET state = 'running', worker_id = 'w'")
                conn.execute("UPDATE dispatch_jobs SET state = 'completed', finished_at = updated_at")
                load(conn, "pending", ready, 1, start=size)
                conn.execute("ANALYZE dispatch_jobs")
                jobs = store.claim(["q0"], 4, worker_id="w", now=time.time())

                def claim_complete() -> None:
                    nonlocal jobs
                    outcomes = [Completion(job.id, "w", job.attempts, None, None) for job in jobs]
                    jobs = store.complete_and_claim(outcomes, ["q0"], 4, worker_id="w", now=time.time())[1]

                def idle() -> None:
                    store.claim(["q1"], 4, worker_id="w", now=time.time())

                for vacuumed in (False, True):
                    if vacuumed:
                        conn.execute("VACUUM dispatch_jobs")
                    when = "vacuumed (schema 2: at 1%)" if vacuumed else "not vacuumed (schema 1: at 20%)"
                    cost = per_op(claim_complete, ready // 8 - 1, pid)
                    row(f"claim+complete, {size:,}, {when}", cost, base.setdefault("cc", cost))
                    cost = per_op(idle, 200, pid)
                    row(f"idle claim, {size:,}, {when}", cost, base.setdefault("idle", cost))
        finally:
            store.close()
            drop(dsn, schema)


def drop(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"


def pickup(dsn: str, workdir: Path, samples: int = 100) -> None:
    """Enqueue here, run in an idle worker process: latency from enqueue to the job's start."""
    store, schema, _ = fresh_store(dsn)
    producer = JobEngine(store)
    producer.register("stamp", stamp, max_retries=0, timeout=None)
    producer.register("clock", clock, max_retries=0, timeout=None)
    ready = workdir / f"ready-{schema}"
    proc = subprocess.Popen([sys.executable, __file__, "--worker", dsn, schema, str(ready), "4", "--idle"])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("worker did not start")
            time.sleep(0.02)
        time.sleep(0.5)  # its listener connects
        latencies = []
        for _ in range(samples):
            job_id = producer.enqueue("stamp", time.time())
            latencies.append(producer.result(job_id, timeout=60))
            time.sleep(0.02)  # the worker is idle again
        print(f"\ncross-process pickup, idle worker polling every 30 s ({samples} jobs): {percentiles(latencies)}")

        # B waits for A; both run in the worker: from A's handler returning to B's start (A's
        # completion, its release of B and that release's NOTIFY, B's claim). Enqueued as a
        # chain (one transaction), then B apart, right after A: A's completion racing B's
        # enqueue, B is released by whichever of the two commits second.
        def chained() -> list[str]:
            return producer.chain(producer.job_spec("clock"), producer.job_spec("clock"))

        def apart() -> list[str]:
            first = producer.enqueue("clock")
            return [first, producer.enqueue("clock", depends_on=[first])]

        for label, enqueue in (("chain(A, B)", chained), ("A, then B depends_on A", apart)):
            released = []
            for _ in range(samples):
                first_id, second_id = enqueue()
                released.append(producer.result(second_id, timeout=60) - producer.result(first_id, timeout=60))
                time.sleep(0.02)
            print(f"released dependent, {label}, same idle worker ({samples} pairs): {percentiles(released)}",
                  flush=True)  # fmt: skip
        due_later(producer, store, samples)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        store.close()
        drop(dsn, schema)


def due_later(producer: JobEngine, store: PostgresStore, samples: int) -> None:
    """How long after its ``run_at`` the idle worker starts a job due later: one enqueued here with
    ``run_at`` 200 ms on, and one this process claimed and retried for 300 ms on (``retry_later``,
    as an engine that then stopped leaves it): only its NOTIFY, which carries the run_at, tells the
    worker when."""
    delayed = []
    for _ in range(samples):
        run_at = time.time() + 0.2
        delayed.append(producer.result(producer.enqueue("stamp", run_at, run_at=run_at), timeout=60))
    print(f"delayed job (run_at +200 ms), lateness after run_at ({samples} jobs): {percentiles(delayed)}")
    retried = []
    for _ in range(samples):
        run_at = time.time() + 0.3
        job_id = producer.enqueue("stamp", run_at, delay=3600.0)  # not the worker's until retried
        [claimed] = store.claim(["default"], 1, worker_id="bench", now=time.time() + 7200.0)
        assert claimed.id == job_id
        store.retry_later(job_id, worker_id="bench", attempts=claimed.attempts, run_at=run_at, error="bench",
                          now=time.time())  # fmt: skip
        retried.append(producer.result(job_id, timeout=60))
    print(f"retry by another process (run_at +300 ms), lateness after run_at ({samples} jobs): "
          f"{percentiles(retried)}", flush=True)  # fmt: skip


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (a shared machine skews every number)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=32, help="worker threads per process (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--dsn", default=None, help="use this server instead of starting one")
    parser.add_argument("--fsync", choices=["on", "off"], default="off")
    parser.add_argument("--parts", nargs="+", choices=["throughput", "claims", "pickup"],
                        default=["throughput", "claims", "pickup"])  # fmt: skip
    parser.add_argument("--retained", type=int, nargs="+", default=[1_000, 100_000, 1_000_000],
                        help="finished rows kept in the table for the claim curve")  # fmt: skip
    parser.add_argument("--worker", nargs=4, metavar=("DSN", "SCHEMA", "READY", "CONCURRENCY"), help=argparse.SUPPRESS)
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-worker", nargs=5, metavar=("PEER", "DSN", "SCHEMA", "READY", "CONCURRENCY"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument(
        "--peers",
        nargs="*",
        choices=PEERS,
        default=list(PEERS),
        help="peer queues run side by side in the throughput part, when installed (default both)",
    )
    parser.add_argument("--peer-repeat", type=int, default=1, help="best of this many runs of each peer (default 1)")
    args = parser.parse_args()
    if args.peer_worker:
        name, dsn, schema, ready, concurrency = args.peer_worker
        sys.exit(peer_worker(name, dsn, schema, Path(ready), int(concurrency)))
    if args.worker:
        dsn, schema, ready, concurrency = args.worker
        sys.exit(worker(dsn, schema, Path(ready), int(concurrency), args.idle))

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
              f"best of {args.repeat}, load average {load_average()}")  # fmt: skip
        with tempfile.TemporaryDirectory() as workdir:
            if "throughput" in args.parts:
                peers = [name for name in args.peers if peer_available(name)]
                print(f"{'processes':>9}  {'enqueue jobs/s':>14}  {'end-to-end jobs/s':>17}"
                      + "".join(f"  {name + ' e2e':>18}" for name in peers))  # fmt: skip
                for processes in args.processes:
                    results = [run_once(dsn, args.jobs, processes, args.concurrency, Path(workdir))
                               for _ in range(args.repeat)]  # fmt: skip
                    enqueue = max(r[0] for r in results)
                    end_to_end = max(r[1] for r in results)
                    line = f"{processes:>9}  {enqueue:>14,.0f}  {end_to_end:>17,.0f}"
                    for name in peers:
                        best = max(peer_run_once(name, dsn, args.jobs, processes, args.concurrency, Path(workdir))
                                   for _ in range(args.peer_repeat))  # fmt: skip
                        line += f"  {best:>12,.0f} ({best / end_to_end:.2f}x)"
                    print(line, flush=True)
            if "claims" in args.parts:
                multi_queue(dsn)
                retained(dsn, args.retained)
            if "pickup" in args.parts:
                pickup(dsn, Path(workdir))
        print(f"load average at the end {load_average()}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
