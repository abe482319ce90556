"""Shared fixtures: every test must leave no threaddispatch thread running; every store kind, one by one.

``STORE_FACTORIES`` names every Store the engine, admin, CLI and store-contract suites run
on. A test asking for ``store`` (or ``make_store``, or ``store_url``) runs once per kind:

- ``memory``: a MemoryStore (each one made is separate: memory stores share nothing);
- ``sqlite``: a SQLiteStore on a real file in ``tmp_path``;
- ``postgresql``: a PostgresStore on the session's PostgreSQL server (tests/pg_server.py,
  started on first use, one per session: under pytest-xdist, one per worker process), in
  one schema whose tables are emptied (DELETE) after each test: measured cheaper than a
  fresh schema per test (migration plus DROP SCHEMA), and far cheaper than CREATE DATABASE
  ... TEMPLATE. Without server binaries or psycopg these params skip; with ``CI`` set in
  the environment they fail instead.

A module whose tests are about some kinds only overrides ``store_kind`` with those params.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from threaddispatch.stores import MemoryStore, SQLiteStore, Store
from threaddispatch.testing import live_dispatch_threads

#: The schema the PostgreSQL params share, emptied after each test.
PG_SCHEMA = "t_suite"


def _postgres_store(url: str) -> Store:
    from threaddispatch.stores.postgres import PostgresStore

    return PostgresStore(url)


#: Store kind -> a function opening a store of that kind at a test's ``store_url``.
STORE_FACTORIES: dict[str, Callable[[str], Store]] = {
    "memory": lambda url: MemoryStore(),
    "sqlite": lambda url: SQLiteStore(url.removeprefix("sqlite:///")),
    "postgresql": _postgres_store,
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Spell out lone surrogates in a report's captured output: pytest-xdist cannot send them between its
    processes (an INTERNALERROR that ends the run), and the tests about undecodable text log such text."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    report.sections = [(title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
                       for title, text in report.sections]  # fmt: skip


#: The pytest params for the store kinds (PostgreSQL ones carry the ``postgres`` mark).
STORE_PARAMS = [
    pytest.param(kind, marks=[pytest.mark.postgres] if kind == "postgresql" else [], id=kind)
    for kind in sorted(STORE_FACTORIES)
]
#: The kinds whose stores, opened twice, share one database (two engines on one store).
SHARED_STORE_PARAMS = [param for param in STORE_PARAMS if param.id != "memory"]


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> object:
    """Fail a test that leaves a ``threaddispatch-*`` thread alive (after a short grace to exit)."""
    before = set(live_dispatch_threads())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        left = [t for t in live_dispatch_threads() if t not in before]
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"test left threads running: {[t.name for t in left]}")
        gc.collect()
        left[0].join(0.05)


# -- PostgreSQL -------------------------------------------------------------------------------------


def missing_postgres(reason: str) -> NoReturn:
    """Skip the test (no PostgreSQL here), or fail it when ``CI`` is set: CI must run them."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A PostgreSQL server for the whole session, in a temporary directory (as a non-root user)."""
    from pg_server import PostgresServer, find_bindir

    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing_postgres("psycopg is not installed: pip install 'threaddispatch[postgres]'")
    bindir = find_bindir()
    if bindir is None:
        missing_postgres("no PostgreSQL server binaries (initdb, pg_ctl) found on PATH, in /usr/local/bin or "
                         "/usr/lib/postgresql/*/bin; install PostgreSQL or set PG_BINDIR")  # fmt: skip
    server = PostgresServer(bindir)
    try:
        server.start()
    except Exception as error:
        server.stop()
        pytest.fail(f"could not start PostgreSQL from {bindir}: {error}")
    yield server
    server.stop()


@pytest.fixture
def new_schema(pg_server: Any) -> Iterator[str]:
    """A PostgreSQL schema no store has migrated yet (for migration and upgrade tests), dropped afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


class _SchemaEmptier:
    """Empties a schema's tables but the schema version, on one connection kept for the session.

    DELETE, not TRUNCATE: for the few rows a test leaves, measured 3 to 10 times cheaper
    (TRUNCATE makes new files for every table); identity values go on counting, which no
    test reads. A foreign key that refuses the order of the DELETEs falls back to TRUNCATE
    ... CASCADE. The connection is opened again after a server restart (tests restart it).
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None

    def empty(self, schema: str) -> None:
        import psycopg

        try:
            self._delete(schema)
        except psycopg.OperationalError:  # the kept session is gone (the server restarted): once more
            self.close()
            self._delete(schema)

    def _delete(self, schema: str) -> None:
        import psycopg
        from psycopg import sql

        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.dsn, autocommit=True, options="-c lock_timeout=10000")
        query = "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> 'dispatch_schema_version'"
        names = [sql.Identifier(schema, row[0]) for row in self.conn.execute(query, (schema,)).fetchall()]
        try:
            with self.conn.transaction():
                for name in names:
                    self.conn.execute(sql.SQL("DELETE FROM {}").format(name))
        except psycopg.errors.IntegrityError:
            self.conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(names)))

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@pytest.fixture(scope="session")
def _pg_emptier(pg_server: Any) -> Iterator[_SchemaEmptier]:
    emptier = _SchemaEmptier(pg_server.dsn)
    yield emptier
    emptier.close()


@pytest.fixture
def pg_url(pg_server: Any, _pg_emptier: _SchemaEmptier) -> Iterator[str]:
    """A URL for an empty job store on the session's server (tables emptied after the test)."""
    yield pg_server.url(schema=PG_SCHEMA)
    _pg_emptier.empty(PG_SCHEMA)


# -- every store ------------------------------------------------------------------------------------


@pytest.fixture(params=STORE_PARAMS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The kind of store the test runs on (a key of STORE_FACTORIES)."""
    kind: str = request.param
    return kind


@pytest.fixture
def store_url(store_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the test's store lives, as a URL ``open_store`` and the CLI accept (``memory://`` for memory)."""
    if store_kind == "memory":
        return "memory://"
    if store_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def make_store(store_kind: str, store_url: str) -> Iterator[Callable[[], Store]]:
    """Open stores of the test's kind at its ``store_url`` (SQLite and PostgreSQL share data); closed at the end."""
    made: list[Store] = []

    def make() -> Store:
        opened = STORE_FACTORIES[store_kind](store_url)
        made.append(opened)
        return opened

    yield make
    for opened in made:
        opened.close()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    """A fresh, empty store of every kind in turn."""
    return make_store()


@pytest.fixture
def traced() -> Iterator[tuple[Any, Any]]:
    """An OpenTelemetry SDK ``(TracerProvider, InMemorySpanExporter)`` pair that records every finished span.

    Skips the test when the SDK (the ``otel`` extra) is missing; shut down after the test.
    """
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()
