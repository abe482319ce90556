"""The one store-URL split (threaddispatch._dsn): passwords with raw ``@ : [ ]``, IPv6 hosts, ports, redaction.

Pure functions, no server: each test calls :func:`split_url`, :func:`sqlite_path` or
:func:`url_scheme` and checks the parts, or the ConfigurationError and that its text never
holds the password. Where psycopg is installed, libpq's own parser is the reference for the
rebuilt URL (what PostgresStore hands libpq).
"""

from __future__ import annotations

import pytest

from threaddispatch._dsn import Host, check_port, split_url, sqlite_path, url_scheme
from threaddispatch.errors import ConfigurationError

SECRET = "Tr0ub4dor"


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("postgresql://u@[::1]/db", (Host("::1", None),)),
        ("postgresql://u@[::1]:5432/db", (Host("::1", 5432),)),
        ("postgresql://[2001:db8::7]:6543", (Host("2001:db8::7", 6543),)),
        ("postgresql://u:p@[fe80::1%25eth0]:5432/db", (Host("fe80::1%eth0", 5432),)),
        ("postgresql://h1:5432,[::1]:5433,h3/db", (Host("h1", 5432), Host("::1", 5433), Host("h3", None))),
        ("postgresql://h:/db", (Host("h", None),)),  # libpq: "h:" is the default port
        ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", (Host("/var/run/postgresql", None),)),
        ("postgresql:///db?host=/tmp", ()),
    ],
)
def test_hosts_bracketed_ipv6_and_lists(url: str, hosts: tuple[Host, ...]) -> None:
    """Bracketed IPv6 hosts with or without a port, libpq's host lists and socket paths split as libpq reads them."""
    assert split_url(url).hosts == hosts


@pytest.mark.parametrize(
    ("url", "user", "password"),
    [
        ("postgresql://app:s3cr[et@h/db", "app", "s3cr[et"),
        ("postgresql://app:s3cr]et@h/db", "app", "s3cr]et"),
        ("postgresql://app:p@ss@h/db", "app", "p@ss"),
        ("postgresql://app:p:ss@h/db", "app", "p:ss"),
        ("postgresql://app:a@b:c[d]e?f#g@[::1]:5432/db", "app", "a@b:c[d]e?f#g"),
        ("postgresql://app:p%40ss%3Aw%5Bo%5D%2Frd@h/db", "app", "p@ss:w[o]/rd"),
        ("postgresql://us%40er:pw@h/db", "us@er", "pw"),
        ("postgresql://app:%E2%82%ACuro@h/db", "app", "\u20acuro"),
        ("postgresql://app:@h/db", "app", ""),
        ("postgresql://app@h/db", "app", None),
        ("postgresql://:pw@h/db", "", "pw"),
        ("postgresql://h/db", None, None),
    ],
)
def test_user_info_runs_to_the_last_at_before_the_path(url: str, user: str | None, password: str | None) -> None:
    """Raw ``@ : [ ] ? #`` in a password and percent-encoding both read as the password the user meant."""
    parts = split_url(url)
    assert (parts.user, parts.password) == (user, password)
    assert parts.hosts[0].name in ("h", "::1")


def test_an_at_after_the_path_is_not_user_info() -> None:
    """'@' in the database name or the query (after the first '/') leaves the host alone."""
    parts = split_url("postgresql://u:pw@h:5432/db@x?application_name=a@b")
    assert (parts.user, parts.password, parts.hosts) == ("u", "pw", (Host("h", 5432),))
    assert (parts.path, parts.query) == ("/db@x", "application_name=a@b")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cr[et@127.0.0.1:1/app?schema=jobs",
        "postgresql://app:p@ss:w]rd@[::1]:5432/app",
        "postgresql://us%40er:p%2Fw@h1:1,h2:2/app",
        "postgres://app:%E2%82%AC@h/app#frag",
        "postgresql://app:%zz@h/app",  # not an escape: the characters as written (libpq would refuse it)
    ],
)
def test_the_rebuilt_url_reads_the_same_to_libpq(url: str) -> None:
    """with_userinfo_encoded() (what PostgresStore gives libpq) yields our user, password and hosts to libpq too."""
    conninfo_to_dict = pytest.importorskip("psycopg.conninfo").conninfo_to_dict
    parts = split_url(url)
    rebuilt = parts.with_userinfo_encoded(parts.path)  # no query: libpq refuses our own schema=
    read = conninfo_to_dict(rebuilt)
    assert read.get("user") == parts.user and read.get("password") == parts.password
    assert read["host"] == ",".join(host.name for host in parts.hosts)
    assert split_url(rebuilt)[1:3] == parts[1:3]


@pytest.mark.parametrize("port", ["abc", "0", "-1", "65536", "99999", "5432x", " ", "+5432", "\u0663", "1e3"])
def test_a_bad_port_is_refused_naming_it(port: str) -> None:
    """A port that is not 1..65535 (ASCII digits) is a ConfigurationError naming the port, not the password."""
    with pytest.raises(ConfigurationError, match="invalid port") as caught:
        split_url(f"postgresql://app:{SECRET}@127.0.0.1:{port}/app")
    assert repr(port) in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("port", ["1", "5432", "65535"])
def test_a_good_port_is_an_int(port: str) -> None:
    """1..65535 is taken, as an int."""
    assert split_url(f"postgresql://h:{port}/db").hosts == (Host("h", int(port)),)
    assert check_port(port, "here") == int(port)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"postgresql://app:{SECRET}@[::1/app", "unclosed '['"),
        (f"postgresql://app:{SECRET}@[::1]x/app", "after ']'"),
        (f"postgresql://app:{SECRET}@a]b/app", "stray"),
        (f"postgresql://app:{SECRET}@::1:5432/app", "brackets"),
        (f"postgresql://app:{SECRET[:4]}/{SECRET[4:]}@h:1/app", "%2F"),  # a raw '/': the split moves
        (f"postgresql://app:{SECRET}[@h1,[::1/app", "unclosed '['"),
    ],
)
def test_a_malformed_host_is_a_configuration_error_without_the_password(url: str, named: str) -> None:
    """Malformed hosts: ConfigurationError (a ValueError) saying what is wrong; no piece of the password shown."""
    with pytest.raises(ConfigurationError) as caught:
        split_url(url)
    text = str(caught.value)
    assert named in text
    assert "***" in text
    for piece in (SECRET, SECRET[:4], SECRET[4:]):
        assert piece not in text, text


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///jobs.db", "jobs.db"),
        ("sqlite:////var/lib/jobs.db", "/var/lib/jobs.db"),
        ("SQLITE:///a%20b.db", "a b.db"),
        ("sqlite:///dir/a@b[1]:c.db", "dir/a@b[1]:c.db"),
        ("sqlite:jobs.db", "jobs.db"),
        ("sqlite://", None),
        ("sqlite://host/jobs.db", None),
        ("sqlite://h:x/jobs.db", None),
        ("sqlite://[::1/jobs.db", None),
        ("sqlite:///jobs.db?mode=ro", None),
        ("sqlite:///jobs.db#x", None),
        ("postgresql:///jobs.db", None),
        ("jobs.db", None),
    ],
)
def test_sqlite_path(url: str, path: str | None) -> None:
    """The file a SQLite URL names (brackets and '@' in a path are fine), or None for anything else."""
    assert sqlite_path(url) == path


@pytest.mark.parametrize(
    ("url", "scheme"),
    [("PostgreSQL://h", "postgresql"), ("postgresql+psycopg://h", "postgresql+psycopg"), ("memory://", "memory"),
     ("host=h password=a://b", ""), ("jobs.db", ""), ("", "")],
)  # fmt: skip
def test_url_scheme(url: str, scheme: str) -> None:
    """The scheme, lower-cased; none for a libpq key=value DSN even with '://' in a value."""
    assert url_scheme(url) == scheme
