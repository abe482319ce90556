"""Hostile tests of PostgresStore's ``schema``: text PostgreSQL cannot take as an identifier.

The promise attacked: a bad argument raises ConfigurationError naming it at the
constructor (NUL is refused in every name the engine stores). A NUL once passed, and the
server, which ends strings at NUL, then worked in the schema named by the text before it
(``"jobs\\x00x"`` migrated and used ``"jobs"``, another application's schema perhaps); a
lone surrogate raised a bare UnicodeEncodeError from the length check. Both are now
refused with ConfigurationError. No server is needed: the constructor checks before it
connects.
"""

from __future__ import annotations

import pytest

from threaddispatch.errors import ConfigurationError

pytest.importorskip("psycopg")

from threaddispatch.stores.postgres import PostgresStore

URL = "postgresql://user@127.0.0.1:1/db"  # never connected to


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "schema",
    [
        pytest.param("jobs\x00other", id="nul"),
        pytest.param("jobs\ud800", id="lone-surrogate"),
        pytest.param("", id="empty"),
        pytest.param("j" * 64, id="64-bytes"),
        pytest.param("é" * 32, id="64-utf8-bytes"),
    ],
)
def test_a_schema_postgresql_cannot_use_is_refused_at_the_constructor(schema: str) -> None:
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresStore(URL, schema=schema)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "query",
    [
        pytest.param("schema=jobs%00other", id="nul"),
        pytest.param("schema=" + "j" * 64, id="64-bytes"),
    ],
)
def test_a_schema_in_the_url_is_checked_like_the_keyword(query: str) -> None:
    """The URL's ``?schema=`` goes through the same check (the CLI's ``--store`` takes that form)."""
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresStore(f"{URL}?{query}")
