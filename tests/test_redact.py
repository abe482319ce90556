"""Store URL / DSN password redaction: redact(), open_store's errors, and the CLI's stderr (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from threaddispatch._redact import passwords, redact, scrub
from threaddispatch.errors import ThreadDispatchError
from threaddispatch.stores import open_store

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent

# (DSN, fragments of its password that must never be shown, a part that must stay visible).
# PostgreSQL ones point at 127.0.0.1:1, where nothing listens: opening fails fast, offline.
RAW_AT_SIGN = "postgresql://user:Tr0ub@4dor@127.0.0.1:1/db"
FORMS: list[tuple[str, list[str], str]] = [
    ("postgresql://user:Tr0ub4dor@127.0.0.1:1/db", ["Tr0ub4dor"], "127.0.0.1:1/db"),
    ("postgres://user:Tr0ub4dor@127.0.0.1:1/db?sslmode=disable", ["Tr0ub4dor"], "sslmode=disable"),
    ("postgresql+psycopg://user:Tr0ub4dor@127.0.0.1:1/db", ["Tr0ub4dor"], "postgresql+psycopg://user:"),
    ("mysql://user:Tr0ub4dor@db.example.com/jobs", ["Tr0ub4dor"], "db.example.com/jobs"),
    ("redis://:Tr0ub4dor@localhost:6379/0", ["Tr0ub4dor"], "localhost:6379/0"),
    ("amqp://user:Tr0ub4dor@broker/vhost#frag", ["Tr0ub4dor"], "broker/vhost"),
    ("postgresql://user:Tr0ub%404dor@127.0.0.1:1/db", ["Tr0ub%404dor", "Tr0ub@4dor"], "127.0.0.1:1/db"),
    (RAW_AT_SIGN, ["Tr0ub", "4dor"], "127.0.0.1:1/db"),
    ("mysql://user:Tr0ub/4dor@db.example.com/jobs", ["Tr0ub", "4dor"], "db.example.com/jobs"),
    ("postgresql://user:Tr0ub4dor@[::1]:1/db", ["Tr0ub4dor"], "[::1]:1/db"),
    ("postgresql://user@127.0.0.1:1/db?password=Tr0ub4dor&sslmode=disable", ["Tr0ub4dor"], "sslmode=disable"),
    ("postgresql://127.0.0.1:1/db?sslmode=disable&PASSWORD=Tr0ub4dor", ["Tr0ub4dor"], "sslmode=disable"),
    ("sqlite:///jobs.db?password=Tr0ub4dor", ["Tr0ub4dor"], "sqlite:///jobs.db"),
    ("host=127.0.0.1 port=1 password=Tr0ub4dor dbname=jobs", ["Tr0ub4dor"], "dbname=jobs"),
    ("host=127.0.0.1 password = Tr0ub4dor", ["Tr0ub4dor"], "host=127.0.0.1"),
    ("host=127.0.0.1 password='Tr0ub 4dor\\' x' dbname=jobs", ["Tr0ub", "4dor"], "dbname=jobs"),
    ('host=127.0.0.1 password="Tr0ub 4dor" dbname=jobs', ["Tr0ub", "4dor"], "dbname=jobs"),
    ("host=127.0.0.1 passwd=Tr0ub4dor", ["Tr0ub4dor"], "host=127.0.0.1"),
    ("host=127.0.0.1 sslpassword=Tr0ub4dor user=me", ["Tr0ub4dor"], "user=me"),
    ("PASSWORD=Tr0ub4dor host=127.0.0.1", ["Tr0ub4dor"], "host=127.0.0.1"),
    ("Server=db;Database=jobs;Uid=me;Pwd={Tr0ub;4dor};", ["Tr0ub", "4dor"], "Uid=me"),
    ("me:Tr0ub4dor@db.example.com/jobs", ["Tr0ub4dor"], "db.example.com/jobs"),
]


def visible(text: str, fragments: list[str]) -> list[str]:
    """The password fragments that ``text`` shows."""
    return [fragment for fragment in fragments if fragment in text]


@pytest.mark.parametrize(("dsn", "secret", "kept"), FORMS)
def test_redact_masks_the_password_of_every_form(dsn: str, secret: list[str], kept: str) -> None:
    """redact() hides the password in URL userinfo, query strings and key=value pairs, and keeps the rest."""
    shown = redact(dsn)
    assert visible(shown, secret) == [], shown
    assert "***" in shown and kept in shown, shown
    assert any(fragment in found for found in passwords(dsn) for fragment in secret)


@pytest.mark.parametrize(
    "dsn",
    ["memory://", "sqlite:///jobs.db", "sqlite:////var/lib/a:b.db", "postgresql://127.0.0.1:5432/db",
     "postgresql://user@host/db?sslmode=require", "postgresql://[::1]:5432/db", "host=x dbname=y user=z"],
)  # fmt: skip
def test_redact_leaves_a_dsn_without_password_alone(dsn: str) -> None:
    """Nothing to hide: the DSN is shown as given."""
    assert redact(dsn) == dsn
    assert passwords(dsn) == []


def test_scrub_masks_the_password_wherever_a_message_quotes_it() -> None:
    """scrub() masks a DSN's passwords (raw and decoded) in other text, e.g. a driver's error."""
    dsn = "postgresql://me:Tr0ub%404dor@db/jobs"
    text = "FATAL: password 'Tr0ub@4dor' rejected for postgresql://me:Tr0ub%404dor@db/jobs"
    assert scrub(text, dsn) == "FATAL: password '***' rejected for postgresql://me:***@db/jobs"
    assert scrub("no secret here: user:x", dsn) == "no secret here: user:x"


def exception_texts(error: BaseException) -> list[str]:
    """str, repr and args of ``error`` and of every exception chained to it."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), *map(repr, current.args)]
        current = current.__cause__ or current.__context__
    return texts


@pytest.mark.parametrize(
    ("dsn", "secret", "kept"),
    FORMS,
)
def test_open_store_errors_never_carry_the_password(
    dsn: str, secret: list[str], kept: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each form is refused, or fails at first use; no exception (str, repr, args, chain) or repr shows the password."""
    monkeypatch.chdir(tmp_path)  # a SQLite URL that were accepted would create its file here
    for name in ("PGPASSWORD", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    shown: list[str] = []
    with pytest.raises(ThreadDispatchError) as info:
        store = open_store(dsn)  # PostgreSQL connects lazily: the store is built, its first use fails
        try:
            shown += [repr(store), repr(dict(store.describe()))]
            store.counts()
        finally:
            store.close()
    for text in [*shown, *exception_texts(info.value)]:
        assert visible(text, secret) == [], text


def test_open_store_names_a_non_string_url_by_type_only() -> None:
    """A bytes (or other) URL is refused without repeating it."""
    with pytest.raises(ThreadDispatchError) as info:
        open_store(b"postgresql://user:Tr0ub4dor@db/jobs")  # type: ignore[arg-type]
    assert "bytes" in str(info.value)
    assert visible(" ".join(exception_texts(info.value)), ["Tr0ub4dor"]) == []


@pytest.mark.timeout(300)
def test_cli_stderr_never_shows_the_password() -> None:
    """``threaddispatch jobs list --store DSN`` (a subprocess per form) fails without printing the password."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("THREADDISPATCH_", "PG"))}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    running = [
        (dsn, secret, subprocess.Popen(
            [sys.executable, "-m", "threaddispatch", "jobs", "list", "--store", dsn],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd=ROOT,
        ))
        for dsn, secret, _ in FORMS
    ]  # fmt: skip
    failures = []
    for dsn, secret, process in running:
        stdout, stderr = process.communicate(timeout=240)
        if process.returncode == 0 or "Traceback" in stderr or visible(stdout + stderr, secret):
            failures.append((dsn, process.returncode, stderr))
    assert failures == []
