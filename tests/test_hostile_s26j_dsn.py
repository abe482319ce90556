"""Hostile: PostgreSQL DSNs that libpq takes, or that are plainly malformed, at PostgresStore and open_store.

The promises attacked (DESIGN, "Bad arguments"; README, "PostgreSQL"): a bad argument raises
ConfigurationError (a ``threaddispatch.errors`` class) naming it at the call, never a password;
and a DSN libpq accepts is a DSN the store accepts. What failed (fixed: every entry point now
splits a URL with threaddispatch._dsn.split_url, which also checks ports): a URL whose password holds a
raw ``[`` or ``]`` (libpq's ``conninfo_to_dict`` reads it: password ``s3cr[et``) is refused with
a bare ``ValueError('Invalid IPv6 URL')`` from ``urllib.parse.urlsplit`` in
``Dsn._take_schema`` (stores/_pg_pool.py), which names nothing; and a port that is not a number
(``:abc``) or out of range (``:99999``) is accepted at construction, then every use raises
StoreUnavailableError ("unavailable (connecting)") as if the server were down, so a worker
backs off and waits for a server that can never answer. No server is needed: each check is the
constructor's, or the first call against a closed port on 127.0.0.1.
"""

from __future__ import annotations

import pytest

pytest.importorskip("psycopg")

from psycopg.conninfo import conninfo_to_dict

from threaddispatch.errors import ConfigurationError
from threaddispatch.stores import open_store

SECRET = "s3cr[et"
BRACKETED = f"postgresql://app:{SECRET}@127.0.0.1:1/app"


def test_libpq_reads_a_password_with_a_bracket() -> None:
    """The reference: libpq's own parser takes the URL and reads the password as written."""
    assert conninfo_to_dict(BRACKETED)["password"] == SECRET


@pytest.mark.parametrize("url", [BRACKETED, f"{BRACKETED}?schema=jobs", "postgresql://app:s3cr]et@127.0.0.1:1/app"])
def test_a_password_with_a_bracket_is_a_valid_dsn(url: str) -> None:
    """open_store takes the URL libpq takes; what it shows names host and port, not the password."""
    from threaddispatch.stores.postgres import PostgresStore

    store = open_store(url)
    try:
        assert isinstance(store, PostgresStore)
        shown = repr(store) + str(store.describe())
        assert "127.0.0.1" in shown
        assert "s3cr" not in shown
    finally:
        store.close()


def test_a_truly_bad_url_is_a_configuration_error_without_the_password() -> None:
    """An unclosed IPv6 host: refused at the call with ConfigurationError (a ValueError), the password not shown."""
    with pytest.raises(ConfigurationError) as caught:
        open_store("postgresql://app:topsecret@[::1/app")
    assert "topsecret" not in str(caught.value)


@pytest.mark.parametrize("port", ["abc", "99999", "0", "-1"])
def test_a_bad_port_is_refused_at_the_constructor(port: str) -> None:
    """PostgresStore('...:<port>/app') raises ConfigurationError naming the port, before any connection."""
    from threaddispatch.stores.postgres import PostgresStore

    store = None
    try:
        with pytest.raises(ConfigurationError, match="port") as caught:
            store = PostgresStore(f"postgresql://app:topsecret@127.0.0.1:{port}/app")
        assert port in str(caught.value)
        assert "topsecret" not in str(caught.value)
    finally:
        if store is not None:
            store.close()
