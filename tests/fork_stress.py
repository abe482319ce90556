"""fork() while a SQLite JobEngine runs jobs: ``python tests/fork_stress.py DB [--forks N]``.

The parent runs a JobEngine on a SQLiteStore under load (a producer thread enqueueing
and reading, worker threads claiming and completing, the heartbeat thread writing) and
forks ``--forks`` times while that goes on, one child at a time. Each child checks that
its engine was left stopped, starts it on its own queue, runs one job through the store,
stops it and reports through a pipe. A child that does not report within
``--child-timeout`` seconds is killed and counted as hung (``--dump`` prints its stacks
first). The parent prints one JSON
line: ``{"forks", "hangs", "errors", "parent_ok", ...}`` and exits 0 if nothing failed.

The test suite runs a small number of forks; run 500 by hand::

    python tests/fork_stress.py /tmp/fork-stress.db --forks 500
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import os
import select
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from threaddispatch import JobEngine, StoreError
from threaddispatch.jobs import JobContext
from threaddispatch.stores import SQLiteStore
from threaddispatch.testing import wait_for

# Python 3.12+ warns that forking a threaded process may deadlock: that is what this checks.
warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")


def build_engine(path: str) -> JobEngine:
    store = SQLiteStore(path, busy_timeout=5.0)
    engine = JobEngine(store, concurrency=4, poll_interval=0.005, heartbeat_interval=0.01, stale_job_threshold=60.0)

    @engine.job("double")
    def double(ctx: JobContext, payload: dict[str, int]) -> dict[str, int]:
        return {"value": payload["n"] * 2, "pid": os.getpid()}

    return engine


def produce(engine: JobEngine, stop: threading.Event, errors: list[str]) -> None:
    """Keep the parent's store busy from a non-worker thread too: enqueue, read, count."""
    n = 0
    while not stop.is_set():
        try:
            ids = engine.enqueue_many("double", [{"n": n + i} for i in range(5)])
            engine.get_job(ids[0])
            engine.counts()
        except StoreError as error:
            errors.append(f"parent producer: {error!r}")
        n += 5


def run_child(engine: JobEngine, write_end: int) -> None:
    """In the forked child: the engine is stopped; start it on a queue of its own and run one job."""
    report: dict[str, Any]
    try:
        was_running = engine.running
        job_id = engine.enqueue("double", {"n": 21}, queue="child")
        engine.start(queues=["child"], concurrency=2)
        result = engine.result(job_id, timeout=10)
        stopped = engine.stop(5)
        report = {"ok": result["value"] == 42 and result["pid"] == os.getpid() and stopped and not was_running}
        if not report["ok"]:
            report["error"] = f"bad child outcome: result={result} stopped={stopped} was_running={was_running}"
    except BaseException as error:  # report whatever happened, then leave
        report = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    os.write(write_end, json.dumps(report).encode())


def fork_once(engine: JobEngine, child_timeout: float, *, dump: bool) -> dict[str, Any]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if dump:
                faulthandler.register(signal.SIGUSR1, all_threads=True)
            os.close(read_end)
            run_child(engine, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        deadline = time.monotonic() + child_timeout
        chunks: list[bytes] = []
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_end], [], [], max(0.0, remaining))
            if not ready:
                if dump:
                    os.kill(pid, signal.SIGUSR1)  # its stacks to stderr: where it hangs
                    time.sleep(1)  # a diagnostic only: give faulthandler a moment
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"ok": False, "hung": True}
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.waitpid(pid, 0)
    finally:
        os.close(read_end)
    if not chunks:
        return {"ok": False, "error": "child exited without a report"}
    report: dict[str, Any] = json.loads(b"".join(chunks).decode())
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--forks", type=int, default=60)
    parser.add_argument("--child-timeout", type=float, default=20.0)
    parser.add_argument("--max-failures", type=int, default=0, help="stop after this many failed forks (0: never)")
    parser.add_argument("--dump", action="store_true", help="dump a hung child's stacks to stderr before killing it")
    args = parser.parse_args()

    engine = build_engine(args.db)
    engine.start()
    stop = threading.Event()
    producer_errors: list[str] = []
    producer = threading.Thread(target=produce, args=(engine, stop, producer_errors), name="producer", daemon=True)
    producer.start()
    forks = hangs = 0
    errors: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(args.forks):
            forks += 1
            # Fork only while the parent's workers are busy: some jobs completed since the last fork.
            done = engine.stats()["completed"]

            def loaded(done: int = done) -> bool:
                return int(engine.stats()["completed"]) >= done + 5

            wait_for(loaded, timeout=30, message="parent load")
            outcome = fork_once(engine, args.child_timeout, dump=args.dump)
            if outcome.get("hung"):
                hangs += 1
            elif not outcome["ok"]:
                errors[outcome["error"]] += 1
            if args.max_failures and hangs + sum(errors.values()) >= args.max_failures:
                break
    finally:
        stop.set()
        producer.join(30)
    # The parent goes on working after all those forks.
    last = engine.enqueue("double", {"n": 5})
    parent_ok = engine.result(last, timeout=30) == {"value": 10, "pid": os.getpid()}
    parent_ok = engine.stop(30) and parent_ok
    print(
        json.dumps(
            {
                "forks": forks,
                "hangs": hangs,
                "errors": dict(errors),
                "producer_errors": producer_errors[:5],
                "parent_ok": parent_ok,
                "completed": engine.stats()["completed"],
            }
        )
    )
    return 0 if parent_ok and not hangs and not errors and not producer_errors else 1


if __name__ == "__main__":
    sys.exit(main())
