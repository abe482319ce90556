"""Where a PostgreSQL store is, as its messages and repr show it: ``host:port/dbname``, an IPv6 host in brackets.

``[::1]:5432/app``, as a URL writes it, not ``::1:5432/app`` (which reads as a host
``::1:5432`` with no port); each host of a libpq host list with its own port, one port
shared by every host when only one is given. Shown from what libpq read (URL or
``key=value`` DSN), never with the password. ``describe()`` keeps the bare host and port.
"""

from __future__ import annotations

import pytest

from threaddispatch._dsn import host_port
from threaddispatch.errors import StoreUnavailableError, ThreadDispatchError

pytestmark = pytest.mark.timeout(60)

SECRET = "Tr0ub4dor"
PG_ENV = ("PGPASSWORD", "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGPASSFILE")


@pytest.fixture(autouse=True)
def _no_pg_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PG_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("host", "port", "shown"),
    [
        ("db.example", "5432", "db.example:5432"),
        ("127.0.0.1", "1", "127.0.0.1:1"),
        ("::1", "5432", "[::1]:5432"),
        ("2001:db8::7", "6543", "[2001:db8::7]:6543"),
        ("fe80::1%eth0", "5432", "[fe80::1%eth0]:5432"),
        ("h1,::1,h3", "5432,5433,5434", "h1:5432,[::1]:5433,h3:5434"),
        ("h1,::1", "5433", "h1:5433,[::1]:5433"),  # one port for every host, as libpq reads it
        ("h1,::1", "5432,", "h1:5432,[::1]"),  # an empty port is libpq's default: none shown
        ("/var/run/postgresql", "5432", "/var/run/postgresql:5432"),  # a socket directory is no IPv6 address
        ("h1,h2,h3", "5432,5433", "h1,h2,h3:5432,5433"),  # counts libpq would refuse: shown as they are
    ],
)
def test_host_port(host: str, port: str, shown: str) -> None:
    """host:port as a URL writes it, each host with its port; an IPv6 address in brackets."""
    assert host_port(host, port) == shown


@pytest.mark.parametrize(
    ("dsn", "where"),
    [
        (f"postgresql://app:{SECRET}@[::1]:5432/app", "[::1]:5432/app"),
        (f"postgresql://app:{SECRET}@[::1]/app", "[::1]:5432/app"),
        (f"postgresql://app:{SECRET}@[2001:db8::7]:6543/app?schema=jobs", "[2001:db8::7]:6543/app"),
        (f"postgresql://app:{SECRET}@h1:5432,[::1]:5433/app", "h1:5432,[::1]:5433/app"),
        (f"postgresql://app:{SECRET}@127.0.0.1:1/app", "127.0.0.1:1/app"),
        (f"host=::1 port=5433 dbname=app password={SECRET}", "[::1]:5433/app"),
        (f"host=h1,::1 port=5433 dbname=app password={SECRET}", "h1:5433,[::1]:5433/app"),
        (f"hostaddr=::1 dbname=app password={SECRET}", "[::1]:5432/app"),
        ("host=/var/run/postgresql dbname=app", "/var/run/postgresql:5432/app"),
    ],
)
def test_the_repr_shows_an_ipv6_host_in_brackets(dsn: str, where: str) -> None:
    """``<PostgresStore [::1]:5432/app ...>``; describe() keeps the bare host and port; no password anywhere."""
    pytest.importorskip("psycopg")
    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore(dsn)
    try:
        shown = repr(store)
        assert shown.startswith(f"<PostgresStore {where}"), shown
        described = store.describe()
        assert "[" not in str(described["host"]) and "]" not in str(described["host"]), described
        assert SECRET not in shown + repr(dict(described))
    finally:
        store.close()


def test_an_unreachable_ipv6_store_is_named_in_brackets() -> None:
    """First use against [::1]:1 (nothing listens): StoreUnavailableError 'PostgreSQL store at [::1]:1 ...'."""
    pytest.importorskip("psycopg")
    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore(f"postgresql://app:{SECRET}@[::1]:1/app", connect_timeout=2)
    try:
        with pytest.raises(ThreadDispatchError) as caught:
            store.counts()
    finally:
        store.close()
    message = str(caught.value)
    assert isinstance(caught.value, StoreUnavailableError), caught.value
    assert message.startswith("PostgreSQL store at [::1]:1 is unavailable"), message
    assert SECRET not in message


def test_a_lock_timeout_names_the_store_in_brackets() -> None:
    """The lock_timeout message (a statement cancelled behind another session's lock) shows [::1]:5432 too."""
    pytest.importorskip("psycopg")
    from threaddispatch.stores.postgres import PostgresStore

    store = PostgresStore(f"postgresql://app:{SECRET}@[::1]:5432/app")
    try:
        message = str(store._lock_timed_out("claim", RuntimeError("canceling statement due to lock timeout")))
    finally:
        store.close()
    assert message.startswith("PostgreSQL store at [::1]:5432 is unavailable (claim)"), message


def test_a_pool_with_every_connection_busy_names_the_store_in_brackets() -> None:
    """The pool's "all N pooled connections stayed busy" message shows [::1]:1 too (no connection is made)."""
    pytest.importorskip("psycopg")
    from threaddispatch.stores._pg_pool import Dsn, Pool

    # max_size 0: every slot is taken from the start, so acquire() waits out pool_timeout and refuses.
    pool = Pool(
        Dsn(f"postgresql://app:{SECRET}@[::1]:1/app"),
        min_size=0,
        max_size=0,
        max_idle=1.0,
        pool_timeout=0.01,
        connect_timeout=1.0,
        session_sql=None,
    )
    with pytest.raises(StoreUnavailableError) as caught:
        pool.acquire()
    message = str(caught.value)
    assert message.startswith("PostgreSQL store at [::1]:1: all 0 pooled connections stayed busy"), message
    assert SECRET not in message
