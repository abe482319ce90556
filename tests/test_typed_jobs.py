"""Typed jobs: ``@engine.job`` returns a JobHandle that enqueues by handle, typed from the handler."""

from __future__ import annotations

import inspect
import re
import runpy
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from threaddispatch._job_handle import JobHandle
from threaddispatch.errors import ConfigurationError, PayloadError
from threaddispatch.jobs import JobContext, JobEngine
from threaddispatch.stores import MemoryStore, SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
TYPING_CASES = ROOT / "tests" / "typing" / "jobs_typed.py"


def _engine(**options: Any) -> JobEngine:
    return JobEngine(MemoryStore(), **options)


def test_decorator_returns_a_handle_with_name_queue_and_definition() -> None:
    """The handle shows the registration: name, queue, definition; the engine runs the same handler."""
    engine = _engine()

    @engine.job("send_email", queue="mail", priority=3, max_retries=1)
    def send_email(ctx: JobContext, payload: dict[str, str]) -> str:
        """Send one email."""
        return payload["to"]

    assert isinstance(send_email, JobHandle)
    assert send_email.name == "send_email"
    assert send_email.queue == "mail"
    assert send_email.definition == engine.definitions()["send_email"]
    assert (send_email.definition.priority, send_email.definition.max_retries) == (3, 1)
    assert send_email.__name__ == "send_email"  # type: ignore[attr-defined]  # set by functools.update_wrapper
    assert send_email.__doc__ == "Send one email."
    assert list(inspect.signature(send_email).parameters) == ["ctx", "payload"]
    assert "send_email" in repr(send_email)


def test_name_defaults_to_the_function_name_and_the_handle_stays_callable() -> None:
    """Without a name the function's is used; calling the handle calls the handler directly."""
    engine = _engine()

    @engine.job()
    def double(ctx: object, payload: int) -> int:
        return payload * 2

    assert double.name == "double"
    assert double(None, 21) == 42  # type: ignore[arg-type]
    assert engine.definitions()["double"].fn is double.__wrapped__  # type: ignore[attr-defined]  # update_wrapper


def test_enqueue_through_the_handle_runs_the_job() -> None:
    """handle.enqueue stores a job of the handle's name; the engine runs it with the payload."""
    engine = _engine()
    seen: list[dict[str, str]] = []

    @engine.job("send_email")
    def send_email(ctx: JobContext, payload: dict[str, str]) -> str:
        seen.append(payload)
        return payload["to"]

    job_id = send_email.enqueue({"to": "a@b.c"}, priority=5, unique_key="welcome:a@b.c")
    job = engine.get_job(job_id)
    assert (job.name, job.priority, job.unique_key) == ("send_email", 5, "welcome:a@b.c")
    assert send_email.enqueue({"to": "x@y.z"}, unique_key="welcome:a@b.c") == job_id
    assert engine.run_pending() == 1
    assert seen == [{"to": "a@b.c"}]
    assert engine.result(job_id, timeout=5) == "a@b.c"


def test_enqueue_many_and_the_string_api_still_work() -> None:
    """handle.enqueue_many stores one job per payload in order; engine.enqueue(name, ...) still works."""
    engine = _engine()

    @engine.job("square", queue="maths")
    def square(ctx: JobContext, payload: int) -> int:
        return payload * payload

    ids = square.enqueue_many([1, 2, 3], delay=0)
    ids.append(engine.enqueue("square", 4))
    assert [engine.get_job(job_id).queue for job_id in ids] == ["maths"] * 4
    assert square.enqueue_many([]) == []
    assert engine.run_pending(queues=["maths"]) == 4
    assert [engine.result(job_id, timeout=5) for job_id in ids] == [1, 4, 9, 16]


def test_enqueue_options_are_checked_as_the_engine_checks_them() -> None:
    """A bad option or payload through the handle raises the engine's error, naming the value."""
    engine = _engine()

    @engine.job("noop")
    def noop(ctx: JobContext, payload: object) -> None:
        return None

    with pytest.raises(ConfigurationError, match="priority"):
        noop.enqueue(None, priority="high")  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="noop"):
        noop.enqueue({1, 2})
    with pytest.raises(ConfigurationError, match="run_at or delay"):
        noop.enqueue_many([1], run_at=0.0, delay=1.0)


@pytest.mark.parametrize(("method", "engine_method"), [("enqueue", "enqueue"), ("enqueue_many", "enqueue_many")])
def test_handle_takes_the_engines_keywords(method: str, engine_method: str) -> None:
    """The handle's enqueue methods take exactly the engine's keywords (a new engine option needs forwarding)."""

    def keywords(fn: Any) -> dict[str, object]:
        params = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    assert keywords(getattr(JobHandle, method)) == keywords(getattr(JobEngine, engine_method))


def test_handle_forwards_dependencies_and_makes_chain_steps() -> None:
    """depends_on and on_dependency_failure go through the handle; handle.spec makes a step of engine.chain."""
    engine = _engine()

    @engine.job("step")
    def step(ctx: JobContext, payload: int) -> int:
        results: list[int] = ctx.engine.dependency_results(ctx)
        return payload + sum(results)

    first = step.enqueue(1)
    (second,) = step.enqueue_many([2], depends_on=[first], on_dependency_failure="run")
    third = step.enqueue(3, depends_on=[second])
    assert engine.get_job(third).depends_on == (second,)
    assert engine.get_job(second).on_dependency_failure == "run"
    chained = engine.chain(step.spec(10), step.spec(20, priority=4))
    assert engine.get_job(chained[1]).priority == 4
    assert engine.run_pending() == 5
    assert (engine.result(third, timeout=5), engine.result(chained[1], timeout=5)) == (6, 30)


@pytest.mark.timeout(60)
def test_handle_enqueue_on_a_started_sqlite_engine(tmp_path: Path) -> None:
    """On a started engine over a SQLite file, a job enqueued by handle runs on a worker."""
    engine = JobEngine(SQLiteStore(str(tmp_path / "jobs.db")), poll_interval=0.01, max_poll_interval=0.05)

    @engine.job("greet")
    def greet(ctx: JobContext, payload: str) -> str:
        return f"hello {payload}"

    engine.start()
    try:
        assert engine.result(greet.enqueue("world"), timeout=30) == "hello world"
    finally:
        engine.stop(10)


def test_immediate_engine_runs_a_handle_enqueue_at_once() -> None:
    """With immediate=True the job enqueued by handle has run when enqueue returns."""
    engine = _engine(immediate=True)

    @engine.job("echo")
    def echo(ctx: JobContext, payload: list[int]) -> int:
        return sum(payload)

    assert engine.result(echo.enqueue([1, 2, 3]), timeout=0) == 6


# -- typing: mypy --strict on snippets, mypy's own test pattern (``# E: <message>`` on the line) --------

SNIPPET = """
    from threaddispatch.jobs import JobContext, JobEngine
    from threaddispatch.stores import MemoryStore

    engine = JobEngine(MemoryStore())

    @engine.job("send_email")
    def send_email(ctx: JobContext, payload: dict[str, str]) -> bool:
        return True

    send_email.enqueue({"to": "a@b.c"}, delay=5)
    send_email.enqueue(42)  # E: Argument 1 to "enqueue" of "JobHandle" has incompatible type "int"; expected "dict[str, str]"
    send_email.enqueue_many([{"to": "a"}, {"to": 1}])  # E: Dict entry 0 has incompatible type "str": "int"; expected "str": "str"
    send_email.enqueue({"to": "a"}, delay="soon")  # E: Argument "delay" to "enqueue" of "JobHandle" has incompatible type "str"; expected "float | None"
    send_email.enqueue({"to": "a"}, colour="x")  # E: Unexpected keyword argument "colour" for "enqueue" of "JobHandle"
    flag: str = send_email(None, {})  # type: ignore[arg-type]  # E: Incompatible types in assignment (expression has type "bool", variable has type "str")
"""  # noqa: E501


def _expected_errors(source: str) -> list[tuple[int, str]]:
    return [
        (number, line.split("# E: ", 1)[1].strip())
        for number, line in enumerate(source.splitlines(), start=1)
        if "# E: " in line
    ]


def _mypy(tmp_path: Path, source: str, *targets: str) -> tuple[str, int]:
    api = pytest.importorskip("mypy.api")
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nstrict = True\npython_version = 3.10\nmypy_path = {ROOT}\n", encoding="utf-8")
    args = ["--config-file", str(config), "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"]
    args += ["--show-error-codes", "--hide-error-context", "--no-pretty", *targets]
    stdout, stderr, status = api.run(args)
    assert not stderr, stderr
    return stdout, status


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mypy_reports_a_wrong_payload_type(tmp_path: Path) -> None:
    """mypy --strict reports each line marked ``# E:`` of the snippet, and nothing in tests/typing."""
    source = textwrap.dedent(SNIPPET)
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source, encoding="utf-8")
    stdout, status = _mypy(tmp_path, source, str(snippet), str(TYPING_CASES))
    found = []
    for line in stdout.splitlines():
        if ": note: " in line:
            continue
        match = re.match(r".*snippet\.py:(\d+): error: (.*?)(  \[[a-z-]+\])?$", line)
        assert match, line
        found.append((int(match[1]), match[2]))
    assert status == 1
    assert found == _expected_errors(source)


def test_the_typing_cases_run_and_are_in_the_mypy_config() -> None:
    """tests/typing/jobs_typed.py runs as written, and the repository's mypy config checks tests/typing."""
    runpy.run_path(str(TYPING_CASES))
    # tomllib from Python 3.11; on 3.10 mypy's own dependency tomli is the same parser.
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mypy = config["tool"]["mypy"]
    case = TYPING_CASES.relative_to(ROOT).as_posix()
    assert any(case.startswith(f"{entry.rstrip('/')}/") for entry in mypy["files"])  # tests/typing or a parent
    assert not any(re.search(pattern, case) for pattern in mypy.get("exclude", []))
