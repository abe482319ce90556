"""Job stores: where the :class:`~threaddispatch.JobEngine` keeps its jobs.

:class:`Store` is the contract (its docstrings); :class:`MemoryStore` and
:class:`SQLiteStore` are the embedded implementations; :class:`PostgresStore` is a lazy
attribute (importing this package does not import psycopg: the first use of the name
imports ``threaddispatch.stores.postgres``). :func:`open_store` builds one from a URL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from threaddispatch._redact import redact
from threaddispatch.errors import ConfigurationError
from threaddispatch.stores.base import CronEntry, DeadLetter, JobRecord, JobState, Store, WorkerInfo
from threaddispatch.stores.memory import MemoryStore
from threaddispatch.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from threaddispatch.stores.postgres import PostgresStore

__all__ = [
    "CronEntry",
    "DeadLetter",
    "JobRecord",
    "JobState",
    "MemoryStore",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "WorkerInfo",
    "open_store",
]


def __getattr__(name: str) -> Any:
    """``PostgresStore``, imported on first use (so psycopg stays an optional dependency)."""
    if name == "PostgresStore":
        from threaddispatch.stores.postgres import PostgresStore

        globals()["PostgresStore"] = PostgresStore
        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str) -> Store:
    """Build a store from a URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``.

    ``postgresql://...`` is accepted once the PostgreSQL store is installed
    (``threaddispatch.stores.postgres``). Anything else raises ConfigurationError naming
    the URL with its password masked (never the password itself). Opening a SQLite file
    creates it and its schema; blocks for that.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"store URL must be a str, got {type(url).__name__}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        # sqlite:///jobs.db -> "jobs.db"; sqlite:////var/lib/jobs.db -> "/var/lib/jobs.db"
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if parts.netloc or not path or parts.query or parts.fragment:
            raise ConfigurationError(
                f"invalid SQLite store URL {redact(url)!r}: use sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (no host, query or fragment)"
            )
        return SQLiteStore(path)
    if scheme in ("postgres", "postgresql"):
        try:
            from threaddispatch.stores import postgres  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            raise ConfigurationError(
                f"store URL {redact(url)!r} needs the PostgreSQL store "
                "(threaddispatch.stores.postgres, extra 'postgres')"
            ) from None
        store: Store = postgres.PostgresStore(url)
        return store
    raise ConfigurationError(
        f"unsupported store URL {redact(url)!r}: expected memory://, sqlite:///path or postgresql://..."
    )
