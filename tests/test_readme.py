"""README.rst runs as written: every Python block, in order, and the command lines it shows.

The Python blocks run top to bottom in one namespace (as a reader pastes them into one
session), in a fresh directory, with the network replaced by a local sink: a stand-in
``requests`` module records every call and answers as the block expects. Everything the
blocks start is closed at the end, so the suite's no-thread-left check holds. The
Django block pair (``# settings.py`` then ``# urls.py``) runs in a subprocess, where
``settings.configure`` cannot clash with the Django tests. Command lines of the
``threaddispatch`` CLI run against a SQLite file; the ones that serve or run a worker
forever (``worker``, ``serve``) are checked with ``--help``, and ``curl``/``manage.py``
lines are left to the admin and Django suites, which test the same calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"


def _subprocess_env(**extra: str) -> dict[str, str]:
    """The environment now, importing this checkout whatever the directory and the install."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Block:
    """One ``.. code-block::`` of the README: its language, first line number and text."""

    language: str
    line: int
    code: str


def readme_blocks() -> list[Block]:
    """Every code block of README.rst, in order, dedented."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = re.match(r"\.\. code-block:: (\w+)\s*$", lines[index])
        index += 1
        if not match:
            continue
        body: list[str] = []
        while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
            body.append(lines[index])
            index += 1
        code = textwrap.dedent("\n".join(body)).strip("\n")
        blocks.append(Block(match.group(1), index - len(body), code))
    return blocks


# -- the local sink standing in for the network --------------------------------------------------------


class FakeResponse:
    """What the stand-in ``requests`` answers: the JSON a block's code expects back."""

    def __init__(self, url: str, payload: Any) -> None:
        self.url = url
        self.payload = payload
        self.status_code = 200

    def json(self) -> Any:
        if isinstance(self.payload, list):  # a batch: one ``{"ok": True}`` per item
            return [{"ok": True} for _ in self.payload]
        return {"url": self.url, "echo": self.payload}

    def raise_for_status(self) -> None:
        return None


class Sink:
    """Every call the blocks made to the network, as ``(method, url, payload)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def module(self) -> types.ModuleType:
        sink = self

        def post(url: str, json: Any = None, **_options: Any) -> FakeResponse:
            sink.calls.append(("POST", url, json))
            return FakeResponse(url, json)

        class Session:
            def request(self, method: str, url: str, params: Any = None, **_options: Any) -> FakeResponse:
                sink.calls.append((method, url, params))
                return FakeResponse(url, params)

        fake = types.ModuleType("requests")
        fake.post = post  # type: ignore[attr-defined]
        fake.Session = Session  # type: ignore[attr-defined]
        return fake


def _close_everything(values: list[object]) -> None:
    """Close what the blocks made, newest first: dispatchers, engines, stores, the Flask glue."""
    from threaddispatch import JobEngine

    for value in reversed(values):
        with contextlib.suppress(Exception):
            if isinstance(value, JobEngine):
                value.stop(timeout=5)
                value.store.close()
            elif hasattr(value, "shutdown") and type(value).__module__.startswith("threaddispatch"):
                value.shutdown(timeout=5)
            elif hasattr(value, "stop") and type(value).__name__ == "AsyncDispatcher":
                value.stop(timeout=5)
            elif hasattr(value, "close") and type(value).__module__.startswith("threaddispatch"):
                value.close(timeout=5)


def _owned(namespace: dict[str, Any], seen: dict[int, object]) -> None:
    """Remember every threaddispatch object the namespace holds (a later block may rebind its name)."""
    for value in list(namespace.values()):
        module = type(value).__module__ or ""
        if module.startswith("threaddispatch") and id(value) not in seen:
            seen[id(value)] = value
    dispatch = namespace.get("dispatch")
    if dispatch is not None and id(dispatch) in seen:
        with contextlib.suppress(Exception):
            engine = dispatch.engine
            seen.setdefault(id(engine), engine)


@pytest.fixture
def in_fresh_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in an empty directory with the token the blocks read from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("THREADDISPATCH_TOKEN", "readme-token")
    yield tmp_path


def _database_url(request: pytest.FixtureRequest) -> str | None:
    """The session's PostgreSQL server for the PostgreSQL block, or None where none can start
    (conftest's ``pg_server`` skips locally and fails on CI, where the block must run)."""
    try:
        server = request.getfixturevalue("pg_server")
    except pytest.skip.Exception:
        return None
    return str(server.dsn)


def test_every_python_block_runs_in_order(
    in_fresh_directory: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Each Python block of README.rst runs without error, in one namespace, top to bottom."""
    sink = Sink()
    monkeypatch.setitem(sys.modules, "requests", sink.module())
    database_url = _database_url(request)
    if database_url:
        monkeypatch.setenv("DATABASE_URL", database_url)
    root = logging.getLogger()
    handlers_before = list(root.handlers)
    namespace: dict[str, Any] = {"__name__": "readme"}
    made: dict[int, object] = {}
    ran = 0
    try:
        for block in readme_blocks():
            if block.language != "python" or block.code.startswith(("# settings.py", "# urls.py")):
                continue
            if 'os.environ["DATABASE_URL"]' in block.code and not database_url:
                continue  # no PostgreSQL server here; on CI the server is always there
            try:
                exec(compile(block.code, f"README.rst:{block.line}", "exec"), namespace)
            except Exception as error:
                pytest.fail(f"README.rst block at line {block.line} raised {error!r}:\n{block.code}")
            _owned(namespace, made)
            ran += 1
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers_before:
                root.removeHandler(handler)
                handler.close()
        _close_everything(list(made.values()))
        if database_url:
            _drop_schema(database_url, "jobs")
    assert ran >= 10
    posted = {url for method, url, _ in sink.calls if method == "POST"}
    assert "https://logs.example.com/bulk" in posted  # the quickstart and BackgroundDispatcher blocks sent
    assert "https://hooks.example.com/7" in posted  # the EndpointBatchDispatcher block delivered its job


def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_the_django_blocks_configure_a_project(in_fresh_directory: Path) -> None:
    """The ``# settings.py`` and ``# urls.py`` blocks make a Django project whose admin URL resolves."""
    pytest.importorskip("django")
    blocks = {b.code.splitlines()[0]: b.code for b in readme_blocks() if b.language == "python"}
    (in_fresh_directory / "settings.py").write_text(
        blocks["# settings.py"] + '\nROOT_URLCONF = "urls"\nSECRET_KEY = "readme"\nALLOWED_HOSTS = ["testserver"]\n',
        encoding="utf-8",
    )
    (in_fresh_directory / "urls.py").write_text(blocks["# urls.py"] + "\n", encoding="utf-8")
    project = in_fresh_directory / "myproject"
    project.mkdir()
    (project / "__init__.py").write_text("", encoding="utf-8")
    (project / "jobs.py").write_text(
        "from threaddispatch import JobEngine\nfrom threaddispatch.stores import MemoryStore\n"
        "engine = JobEngine(MemoryStore())\n",
        encoding="utf-8",
    )
    script = textwrap.dedent(
        """
        import os, sys
        sys.path.insert(0, os.getcwd())
        os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
        import django
        django.setup()
        from django.core.management import call_command
        call_command("check")
        from django.test import Client
        response = Client().get("/api/dispatch/health", HTTP_AUTHORIZATION="Bearer readme-token")
        print(response.status_code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=in_fresh_directory,
        env=_subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "200", result.stdout + result.stderr


def _cli_lines() -> list[str]:
    """The ``threaddispatch ...`` command lines of the README's console blocks (install lines excluded)."""
    lines: list[str] = []
    for block in readme_blocks():
        if block.language != "console":
            continue
        for raw in block.code.splitlines():
            line = raw.strip().removeprefix("$ ")
            line = line.split("  #", 1)[0].strip()
            words = shlex.split(line) if line and not line.startswith("#") else []
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # an environment assignment before the command
            if words and words[0] == "threaddispatch":
                lines.append(" ".join(shlex.quote(word) for word in words))
    return lines


def test_every_cli_line_runs(in_fresh_directory: Path) -> None:
    """Each ``threaddispatch`` line of the README runs on a SQLite file (serving ones answer ``--help``)."""
    from threaddispatch import JobEngine
    from threaddispatch.stores import SQLiteStore

    lines = _cli_lines()
    assert any(line.startswith("threaddispatch migrate") for line in lines)
    store = SQLiteStore(in_fresh_directory / "jobs.db")
    engine = JobEngine(store, immediate=True)

    def broken(ctx: object, payload: object) -> None:
        raise RuntimeError("fails, so the README's `jobs retry <id>` has a failed job to retry")

    engine.register("broken", broken, max_retries=0)
    failed_id = engine.enqueue("broken", {})
    assert engine.get_job(failed_id).state.value == "failed"
    store.close()
    commands: list[list[str]] = []
    for line in lines:
        words = shlex.split(line)[1:]
        if words[0] == "bench":
            continue  # the main job: .ci/run and the README's first command run it
        if words[0] in ("worker", "serve"):
            words = [words[0], "--help"]
        commands.append([failed_id if word == "<id>" else word for word in words])
    # One interpreter runs them all through the console script's main(), as the shell would.
    driver = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from threaddispatch.cli import main
        results = []
        for words in json.loads(sys.argv[1]):
            err = io.StringIO()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    code = main(words)
            except SystemExit as exit:
                code = exit.code
            results.append([words, code or 0, err.getvalue()])
        print(json.dumps(results))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=in_fresh_directory,
        env=_subprocess_env(THREADDISPATCH_STORE="sqlite:///jobs.db"),
    )
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(outcomes) == len(commands)
    for words, code, stderr in outcomes:
        assert code == 0, f"threaddispatch {' '.join(words)}: exit {code}: {stderr}"
