"""``JobEngine.run_pending()`` draining stored jobs on the caller's thread, by store, with a same-run A/B.

``run_pending`` is the serverless and cron drain: no worker threads, every job claimed and run
on the calling thread, one at a time. Each round enqueues ``--jobs`` no-op jobs on a fresh
store (SQLite file, PostgreSQL schema on tests/pg_server.py's throwaway server, or ``--dsn``),
then times one ``run_pending()``: jobs per second (wall) and CPU per job (``process_time``:
this process's side of every store call). ``--against DIR`` runs the same rounds on the
tree in DIR (e.g. ``git archive HEAD threaddispatch | tar -x -C DIR``), interleaved in
child processes, and prints the ratio of the medians. Run
``python benchmarks/bench_run_pending.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # pg_server


def drain(store_url: str, jobs: int) -> dict[str, float]:
    """One round in this process: enqueue ``jobs`` no-op jobs on ``store_url``, then time ``run_pending``."""
    from threaddispatch import JobEngine
    from threaddispatch.stores import open_store

    if store_url.startswith("postgresql"):
        from threaddispatch.stores.postgres import PostgresStore

        store: Any = PostgresStore(store_url, schema=f"pending_{uuid.uuid4().hex[:12]}")
    else:
        store = open_store(store_url)
    try:
        engine = JobEngine(store)
        engine.register("noop", lambda ctx, payload: None)
        engine.enqueue_many("noop", [{} for _ in range(jobs)])
        cpu, wall = time.process_time(), time.perf_counter()
        ran = engine.run_pending()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        store.close()
    if ran != jobs:
        raise RuntimeError(f"run_pending ran {ran} of {jobs} jobs")
    return {"jobs_per_s": ran / wall, "cpu_us": cpu / ran * 1e6}


def _child(tree: str, store_url: str, jobs: int) -> dict[str, float]:
    """:func:`drain` in a child process importing threaddispatch from ``tree``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.path.join(HERE, "..", "tests")])}
    command = [sys.executable, os.path.abspath(__file__), "--child", store_url, "--jobs", str(jobs)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--dsn", default=None, help="a PostgreSQL server to use instead of a throwaway one")
    parser.add_argument("--against", default=None, help="another tree (a directory) to run in the same rounds")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(drain(args.child, args.jobs)))
        return
    kinds = [kind.strip() for kind in args.stores.split(",") if kind.strip()]
    server = None
    dsn = args.dsn
    if "postgresql" in kinds and dsn is None:
        from pg_server import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            print("no PostgreSQL binaries found (initdb, pg_ctl): postgresql left out (or pass --dsn)")
            kinds.remove("postgresql")
        else:
            server = PostgresServer(bindir).start()
            dsn = server.dsn
    this_tree = os.path.join(HERE, "..")
    trees = {"this tree": this_tree, **({"--against": args.against} if args.against else {})}
    print(f"run_pending() of {args.jobs:,} no-op jobs, {args.rounds} interleaved rounds, medians (best)")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for kind in kinds:
                results: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
                for _ in range(args.rounds):
                    for label, tree in trees.items():
                        url = f"sqlite:///{workdir}/{uuid.uuid4().hex}.db" if kind == "sqlite" else str(dsn)
                        results[label].append(_child(tree, url, args.jobs))
                medians = {}
                for label, rounds in results.items():
                    rates = [r["jobs_per_s"] for r in rounds]
                    cpus = [r["cpu_us"] for r in rounds]
                    medians[label] = statistics.median(rates)
                    print(
                        f"{kind:11} {label:10} {medians[label]:9,.0f} jobs/s ({max(rates):,.0f})   "
                        f"{statistics.median(cpus):6.0f} µs CPU/job ({min(cpus):.0f})"
                    )
                if args.against:
                    print(f"{kind:11} this tree / --against: {medians['this tree'] / medians['--against']:.2f}x jobs/s")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
