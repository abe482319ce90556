"""Store URLs split into their parts: the one URL parser of open_store, PostgresStore and the CLI.

Not ``urllib.parse.urlsplit``: that refuses a password holding ``[`` or ``]`` ("Invalid IPv6
URL", a bare ValueError naming nothing), reads a raw ``@`` in a password as the start of
the host, and checks no port until ``.port`` is read. Here, for ``scheme://userinfo@hosts/tail``:

- the user info runs to the LAST ``@`` before the first ``/`` after ``//``, so a password may
  hold raw ``@ : [ ] ? #`` (a ``/`` must be written ``%2F``, as libpq also requires); user
  and password are percent-decoded, and split at the first ``:`` (a user name holds none);
- the hosts run from there to the first ``/``, ``?`` or ``#``: a comma-separated list (libpq's
  multi-host form) of ``name``, ``name:port``, ``[ipv6]`` or ``[ipv6]:port``;
- every port given is a whole number from 1 to 65535 (:func:`check_port`).

Anything else raises :class:`~threaddispatch.errors.ConfigurationError` naming the URL with
its password masked (:mod:`threaddispatch._redact`), never the password. :func:`host_port`
writes hosts back as a URL does (``[::1]:5432``), for messages. Pure functions; thread-safe.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import quote, unquote

from threaddispatch._redact import MASK, redact, scrub
from threaddispatch.errors import ConfigurationError

__all__ = ["Host", "UrlParts", "check_port", "host_port", "split_url", "sqlite_path", "url_scheme"]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_PORT = re.compile(r"[0-9]+")
PORT_MAX = 65535


class Host(NamedTuple):
    """One host of a URL: its name (percent-decoded, no brackets; '' for the default) and port, or None."""

    name: str
    port: int | None


class UrlParts(NamedTuple):
    """A URL split by :func:`split_url`. ``tail`` is everything after the hosts, as written."""

    scheme: str  #: lower-cased; '' when the text has none
    user: str | None  #: percent-decoded; None without user info
    password: str | None  #: percent-decoded; None without a ``:`` in the user info
    netloc: str  #: user info and hosts as written ('' for ``sqlite:///path``)
    hostspec: str  #: the hosts as written
    hosts: tuple[Host, ...]
    tail: str  #: path, query and fragment as written
    path: str  #: the tail up to ``?`` or ``#``
    query: str | None  #: after ``?`` up to ``#``; None without ``?``
    fragment: str | None  #: after ``#``; None without ``#``

    def with_userinfo_encoded(self, tail: str | None = None) -> str:
        """The URL rebuilt with user and password percent-encoded, so any URL parser reads them as one.

        ``tail`` replaces the path, query and fragment when given. Holds the password: pass
        it to a driver only, never show it.
        """
        userinfo = ""
        if self.user is not None:  # all but RFC 3986's unreserved characters encoded (UTF-8, as libpq decodes)
            userinfo = quote(self.user, safe="")
            if self.password is not None:
                userinfo += ":" + quote(self.password, safe="")
            userinfo += "@"
        return f"{self.scheme}://{userinfo}{self.hostspec}{self.tail if tail is None else tail}"


def url_scheme(url: str) -> str:
    """The scheme of ``url``, lower-cased ('' when it has none, e.g. a libpq ``host=...`` DSN)."""
    match = _SCHEME.match(url.strip())
    return match.group()[:-1].lower() if match else ""


def check_port(text: str, where: str) -> int:
    """``text`` as a port (a whole number from 1 to 65535), else ConfigurationError naming it and ``where``.

    ``where`` (e.g. "URL 'postgresql://u:***@h:x/db'") must already be redacted; the
    caller scrubs the message of any password the port text may hold.
    """
    stripped = text.strip()
    if _PORT.fullmatch(stripped) and 1 <= int(stripped) <= PORT_MAX:
        return int(stripped)
    raise ConfigurationError(f"invalid port {text!r} in {where}: expected a whole number from 1 to {PORT_MAX}")


def split_url(url: str) -> UrlParts:
    """``url`` split into its parts (see the module docstring); ConfigurationError, password masked, if malformed."""
    text = url.strip()
    scheme = url_scheme(text)
    rest = text[len(scheme) + 1 :] if scheme else text
    if not rest.startswith("//"):  # "sqlite:jobs.db", "nonsense": no user info, no hosts
        return UrlParts(scheme, None, None, "", "", (), rest, *_tail(rest))
    rest = rest[2:]
    first_slash = rest.find("/")
    at = rest.rfind("@", 0, len(rest) if first_slash < 0 else first_slash)
    userinfo = rest[:at] if at >= 0 else None
    after = rest[at + 1 :]
    hostspec = after[: _first(after, "/?#")]
    tail = after[len(hostspec) :]
    user = password = None
    if userinfo is not None:
        user, colon, raw_password = userinfo.partition(":")
        user, password = unquote(user), unquote(raw_password) if colon else None
    try:
        hosts = _hosts(hostspec, url)
    except ConfigurationError as error:
        # The URL and the port text may hold the password (a raw '/' in it moves the split).
        message = str(error)
        for secret in sorted({password or "", userinfo or ""}, key=len, reverse=True):
            if secret:
                message = message.replace(secret, MASK)
        raise ConfigurationError(scrub(message, url)) from None
    return UrlParts(scheme, user, password, rest[: len(rest) - len(tail)], hostspec, hosts, tail, *_tail(tail))


def host_port(host: str, port: str) -> str:
    """``host:port`` for a message, as a URL writes it: an IPv6 address in brackets, ``[::1]:5432``.

    ``host`` and ``port`` are libpq's (comma-separated lists for several hosts): each host
    is shown with its port, one port with every host when only one is given, none for an
    empty one (libpq's default). Lists of counts libpq refuses are shown as given. A host
    holding ':' is an IPv6 address unless it is a Unix socket directory (starts with '/').
    Shows only what it is given: pass names already scrubbed of any password.
    """
    hosts = host.split(",")
    ports = port.split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        return f"{','.join(map(_bracketed, hosts))}:{port}"
    shown = (
        f"{_bracketed(name)}:{number}" if number else _bracketed(name)
        for name, number in zip(hosts, ports, strict=True)
    )
    return ",".join(shown)


def _bracketed(name: str) -> str:
    return f"[{name}]" if ":" in name and not name.startswith("/") else name


def sqlite_path(url: str) -> str | None:
    """The file a ``sqlite:`` URL names, percent-decoded, or None if ``url`` is not a valid one.

    ``sqlite:///jobs.db`` -> "jobs.db", ``sqlite:////var/lib/jobs.db`` -> "/var/lib/jobs.db";
    a host, query or fragment makes it invalid. The one reading of a SQLite URL: open_store
    and the CLI (which checks the file before opening it) share it.
    """
    if url_scheme(url) != "sqlite":
        return None
    try:
        parts = split_url(url)
    except ConfigurationError:  # a malformed host: not a valid SQLite URL either way
        return None
    path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.netloc or not path or parts.query or parts.fragment:
        return None
    return path


def _first(text: str, characters: str) -> int:
    """The index of the first of ``characters`` in ``text``, else ``len(text)``."""
    return min((index for index in map(text.find, characters) if index >= 0), default=len(text))


def _tail(tail: str) -> tuple[str, str | None, str | None]:
    """(path, query, fragment) of a URL's tail."""
    head, hash_mark, fragment = tail.partition("#")
    path, question, query = head.partition("?")
    return path, query if question else None, fragment if hash_mark else None


def _hosts(hostspec: str, url: str) -> tuple[Host, ...]:
    """The hosts of ``hostspec`` (libpq's comma-separated list); ConfigurationError naming ``url`` (redacted later)."""
    where = f"URL {redact(url.strip())!r}"
    if not hostspec:
        return ()
    hosts: list[Host] = []
    index = 0
    while True:
        if hostspec.startswith("[", index):
            close = hostspec.find("]", index)
            if close < 0:
                raise ConfigurationError(f"unclosed '[' in the host of {where}: an IPv6 address is written [::1]:5432")
            name = hostspec[index + 1 : close]
            index = close + 1
            if index < len(hostspec) and hostspec[index] not in ":,":
                raise ConfigurationError(f"expected ':port' or ',' after ']' in the host of {where}")
        else:
            end = _first(hostspec[index:], ":,") + index
            name = hostspec[index:end]
            if "[" in name or "]" in name:
                raise ConfigurationError(f"stray '[' or ']' in the host of {where}: an IPv6 address is written [::1]")
            index = end
        port = None
        if hostspec.startswith(":", index):
            end = _first(hostspec[index + 1 :], ",") + index + 1
            port_text = hostspec[index + 1 : end]
            index = end
            if port_text:  # "host:" is libpq's default port, as is a missing one
                try:
                    port = check_port(port_text, where)
                except ConfigurationError as error:
                    hint = " (an IPv6 address goes in brackets: [::1]:5432)" if ":" in port_text else ""
                    if "@" in url[url.find("//") + 2 :].partition("/")[2]:
                        hint += " (a '/' in a password is written %2F)"
                    raise ConfigurationError(f"{error}{hint}") from None
        hosts.append(Host(unquote(name), port))
        if index >= len(hostspec):
            return tuple(hosts)
        index += 1  # past the ','
