"""The flags of ``threaddispatch worker``, and the same options in ``flask threaddispatch worker`` and Django's
``manage.py threaddispatch_worker``: ``--max-poll-interval``, ``--pidfile``, ``--burst``, ``--max-jobs``,
``--log-level``/``--log-file``/``--log-format``, and a bad value as one line with exit status 2.

Workers run in their own processes on a SQLite file; each job's runs are counted in a file per job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_supervisor import make_workdir

from threaddispatch import _cli_worker, cli
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore
from threaddispatch.testing import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return make_workdir(tmp_path)


@pytest.fixture
def producer(workdir: Path) -> Iterator[JobEngine]:
    """An engine on the worker's SQLite file, to enqueue ``work`` jobs and read them back."""
    engine = JobEngine(SQLiteStore(str(workdir / "jobs.db")))
    engine.register("work", lambda ctx, payload: None, timeout=None)
    yield engine
    engine.store.close()


def worker(workdir: Path, *options: str) -> subprocess.Popen[str]:
    """``threaddispatch worker supmod:engine OPTIONS`` in its own process."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{workdir}", "STORE": f"sqlite:///{workdir / 'jobs.db'}",
           "MARKERS": str(workdir / "markers")}  # fmt: skip
    argv = [sys.executable, "-m", "threaddispatch", "worker", "supmod:engine", *options]
    return subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for a worker that exits by itself; (status, stdout, stderr)."""
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    return process.returncode, out, err


def runs(workdir: Path, n: int) -> int:
    path = workdir / "markers" / f"runs-{n}"
    return len(path.read_text().split()) if path.exists() else 0


# -- bad values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--processes", "0"], "processes"),
        (["--processes", "two"], "processes"),
        (["--processes", "100000"], "processes"),
        (["--concurrency", "0"], "concurrency"),
        (["--max-jobs", "0"], "max_jobs"),
        (["--max-poll-interval", "0"], "max_poll_interval"),
        (["--max-poll-interval", "nan"], "max_poll_interval"),
        (["--pidfile", "/no/such/directory/w.pid"], "/no/such/directory"),
        (["--log-file", "/no/such/directory/w.log"], "/no/such/directory"),
        (["--log-level", "LOUD"], "LOUD"),
        (["--log-format", "xml"], "xml"),
        (["--queues", " , "], "queue names"),
    ],
)
def test_a_bad_value_is_one_line_naming_it_with_exit_2(
    options: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _cli_worker.main(["supmod:engine", *options])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert options[0] in err and named in err
    with pytest.raises(SystemExit) as exited:  # the same through ``threaddispatch worker``
        cli.main(["worker", "supmod:engine", *options])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and options[0] in err and "Traceback" not in err


def test_max_poll_interval_below_the_engines_poll_interval_lowers_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--max-poll-interval 0.5`` on an engine polling every 1s: it idles at most 0.5s between looks."""
    (tmp_path / "tuned_engine_mod.py").write_text(textwrap.dedent(f"""
        from threaddispatch.jobs import JobEngine
        from threaddispatch.stores import SQLiteStore
        engine = JobEngine(SQLiteStore({str(tmp_path / "jobs.db")!r}), poll_interval=1.0, max_poll_interval=30.0)
    """))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tuned_engine_mod", raising=False)
    assert _cli_worker.main(["tuned_engine_mod:engine", "--max-poll-interval", "0.5", "--burst"]) == 0
    engine = sys.modules["tuned_engine_mod"].engine
    try:
        assert (engine.config.poll_interval, engine.config.max_poll_interval) == (0.5, 0.5)
        assert not engine.running
    finally:
        engine.store.close()


# -- --pidfile -----------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_pidfile_is_written_at_start_removed_at_stop_and_a_live_one_refused(workdir: Path, producer: JobEngine) -> None:
    pidfile = workdir / "worker.pid"
    job_id = producer.enqueue("work", {"n": 0, "gate": True})
    process = worker(workdir, "--pidfile", str(pidfile), "--burst")
    try:
        wait_for((workdir / "markers" / "at-gate").exists, 30, interval=0.02, message="the worker runs the job")
        assert pidfile.read_text() == f"{process.pid}\n"
        refused = subprocess.run([sys.executable, "-m", "threaddispatch", "worker", "supmod:engine", "--pidfile",
                                  str(pidfile)], cwd=workdir, env=os.environ | {"PYTHONPATH": str(ROOT)},
                                 capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert str(pidfile) in refused.stderr and str(process.pid) in refused.stderr
        (workdir / "markers" / "open").touch()
    finally:
        status, _out, err = finish(process)
    assert status == 0, err
    assert not pidfile.exists() and producer.get_job(job_id).state == "completed"

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=30)  # fmt: skip
    pidfile.write_text(gone.stdout)  # a stale pidfile: its process is gone
    status, _out, err = finish(worker(workdir, "--pidfile", str(pidfile), "--burst"))
    assert status == 0, err
    assert not pidfile.exists()


# -- --burst and --max-jobs -------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_burst_exits_0_once_no_job_is_due_leaving_delayed_ones(workdir: Path, producer: JobEngine) -> None:
    """Ready jobs are run; a job delayed to later does not keep the worker running, and stays pending."""
    ready = [producer.enqueue("work", {"n": n}) for n in range(5)]
    later = producer.enqueue("work", {"n": 99}, delay=3600)
    status, _out, err = finish(worker(workdir, "--burst", "--concurrency", "2"))
    assert status == 0, err
    assert [producer.get_job(job_id).state for job_id in ready] == ["completed"] * 5
    assert producer.get_job(later).state == "pending" and runs(workdir, 99) == 0
    assert [runs(workdir, n) for n in range(5)] == [1] * 5
    assert "burst: no job due nor running on ['default']: stopping" in err


@pytest.mark.timeout(90)
def test_burst_with_nothing_to_do_exits_at_once(workdir: Path, producer: JobEngine) -> None:
    status, _out, err = finish(worker(workdir, "--burst"))
    assert status == 0 and "worker stopped (clean)" in err, err


@pytest.mark.timeout(90)
def test_max_jobs_exits_0_after_n_jobs_and_hands_the_rest_back(workdir: Path, producer: JobEngine) -> None:
    """``--max-jobs 2`` with one thread: two jobs run, the others stay pending (none claimed and kept)."""
    job_ids = [producer.enqueue("work", {"n": n}) for n in range(6)]
    status, _out, err = finish(worker(workdir, "--max-jobs", "2", "--concurrency", "1"))
    assert status == 0, err
    counts = producer.counts()
    assert (counts["completed"], counts["pending"]) == (2, len(job_ids) - 2), counts
    assert sum(runs(workdir, n) for n in range(6)) == 2
    assert "ran 2 jobs (--max-jobs 2): stopped" in err


@pytest.mark.timeout(90)
def test_max_jobs_logs_the_jobs_that_ran_when_more_started_beside_the_last(workdir: Path, producer: JobEngine) -> None:
    """With four threads, jobs claimed with the 3rd may start beside it: the log counts what ran, not N."""
    for n in range(8):
        producer.enqueue("work", {"n": n})
    status, _out, err = finish(worker(workdir, "--max-jobs", "3", "--concurrency", "4"))
    assert status == 0, err
    ran = sum(runs(workdir, n) for n in range(8))
    assert 3 <= ran <= 6 and producer.counts()["completed"] == ran
    assert f"ran {ran} jobs (--max-jobs 3): stopped" in err


# -- logging ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_log_file_takes_the_log_as_json_lines(workdir: Path, producer: JobEngine) -> None:
    log = workdir / "worker.log"
    producer.enqueue("work", {"n": 0})
    status, _out, err = finish(worker(workdir, "--burst", "--log-file", str(log), "--log-format", "json"))
    assert status == 0 and err == "", err
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    messages = [line["message"] for line in lines if line["logger"] == "threaddispatch.worker"]
    assert messages[0].startswith("worker starting: supmod:engine") and messages[-1] == "worker stopped (clean)"
    assert any(line["logger"] == "threaddispatch.jobs" for line in lines)


@pytest.mark.timeout(90)
def test_log_level_warning_leaves_the_info_lines_out(workdir: Path, producer: JobEngine) -> None:
    log = workdir / "worker.log"
    producer.enqueue("work", {"n": 0})
    status, _out, err = finish(worker(workdir, "--burst", "--log-file", str(log), "--log-level", "warning"))
    assert status == 0, err
    assert runs(workdir, 0) == 1 and "INFO" not in log.read_text()


# -- the same options in Flask and Django --------------------------------------------------------------------------


def enqueue_records(directory: Path, name: str, count: int) -> None:
    """``count`` jobs ``name`` ({"n": n}) in the fixture apps' store, ``<directory>/jobs.db``."""
    engine = JobEngine(SQLiteStore(str(directory / "jobs.db")))
    try:
        engine.register(name, lambda ctx, payload: None)
        for n in range(count):
            engine.enqueue(name, {"n": n})
    finally:
        engine.store.close()


def check_same_lines(err: str, target: str) -> None:
    """The log lines of ``threaddispatch worker`` (as test_a_... shows for the CLI): start, processes, clean stop."""
    assert f"worker starting: {target} on {{'kind': 'SQLiteStore'" in err, err
    assert "concurrency=" in err and ", processes=2" in err and "worker process 2 started" in err
    assert "every worker process finished: no work left" in err and "worker stopped (clean)" in err


@pytest.mark.timeout(120)
def test_flask_worker_takes_the_same_options_and_prints_the_same_lines(tmp_path: Path) -> None:
    pytest.importorskip("flask")
    from tests.apps import count_runs

    enqueue_records(tmp_path, "record", 8)
    env = {**os.environ, "SHOP_DIR": str(tmp_path)}
    base = [sys.executable, "-m", "flask", "--app", "tests.apps.flask_shop:create_app()", "threaddispatch", "worker"]
    done = subprocess.run([*base, "--processes", "2", "--burst", "--max-poll-interval", "0.1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    check_same_lines(done.stderr, "threaddispatch.contrib.flask:current_engine")
    assert count_runs(tmp_path / "runs.db") == dict.fromkeys(range(8), 1)
    bad = subprocess.run([*base, "--processes", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 2 and "--processes" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(120)
def test_django_worker_takes_the_same_options_and_prints_the_same_lines(tmp_path: Path) -> None:
    pytest.importorskip("django")
    from tests.apps import count_runs

    enqueue_records(tmp_path, "shop.record", 8)
    env = {**os.environ, "SHOP_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "manage.py", "threaddispatch_worker"]
    project = ROOT / "tests" / "apps" / "django_project"
    done = subprocess.run([*base, "--processes", "2", "--burst", "--log-level", "INFO"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    check_same_lines(done.stderr, "threaddispatch.contrib.django.conf:get_engine")
    assert done.stdout.splitlines() == [
        "threaddispatch worker: djproject.jobs.engine, queues=['default'], concurrency=4, processes=2",
        "threaddispatch worker: stopped cleanly",
    ]
    assert count_runs(tmp_path / "runs.db") == dict.fromkeys(range(8), 1)
    bad = subprocess.run([*base, "--processes", "0"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 2 and "--processes" in bad.stderr and "Traceback" not in bad.stderr
