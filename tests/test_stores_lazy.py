"""``threaddispatch.stores.PostgresStore`` is a lazy attribute: psycopg is imported only when it is used."""

from __future__ import annotations

import subprocess
import sys

import pytest

import threaddispatch.stores


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(120)
def test_importing_the_stores_does_not_import_psycopg() -> None:
    """``import threaddispatch`` and ``import threaddispatch.stores`` leave psycopg and the PostgreSQL store out."""
    code = (
        "import sys, threaddispatch, threaddispatch.stores\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'psycopg'"
        " or m == 'threaddispatch.stores.postgres'))"
    )
    assert _run(code) == "[]"


@pytest.mark.timeout(120)
def test_postgres_store_is_importable_from_the_stores_package() -> None:
    """``from threaddispatch.stores import PostgresStore`` gives the class of ``threaddispatch.stores.postgres``."""
    pytest.importorskip("psycopg")
    from threaddispatch.stores import PostgresStore
    from threaddispatch.stores.postgres import PostgresStore as Direct

    assert PostgresStore is Direct
    assert "PostgresStore" in threaddispatch.stores.__all__
    assert _run("from threaddispatch.stores import PostgresStore; print(PostgresStore.__name__)") == "PostgresStore"


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchStore"):
        threaddispatch.stores.NoSuchStore
