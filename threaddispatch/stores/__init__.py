"""Job stores: where the :class:`~threaddispatch.JobEngine` keeps its jobs.

:class:`Store` is the contract (its docstrings); :class:`MemoryStore` and
:class:`SQLiteStore` are the embedded implementations; :class:`PostgresStore` needs the
``postgres`` extra. :func:`open_store` builds one from a URL. Every class is imported on
first use (PEP 562): importing this package (which every ``threaddispatch.stores.*``
import does) imports neither sqlite3's store machinery nor psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from threaddispatch._dsn import sqlite_path, url_scheme
from threaddispatch._lazy import lazy_attributes
from threaddispatch._redact import redact
from threaddispatch.errors import ConfigurationError

if TYPE_CHECKING:  # the real names, for type checkers and IDEs; at run time see __getattr__
    from threaddispatch.stores.base import CronEntry, DeadLetter, JobRecord, JobState, Store, WorkerInfo
    from threaddispatch.stores.memory import MemoryStore
    from threaddispatch.stores.postgres import PostgresStore
    from threaddispatch.stores.sqlite import SQLiteStore

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

#: Public name -> the submodule (of this package) defining it; ``__getattr__`` imports it on first use.
_EXPORTS: dict[str, str] = {
    "CronEntry": "base",
    "DeadLetter": "base",
    "JobRecord": "base",
    "JobState": "base",
    "Store": "base",
    "WorkerInfo": "base",
    "MemoryStore": "memory",
    "SQLiteStore": "sqlite",
    "PostgresStore": "postgres",
}

#: The submodules importing this package used to load: ``threaddispatch.stores.sqlite`` after
#: ``import threaddispatch.stores`` still works (``__getattr__`` imports it).
_SUBMODULES = frozenset({"base", "memory", "sqlite"})


# Seen by type checkers too, as the PostgresStore-only __getattr__ before it was: any name types as Any.
__getattr__, __dir__ = lazy_attributes(globals(), _EXPORTS, _SUBMODULES)


def open_store(url: str) -> Store:
    """Build a store from a URL: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db``.

    ``postgresql://...`` is accepted once the PostgreSQL store is installed
    (``threaddispatch.stores.postgres``). Anything else raises ConfigurationError naming
    the URL with its password masked (never the password itself). Opening a SQLite file
    creates it and its schema; blocks for that.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"store URL must be a str, got {type(url).__name__}")
    scheme = url_scheme(url)
    if scheme == "memory":
        from threaddispatch.stores.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise ConfigurationError(
                f"invalid SQLite store URL {redact(url)!r}: use sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (no host, query or fragment)"
            )
        from threaddispatch.stores.sqlite import SQLiteStore

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
