"""Store URLs at every entry point: open_store, PostgresStore and the CLI's ``--store`` share one split.

Offline checks point at 127.0.0.1:1 (nothing listens) or only build the store (PostgresStore
connects lazily); the live ones use the session's PostgreSQL server (trust authentication:
the password travels but is not checked, so they prove the rest of the URL is read right).
Every message, repr and ``describe()`` is searched for the password.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from threaddispatch.cli import main
from threaddispatch.errors import ConfigurationError, ThreadDispatchError
from threaddispatch.stores import SQLiteStore, open_store

pytestmark = pytest.mark.timeout(60)

SECRET = "Tr0ub4dor"
#: Passwords libpq or urlsplit used to misread, as written in a URL (raw or percent-encoded) and as meant.
PASSWORDS = [
    ("s3cr[et", "s3cr[et"),
    ("s3cr]et", "s3cr]et"),
    ("p@ss@word", "p@ss@word"),
    ("p:ss:word", "p:ss:word"),
    ("a@b:c[d]e?f#g", "a@b:c[d]e?f#g"),
    ("p%40ss%2Fw%5Bo%5Drd", "p@ss/w[o]rd"),
]
PG_ENV = ("PGPASSWORD", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGPASSFILE")


@pytest.fixture(autouse=True)
def _no_pg_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PG_ENV:
        monkeypatch.delenv(name, raising=False)


def pieces(password: str) -> list[str]:
    """The password and its pieces a wrong split could show (3+ characters between @ / : [ ] ? #)."""
    return [password, *(piece for piece in re.split(r"[@/:\[\]?#]", password) if len(piece) >= 3)]


def shows(text: str, password: str) -> list[str]:
    return [piece for piece in pieces(password) if piece in text]


def error_texts(error: BaseException) -> str:
    """str and repr of ``error`` and of everything chained to it."""
    texts: list[str] = []
    current: BaseException | None = error
    while current is not None:
        texts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return " ".join(texts)


# -- PostgresStore and open_store, no server -----------------------------------------------------------


@pytest.mark.parametrize(("written", "meant"), PASSWORDS)
@pytest.mark.parametrize("host", ["127.0.0.1:1", "[::1]:1"])
def test_a_password_with_url_characters_reaches_libpq_as_meant(written: str, meant: str, host: str) -> None:
    """open_store builds the PostgresStore; libpq reads the password, host and our schema as written."""
    pytest.importorskip("psycopg")
    from psycopg.conninfo import conninfo_to_dict

    store = open_store(f"postgresql://app:{written}@{host}/app?schema=jobs&sslmode=disable")
    try:
        params = conninfo_to_dict(store._dsn.conninfo)  # type: ignore[attr-defined]
        assert (params["user"], params["password"], params["dbname"]) == ("app", meant, "app")
        name = host.rpartition(":")[0].strip("[]")
        assert (params["host"], params["port"], params["sslmode"]) == (name, "1", "disable")
        assert store.describe()["schema"] == "jobs"
        shown = repr(store) + repr(dict(store.describe()))
        assert name in shown and "app" in shown
        assert shows(shown, meant) == [] and shows(shown, written) == [], shown
    finally:
        store.close()


@pytest.mark.parametrize(("written", "meant"), PASSWORDS)
def test_a_store_that_cannot_connect_never_shows_such_a_password(written: str, meant: str) -> None:
    """First use against a closed port: StoreUnavailableError naming host and port, no piece of the password."""
    pytest.importorskip("psycopg")
    store = open_store(f"postgresql://app:{written}@127.0.0.1:1/app")
    try:
        with pytest.raises(ThreadDispatchError) as caught:
            store.counts()
    finally:
        store.close()
    text = error_texts(caught.value)
    assert "127.0.0.1:1" in text
    assert shows(text, meant) == [] and shows(text, written) == [], text


@pytest.mark.parametrize(
    ("dsn", "named"),
    [
        (f"postgresql://app:{SECRET}@127.0.0.1:abc/app", "'abc'"),
        (f"postgresql://app:{SECRET}@[::1]:0/app", "'0'"),
        (f"postgresql://app:{SECRET}@h1:5432,h2:70000/app", "'70000'"),
        (f"postgresql://app:{SECRET}@127.0.0.1/app?port=99999", "'99999'"),
        (f"host=127.0.0.1 port=abc password={SECRET} dbname=app", "'abc'"),
        (f"host=h1,h2 port=5432,-1 password='{SECRET}'", "'-1'"),
        (f"postgresql://app:{SECRET}@[::1/app", "unclosed '['"),
        (f"mysql://app:{SECRET}@h/app", "postgresql://"),
    ],
)
def test_postgres_store_refuses_a_bad_dsn_at_the_constructor(dsn: str, named: str) -> None:
    """Bad port or host, URL or key=value: ConfigurationError at PostgresStore(), naming it, not the password."""
    pytest.importorskip("psycopg")
    from threaddispatch.stores.postgres import PostgresStore

    with pytest.raises(ConfigurationError) as caught:
        PostgresStore(dsn).close()
    assert named in str(caught.value)
    assert SECRET not in error_texts(caught.value)


def test_a_bad_pgport_is_refused_at_the_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no port in the DSN libpq takes PGPORT: a bad one is named at the constructor too."""
    pytest.importorskip("psycopg")
    from threaddispatch.stores.postgres import PostgresStore

    monkeypatch.setenv("PGPORT", "54x")
    with pytest.raises(ConfigurationError, match="PGPORT") as caught:
        PostgresStore(f"host=127.0.0.1 password={SECRET}")
    assert "'54x'" in str(caught.value)
    store = PostgresStore(f"host=127.0.0.1 port=1 password={SECRET}")  # the DSN's own port wins
    assert store.describe()["port"] == "1"
    store.close()


def test_a_libpq_key_value_dsn_still_works() -> None:
    """``host=... password=...`` goes to libpq as given: brackets, '@' and ':' in a quoted password are fine."""
    pytest.importorskip("psycopg")
    from psycopg.conninfo import conninfo_to_dict

    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore("host=::1 port=1 dbname=app user=app password='p@ss:w[o]rd'")
    try:
        assert conninfo_to_dict(store._dsn.conninfo)["password"] == "p@ss:w[o]rd"
        assert dict(store.describe()) | {"schema": None} == {
            "kind": "PostgresStore", "host": "::1", "port": "1", "dbname": "app", "schema": None,
        }  # fmt: skip
        assert "p@ss" not in repr(store)
    finally:
        store.close()


# -- the live server ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "meant"), PASSWORDS[::2])
def test_a_live_store_opened_with_such_a_password(pg_url: str, written: str, meant: str) -> None:
    """The server is reached as the URL's user, database and schema, with brackets and '@' in the password."""
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{written}@", 1)
    assert url != pg_url
    store = open_store(url)
    try:
        assert store.counts() is not None
        assert store.describe()["schema"] == "t_suite"
        assert shows(repr(store) + repr(dict(store.describe())), meant) == []
    finally:
        store.close()


# -- SQLite --------------------------------------------------------------------------------------------


def test_sqlite_urls_with_url_characters_in_the_path(tmp_path: Path) -> None:
    """open_store reads sqlite:/// paths holding '@', '[', ']' and ':' as the file they name."""
    target = tmp_path / "a@b[1]:c.db"
    store = open_store(f"sqlite:///{target}")
    try:
        assert isinstance(store, SQLiteStore) and store.path == str(target)
    finally:
        store.close()
    assert target.exists()


@pytest.mark.parametrize(
    "url", [f"sqlite://me:{SECRET}@host/x.db", f"sqlite://me:{SECRET}@[::1/x.db", "sqlite:///x.db?mode=ro"]
)
def test_a_bad_sqlite_url_is_refused_without_the_password(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host, a malformed host or a query: ConfigurationError naming the URL, masked; no file made."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match="SQLite") as caught:
        open_store(url)
    assert SECRET not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# -- the CLI's --store ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_store_environment() -> Iterator[None]:
    saved = os.environ.pop("THREADDISPATCH_STORE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["THREADDISPATCH_STORE"] = saved


def cli(*argv: str) -> tuple[int, str]:
    """``main(argv)`` in this process: (exit code, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with _no_store_environment(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"postgresql://app:{SECRET}@127.0.0.1:abc/app", "invalid port 'abc'"),
        (f"postgresql://app:{SECRET}@127.0.0.1:65536/app", "invalid port '65536'"),
        (f"postgresql://app:{SECRET}@[::1/app", "unclosed '['"),
        (f"postgresql://app:{SECRET}[x@127.0.0.1:1/app", "127.0.0.1:1 is unavailable"),
        (f"postgresql://app:{SECRET}@x@[::1]:1/app", "[::1]:1 is unavailable"),
        (f"sqlite://app:{SECRET}@h/x.db", "invalid SQLite store URL"),
    ],
)
def test_cli_store_errors_are_one_line_without_the_password(url: str, named: str) -> None:
    """``--store`` with a bad port or host, or an odd password to a closed port: exit 2, one line naming it."""
    if url.startswith("postgresql"):
        pytest.importorskip("psycopg")
    code, output = cli("jobs", "list", "--store", url)
    assert code == 2, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert named in output, output
    assert SECRET not in output, output


def test_cli_store_sqlite_path_with_url_characters(tmp_path: Path) -> None:
    """``migrate`` then ``jobs list`` on a SQLite file whose name holds '@' and brackets."""
    url = f"sqlite:///{tmp_path / 'jobs@[1].db'}"
    code, output = cli("jobs", "list", "--store", url)
    assert code == 2 and "no store file" in output, output
    assert cli("migrate", "--store", url)[0] == 0
    assert (tmp_path / "jobs@[1].db").exists()
    code, output = cli("jobs", "list", "--store", url)
    assert code == 0, output


def test_cli_store_postgres_url_with_a_bracketed_password(pg_url: str) -> None:
    """``jobs list --store`` on the live server with '[' and '@' in the URL's password: exit 0."""
    url = pg_url.replace("postgresql://postgres@", "postgresql://postgres:s3[cr]@t@", 1)
    code, output = cli("jobs", "list", "--store", url)
    assert code == 0, output
    assert "s3[cr]" not in output
