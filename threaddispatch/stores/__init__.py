"""Job stores: where the :class:`~threaddispatch.JobEngine` keeps its jobs.

:class:`Store` is the contract (its docstrings); :class:`MemoryStore` and
:class:`SQLiteStore` are the embedded implementations. :func:`open_store` builds one
from a URL.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from threaddispatch.errors import ConfigurationError
from threaddispatch.stores.base import CronEntry, DeadLetter, JobRecord, JobState, Store
from threaddispatch.stores.memory import MemoryStore
from threaddispatch.stores.sqlite import SQLiteStore

__all__ = [
    "CronEntry",
    "DeadLetter",
    "JobRecord",
    "JobState",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "open_store",
]


def open_store(url: str) -> Store:
    """Build a store from a URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``.

    ``postgresql://...`` is accepted once the PostgreSQL store is installed
    (``threaddispatch.stores.postgres``). Anything else raises ConfigurationError naming
    the URL. Opening a SQLite file creates it and its schema; blocks for that.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"store URL must be a str, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        # sqlite:///jobs.db -> "jobs.db"; sqlite:////var/lib/jobs.db -> "/var/lib/jobs.db"
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if parts.netloc or not path:
            raise ConfigurationError(
                f"invalid SQLite store URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return SQLiteStore(path)
    if scheme in ("postgres", "postgresql"):
        try:
            from threaddispatch.stores import postgres  # type: ignore[attr-defined,unused-ignore]
        except ImportError:
            raise ConfigurationError(
                f"store URL {url!r} needs the PostgreSQL store (threaddispatch.stores.postgres, extra 'postgres')"
            ) from None
        store: Store = postgres.PostgresStore(url)
        return store
    raise ConfigurationError(f"unsupported store URL {url!r}: expected memory://, sqlite:///path or postgresql://...")
