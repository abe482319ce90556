"""``import threaddispatch`` and the CLI start fast: names are imported on first use (PEP 562).

What a fresh interpreter loads is checked in a subprocess (this test process has imported
everything already): the modules an import *adds* to ``sys.modules``, so a module the
interpreter loaded before (``site``, a ``.pth`` file) never counts. The public API stays the
same: every ``__all__`` name resolves to its submodule's object, ``dir`` lists it, ``import *``
binds it, and mypy sees the real types.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import threaddispatch
import threaddispatch.stores

ROOT = Path(__file__).resolve().parent.parent

#: Loaded by no face at import: the engine, the stores, the CLI's tools, asyncio.
HEAVY = ("asyncio", "sqlite3", "threaddispatch.jobs", "threaddispatch.stores.sqlite", "threaddispatch.stores.memory")


def _loaded_by(statements: str) -> set[str]:
    """The modules that running ``statements`` in a fresh interpreter adds to ``sys.modules``."""
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"{statements}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    added: list[str] = json.loads(done.stdout.splitlines()[-1])
    return set(added)


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# -- what an import loads ------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_import_threaddispatch_loads_no_submodule() -> None:
    """A bare ``import threaddispatch`` loads the package and its lazy-name helper: no face, store, asyncio."""
    added = _loaded_by("import threaddispatch")
    assert sorted(name for name in added if name.startswith("threaddispatch.")) == ["threaddispatch._lazy"]
    assert not added & {"asyncio", "sqlite3", "json", "concurrent.futures", "uuid", "socket"}


@pytest.mark.timeout(180)
def test_background_dispatcher_loads_neither_the_engine_nor_asyncio() -> None:
    """``from threaddispatch import BackgroundDispatcher`` loads its face: no jobs, stores, asyncio, sqlite3."""
    added = _loaded_by("from threaddispatch import BackgroundDispatcher")
    assert "threaddispatch.background" in added
    assert not added & {*HEAVY, "threaddispatch.stores", "threaddispatch.requests", "threaddispatch.endpoint"}


@pytest.mark.timeout(180)
def test_job_engine_loads_no_store_implementation_nor_asyncio() -> None:
    """``from threaddispatch import JobEngine`` loads the engine: no SQLite store, asyncio, uuid, socket, zoneinfo."""
    added = _loaded_by("from threaddispatch import JobEngine")
    assert "threaddispatch.jobs" in added
    assert not added & {"asyncio", "sqlite3", "uuid", "socket", "threaddispatch.stores.sqlite"}
    assert not added & {"threaddispatch.background", "threaddispatch.stores.postgres"}
    assert "zoneinfo" not in added  # the tz database: for a cron schedule given a zone name


@pytest.mark.timeout(180)
def test_request_dispatcher_loads_no_request_storage_until_given_one() -> None:
    """``RequestDispatcher`` without ``storage=`` loads no request storage (sqlite3, datetime) nor secrets."""
    added = _loaded_by("from threaddispatch import RequestDispatcher\nRequestDispatcher(lambda r: r).close()")
    assert "threaddispatch.requests" in added
    assert not added & {*HEAVY, "threaddispatch.request_storage", "threaddispatch._request_persist", "secrets"}


@pytest.mark.timeout(180)
def test_the_stores_package_loads_no_store() -> None:
    """``import threaddispatch.stores`` (every ``threaddispatch.stores.*`` import does it) loads no store."""
    added = _loaded_by("import threaddispatch.stores")
    assert not added & {*HEAVY, "threaddispatch.stores.base", "threaddispatch.stores.postgres", "psycopg"}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("argv", [["--help"], ["jobs", "--help"], ["worker", "--help"]])
def test_cli_help_loads_neither_the_engine_nor_the_bench_tools(argv: list[str]) -> None:
    """``threaddispatch --help`` builds the parser alone: no engine, store, asyncio, sqlite3, bench harness."""
    added = _loaded_by(
        "import contextlib, io\n"
        "from threaddispatch.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})"
    )
    assert "threaddispatch.cli" in added
    assert not added & {*HEAVY, "threaddispatch._bench_curves", "threaddispatch.admin", "subprocess"}
    assert not added & {"logging.handlers", "statistics", "threaddispatch.background"}


@pytest.mark.timeout(180)
def test_the_flask_glue_loads_neither_the_admin_api_nor_background() -> None:
    """``threaddispatch.contrib.flask`` loads the admin API when it is mounted, BackgroundDispatcher when used."""
    pytest.importorskip("flask")
    added = _loaded_by("import threaddispatch.contrib.flask")
    assert "threaddispatch.contrib.flask" in added
    assert not added & {"threaddispatch.admin", "threaddispatch.background", "sqlite3", "asyncio"}


@pytest.mark.timeout(180)
def test_the_django_settings_module_loads_no_admin_api() -> None:
    """``threaddispatch.contrib.django`` (the app Django imports at start) loads the admin API when mounted."""
    pytest.importorskip("django")
    added = _loaded_by("import threaddispatch.contrib.django")
    assert "threaddispatch.contrib.django.conf" in added
    assert not added & {"threaddispatch.admin", "threaddispatch.background"}


# -- the lazily loaded parts still work ----------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_coroutine_runs_where_asyncio_was_not_loaded() -> None:
    """``invoke`` of an ``async def`` in a fresh process loads asyncio then and runs it; the loop closes."""
    code = textwrap.dedent(
        """
        import sys
        from threaddispatch._invoke import call, close_thread_loop, invoke
        assert "asyncio" not in sys.modules
        async def answer(x):
            return x + 1
        print(invoke(answer, 41), call(answer, 1).value, "asyncio" in sys.modules)
        close_thread_loop()
        """
    )
    assert _run(code) == "42 2 True"


@pytest.mark.timeout(180)
def test_a_submodule_is_an_attribute_after_a_bare_import() -> None:
    """``import threaddispatch`` then ``threaddispatch.jobs`` works, as when the package imported everything."""
    code = (
        "import threaddispatch, threaddispatch.stores as stores\n"
        "print(threaddispatch.jobs.JobEngine.__name__, threaddispatch.errors.StoreError.__name__,"
        " stores.sqlite.SQLiteStore.__name__, stores.memory.MemoryStore.__name__)"
    )
    assert _run(code) == "JobEngine StoreError SQLiteStore MemoryStore"


# -- the public API is the same ------------------------------------------------------------------------


def test_every_public_name_is_its_submodule_object() -> None:
    """Each ``__all__`` name resolves, to the very object its submodule defines; the table lists every one."""
    exports = threaddispatch._EXPORTS
    assert set(threaddispatch.__all__) == {*exports, "__version__"}
    for name, module in exports.items():
        assert getattr(threaddispatch, name) is getattr(importlib.import_module(f"threaddispatch.{module}"), name)
    assert isinstance(threaddispatch.__version__, str)


def test_every_store_name_is_its_submodule_object() -> None:
    """Each ``threaddispatch.stores.__all__`` name resolves (PostgresStore when psycopg is installed)."""
    stores = threaddispatch.stores
    for name in stores.__all__:
        if name == "PostgresStore":
            pytest.importorskip("psycopg")
        value = getattr(stores, name)
        if name != "open_store":
            assert value is getattr(importlib.import_module(f"threaddispatch.stores.{stores._EXPORTS[name]}"), name)


def test_dir_lists_every_public_name() -> None:
    assert set(threaddispatch.__all__) <= set(dir(threaddispatch))
    assert set(threaddispatch.stores.__all__) <= set(dir(threaddispatch.stores))


def test_an_unknown_attribute_raises_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="'threaddispatch' has no attribute 'NoSuchThing'"):
        getattr(threaddispatch, "NoSuchThing")  # getattr: mypy knows there is no such name
    with pytest.raises(AttributeError, match="NoSuchStore"):
        threaddispatch.stores.NoSuchStore
    with pytest.raises(ImportError, match="NoSuchThing"):
        exec("from threaddispatch import NoSuchThing", {})
    assert not hasattr(threaddispatch, "_background")  # a private module is no attribute by the table


@pytest.mark.timeout(180)
def test_import_star_binds_every_public_name() -> None:
    """``from threaddispatch import *`` in a fresh interpreter binds each ``__all__`` name, nothing private."""
    code = (
        "namespace = {}\n"
        "exec('from threaddispatch import *', namespace)\n"
        "import threaddispatch\n"
        "names = sorted(set(namespace) - {'__builtins__'})\n"
        "assert names == sorted(threaddispatch.__all__), names\n"
        "assert all(namespace[name] is getattr(threaddispatch, name) for name in names)\n"
        "print(len(names))"
    )
    assert _run(code) == str(len(threaddispatch.__all__))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mypy_sees_the_real_types_of_the_lazy_names(tmp_path: Path) -> None:
    """mypy --strict types ``threaddispatch.X`` as the class itself (the TYPE_CHECKING imports), not Any,
    and an unknown ``threaddispatch.X`` is still an error for it."""
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "import threaddispatch\n"
        "from threaddispatch import JobEngine\n"
        "from threaddispatch.stores import SQLiteStore\n"
        "a: int = threaddispatch.BackgroundDispatcher\n"
        "b: int = JobEngine\n"
        "c: int = SQLiteStore\n"
        "d = threaddispatch.NoSuchThing\n",
        encoding="utf-8",
    )
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nstrict = True\npython_version = 3.10\nmypy_path = {ROOT}\n", encoding="utf-8")
    args = ["--config-file", str(config), "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"]
    stdout, stderr, status = api.run([*args, "--show-error-codes", "--follow-imports=silent", str(snippet)])
    assert not stderr, stderr
    assert status == 1, stdout
    errors = [line for line in stdout.splitlines() if "error:" in line]
    assert len(errors) == 4, stdout
    for line, name in zip(errors, ("BackgroundDispatcher", "JobEngine", "SQLiteStore"), strict=False):
        assert "[assignment]" in line and name in line, line
    assert "NoSuchThing" in errors[3] and "[attr-defined]" in errors[3], errors[3]  # no __getattr__ for mypy
