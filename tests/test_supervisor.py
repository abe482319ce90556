"""``threaddispatch worker --processes N``: a supervisor forking N worker processes, in real processes and signals.

Jobs run in several pids; a SIGKILLed worker process is replaced and jobs keep running; SIGTERM
to the supervisor stops every worker process gracefully and it exits 0; a crash loop backs off;
``--max-jobs`` recycles a process and ``--burst`` ends them all. Each job's runs are counted in
a file per job, and the store's counts say nothing was lost.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore
from threaddispatch.testing import wait_for

ROOT = Path(__file__).resolve().parents[1]

if not hasattr(os, "fork"):
    pytest.skip("the supervisor forks", allow_module_level=True)

SUPERVISED_MODULE = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    from threaddispatch.jobs import JobEngine
    from threaddispatch.stores import open_store

    MARKERS = Path(os.environ["MARKERS"])
    if os.environ.get("CRASH"):
        os.register_at_fork(after_in_child=lambda: os._exit(7))  # every worker process dies at once
    engine = JobEngine(
        open_store(os.environ["STORE"]), concurrency=1, poll_interval=0.02, max_poll_interval=0.05,
        heartbeat_interval=0.2, stale_job_threshold=5.0, shutdown_timeout=20.0,
    )

    def wait_until(predicate, ctx):
        deadline = time.monotonic() + 30
        while not predicate() and time.monotonic() < deadline and not ctx.cancelled:
            ctx.wait(0.01)

    @engine.job("work", timeout=None)
    def work(ctx, payload):
        with open(MARKERS / f"runs-{payload['n']}", "a") as runs:  # one line per run of job n
            runs.write(f"{os.getpid()}\\n")
        if payload.get("hold"):  # stay running until two processes hold a job
            (MARKERS / f"holding-{os.getpid()}").touch()
            wait_until(lambda: len(list(MARKERS.glob("holding-*"))) >= 2, ctx)
        if payload.get("gate"):  # stay running until the test opens the gate
            (MARKERS / "at-gate").touch()
            wait_until((MARKERS / "open").exists, ctx)
        return os.getpid()
    """
)


class Supervised:
    """A ``threaddispatch worker supmod:engine --processes N`` process, its log file, and a producer engine."""

    def __init__(self, directory: Path, *options: str, crash: bool = False) -> None:
        self.directory = directory
        self.markers = directory / "markers"
        self.log = directory / "worker.log"
        self.store = SQLiteStore(str(directory / "jobs.db"))
        self.engine = JobEngine(self.store)
        self.engine.register("work", lambda ctx, payload: None, timeout=None)
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{directory}", "MARKERS": str(self.markers),
               "STORE": f"sqlite:///{directory / 'jobs.db'}", "CRASH": "1" if crash else ""}  # fmt: skip
        argv = [sys.executable, "-m", "threaddispatch", "worker", "supmod:engine", "--log-file", str(self.log),
                *options]  # fmt: skip
        self.process = subprocess.Popen(argv, cwd=directory, env=env, stderr=subprocess.PIPE, text=True)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def started(self) -> list[int]:
        """The pids of the worker processes started so far, in order (from the supervisor's log)."""
        return [int(pid) for pid in re.findall(r"worker process \d+ started \(pid (\d+)\)", self.log_text())]

    def enqueue(self, first: int, count: int, **extra: object) -> list[str]:
        return [self.engine.enqueue("work", {"n": n, **extra}) for n in range(first, first + count)]

    def runs(self, n: int) -> list[int]:
        """The pids job ``n`` ran in, once per run."""
        path = self.markers / f"runs-{n}"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def completed(self, job_ids: list[str]) -> bool:
        return all(self.engine.get_job(job_id).state == "completed" for job_id in job_ids)

    def stop(self) -> int:
        """SIGTERM the supervisor and wait for it; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        _out, self.stderr = self.process.communicate(timeout=60)
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=30)
        for pid in self.started():  # a worker process left behind by a failed test
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        self.store.close()


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for a parent that does not reap it is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not Path("/proc").is_dir()
    return "\nState:\tZ" not in status


def make_workdir(directory: Path) -> Path:
    """``directory`` with the worker module ``supmod`` and its markers folder; returns it."""
    (directory / "markers").mkdir()
    (directory / "supmod.py").write_text(SUPERVISED_MODULE)
    return directory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return make_workdir(tmp_path)


@pytest.fixture
def supervise(workdir: Path) -> Iterator[type[Supervised]]:
    """Start supervised workers with ``supervise(workdir, *options)``; every one is stopped at teardown."""
    made: list[Supervised] = []

    class Tracked(Supervised):
        def __init__(self, directory: Path, *options: str, crash: bool = False) -> None:
            super().__init__(directory, *options, crash=crash)
            made.append(self)

    yield Tracked
    for supervised in made:
        supervised.close()


@pytest.mark.timeout(120)
def test_jobs_run_in_two_processes_a_killed_one_is_replaced_and_sigterm_stops_all(
    workdir: Path, supervise: type[Supervised]
) -> None:
    """N=2 on a SQLite file: jobs run in two pids; SIGKILL one, a new one takes its place and runs jobs;
    SIGTERM to the supervisor lets the running job finish and exits 0; each job ran exactly once."""
    workers = supervise(workdir, "--processes", "2", "--pidfile", str(workdir / "w.pid"))
    first = workers.enqueue(0, 2, hold=True)  # each holds its process until both run: two pids
    wait_for(lambda: workers.completed(first), 60, interval=0.02, message="the two holding jobs completed")
    pids = {workers.runs(0)[0], workers.runs(1)[0]}
    assert len(pids) == 2 and workers.process.pid not in pids and pids <= set(workers.started())
    assert (workdir / "w.pid").read_text().strip() == str(workers.process.pid)

    victim = workers.started()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(workers.started()) == 3, 30, interval=0.02, message="a third worker process started")
    assert "was killed by SIGKILL" in workers.log_text()
    replacement = workers.started()[2]
    for path in workers.markers.glob("holding-*"):
        path.unlink()
    second = workers.enqueue(2, 2, hold=True)  # the survivor and the replacement: two pids again
    more = workers.enqueue(4, 20)
    wait_for(lambda: workers.completed(second + more), 60, interval=0.02, message="the later jobs completed")
    assert replacement in {workers.runs(2)[0], workers.runs(3)[0]}

    gated = workers.enqueue(24, 1, gate=True)
    wait_for((workers.markers / "at-gate").exists, 30, interval=0.02, message="the gated job is running")
    workers.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "received signal 15: stopping 2 worker processes" in workers.log_text(), 30, interval=0.02,
             message="the supervisor passed SIGTERM on")  # fmt: skip
    (workers.markers / "open").touch()
    assert workers.wait() == 0, workers.stderr
    assert workers.completed(gated)  # the running job finished before its process stopped
    assert {n: len(workers.runs(n)) for n in range(25)} == dict.fromkeys(range(25), 1)
    assert workers.engine.counts() == {**dict.fromkeys(workers.engine.counts(), 0), "completed": 25}
    assert not any(_running(pid) for pid in workers.started())
    assert not (workdir / "w.pid").exists()
    assert "worker stopped (clean)" in workers.log_text()


@pytest.mark.timeout(60)
def test_a_crash_loop_backs_off_and_sigterm_still_stops_cleanly(workdir: Path, supervise: type[Supervised]) -> None:
    """Worker processes that die at start are restarted after a growing delay (logged), not in a spin."""
    workers = supervise(workdir, "--processes", "1", crash=True)
    wait_for(lambda: "(death 3 in a row)" in workers.log_text(), 30, interval=0.02, message="three deaths in a row")
    assert workers.stop() == 0, workers.stderr
    delays = [float(s) for s in re.findall(r"starting another in ([\d.]+)s \(death \d+ in a row\)", workers.log_text())]
    assert "exited with status 7" in workers.log_text()
    assert delays[2] > delays[0]  # equal jitter: the 3rd delay is at least twice the 1st's longest


@pytest.mark.timeout(90)
def test_max_jobs_recycles_a_process_and_burst_ends_the_supervisor(workdir: Path, supervise: type[Supervised]) -> None:
    """``--max-jobs 2``: a process that ran 2 jobs is replaced at once; ``--burst``: once no work is left
    every process exits and so does the supervisor, 0; a job delayed to later stays pending."""
    producer = JobEngine(SQLiteStore(str(workdir / "jobs.db")))
    producer.register("work", lambda ctx, payload: None, timeout=None)
    ready = [producer.enqueue("work", {"n": n}) for n in range(6)]
    later = producer.enqueue("work", {"n": 99}, delay=3600)
    producer.store.close()
    workers = supervise(workdir, "--processes", "1", "--max-jobs", "2", "--burst")
    assert workers.wait() == 0, workers.stderr
    assert workers.completed(ready) and workers.engine.get_job(later).state == "pending"
    assert {n: len(workers.runs(n)) for n in range(6)} == dict.fromkeys(range(6), 1)
    assert "finished its --max-jobs; starting another" in workers.log_text()
    assert len({workers.runs(n)[0] for n in range(6)}) == 3  # one thread each: 2 jobs a process
    assert "every worker process finished: no work left" in workers.log_text()


@pytest.mark.timeout(60)
def test_worker_processes_stop_when_the_supervisor_is_killed(workdir: Path, supervise: type[Supervised]) -> None:
    """SIGKILL to the supervisor: its worker processes see their parent gone and stop by themselves."""
    workers = supervise(workdir, "--processes", "2")
    wait_for(lambda: len(workers.started()) == 2, 30, interval=0.02, message="two worker processes started")
    workers.process.kill()
    workers.wait()
    wait_for(lambda: not any(_running(pid) for pid in workers.started()), 30, interval=0.02,
             message="the orphaned worker processes stopped")  # fmt: skip
    assert workers.log_text().count("is gone: stopping") == 2
