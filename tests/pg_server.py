"""A throwaway PostgreSQL server for tests and benchmarks: initdb + pg_ctl in a temporary directory.

``PostgresServer.start()`` finds the server binaries (``$PG_BINDIR``, ``PATH``,
``/usr/local/bin``, ``/usr/lib/postgresql/*/bin``), creates a cluster in a fresh temporary
directory, and starts it on a free port of 127.0.0.1 with its unix socket in that
directory. PostgreSQL refuses to run as root: as root the cluster belongs to a system
user (``threaddispatch_pg``, created with ``useradd --system`` when missing) and the
binaries run through ``runuser`` (or ``su``). ``stop()`` stops the server and deletes the
directory. ``find_bindir()`` returns None when no server binaries exist, so callers can
skip (locally) or fail (on CI).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PG_USER", "PostgresServer", "find_bindir"]

PG_USER = "threaddispatch_pg"
_START_TIMEOUT = 60.0


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    candidates: list[str] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    candidates.append("/usr/local/bin")
    candidates.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    for directory in candidates:
        initdb = Path(directory) / "initdb"
        if initdb.exists():
            # /usr/local/bin/initdb may be a symlink into the real bin directory: use that one.
            real = initdb.resolve().parent
            if all((real / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
                return real
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _user_exists() -> bool:
    import pwd

    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return False
    return True


def _ensure_user() -> None:
    """Create the system user that owns the cluster when running as root (idempotent).

    Several test processes (pytest-xdist workers) may start servers at once: a ``useradd``
    that lost the race to another process's finds the user there, which is success.
    """
    if _user_exists():
        return
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
        check=False,
        capture_output=True,
    )
    if made.returncode != 0 and not _user_exists():
        raise RuntimeError(f"useradd {PG_USER} failed ({made.returncode}): {made.stderr.decode(errors='replace')}")


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, reachable as ``dsn`` (trust auth, user ``postgres``).

    Not thread-safe; start and stop it from one thread. ``start()`` blocks until the
    server accepts connections (up to 60 s); ``restart()`` and ``stop()`` block until done.
    """

    def __init__(self, bindir: Path, *, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.settings = settings or {}
        self.port = _free_port()
        self.root: Path | None = None
        self.as_root = os.geteuid() == 0 if hasattr(os, "geteuid") else False

    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        assert self.root is not None  # set by start(), the only way to a running server
        return self.root / "server.log"

    @property
    def dsn(self) -> str:
        """A URL for the ``postgres`` database as the ``postgres`` superuser over TCP."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str = "postgres", **query: str) -> str:
        """A URL for ``dbname`` with extra query parameters."""
        tail = "&".join(f"{key}={value}" for key, value in query.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}" + (f"?{tail}" if tail else "")

    def _run(self, *args: str, timeout: float = _START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            if shutil.which("runuser"):
                command = ["runuser", "-u", PG_USER, "--", *command]
            else:
                command = ["su", PG_USER, "-s", "/bin/sh", "-c", " ".join(f"'{part}'" for part in command)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def start(self) -> PostgresServer:
        """Create the cluster and start the server; returns self."""
        self.root = Path(tempfile.mkdtemp(prefix="threaddispatch-pg-"))
        if self.as_root:
            _ensure_user()
            # The server's user must reach its directory: make the parents traversable.
            for parent in [self.root, *self.root.parents]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    with contextlib.suppress(OSError):
                        parent.chmod(mode | 0o001)
            shutil.chown(self.root, PG_USER, PG_USER)
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-instructions", "--no-sync")  # fmt: skip
        options = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",  # a test cluster: speed over durability
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# threaddispatch test server\n")
            for key, value in options.items():
                conf.write(f"{key} = {value}\n")
        self._start()
        return self

    def _start(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log_file), "-w", "-t", "60", "start")
        except RuntimeError:
            if "could not bind" not in self.log_tail():
                raise
            # Another process took the free port between _free_port() and the bind: take another.
            self.port = _free_port()
            with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(f"port = {self.port}\n")
            self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log_file), "-w", "-t", "60", "start")
        self.wait_ready()

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        """Block until a TCP connection to the server succeeds (up to ``timeout`` seconds)."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is terminated; blocks until the server is back."""
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log_file), "-w", "-t", "60",
                  "-m", "fast", "restart")  # fmt: skip
        self.wait_ready()

    def stop_server(self) -> None:
        """Stop the server, keeping its directory (``start_again()`` brings it back)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "60", "-m", "fast", "stop")

    def start_again(self) -> None:
        """Start a server stopped with ``stop_server()``."""
        self._start()

    def stop(self) -> None:
        """Stop the server (immediate mode) and delete its directory. Idempotent."""
        if self.root is None:
            return
        with contextlib.suppress(Exception):  # already stopped, or never started
            self._run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "30", "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log, for failure messages."""
        if self.root is None or not (self.root / "server.log").exists():
            return ""
        return "\n".join((self.root / "server.log").read_text(errors="replace").splitlines()[-lines:])
