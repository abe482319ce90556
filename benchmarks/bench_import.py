"""What starting costs: ``import threaddispatch``, each face's import, and the CLI's ``--help``, beside the peers.

Each row runs in a fresh interpreter, ``--repeat`` times (default 10), the median reported:
the wall and CPU time (``time.process_time``) of the row's statement itself, measured inside
the child (nothing is imported before it but what the interpreter loads at start), and the
wall time of the whole child process (interpreter start included). Peers (huey, dramatiq,
celery, rq, OpenTelemetry's SDK, asyncio ...) run where installed, in the same run.

Bytecode: by default the children share a private, warmed bytecode cache (``PYTHONPYCACHEPREFIX``
in a temporary directory), as an installed package has; ``--no-bytecode`` writes none
(``PYTHONDONTWRITEBYTECODE``, as this repository's environment sets): each child compiles
every module of the package (unless a tree has a ``__pycache__`` of its own) and reads the
standard library's installed bytecode.

With ``--before DIR`` (a tree holding the package as it was, e.g. ``git archive HEAD~2
threaddispatch`` unpacked there) or ``--before-rev REV`` (unpacked for you), every row also
runs against it, alternating with the current tree, and the table shows both and their
ratio; a peer's two columns then show the run's spread. Usage::

    python benchmarks/bench_import.py [--repeat 10] [--before DIR | --before-rev REV] [--no-bytecode]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

_CLI = (
    "import contextlib, io\n"
    "from threaddispatch.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
    "    main({argv!r})\n"
)

#: Row -> the statement a child times. The first row is the floor: an empty statement.
ROWS: dict[str, str] = {
    "(empty statement)": "pass",
    "import threaddispatch": "import threaddispatch",
    "from threaddispatch import BackgroundDispatcher": "from threaddispatch import BackgroundDispatcher",
    "from threaddispatch import JobEngine": "from threaddispatch import JobEngine",
    "from threaddispatch import RequestDispatcher": "from threaddispatch import RequestDispatcher",
    "from threaddispatch import EndpointBatchDispatcher": "from threaddispatch import EndpointBatchDispatcher",
    "threaddispatch --help": _CLI.format(argv=["--help"]),
    "threaddispatch jobs --help": _CLI.format(argv=["jobs", "--help"]),
    "threaddispatch worker --help": _CLI.format(argv=["worker", "--help"]),
}

#: Peer row -> (the module that must be installed, the statement).
PEERS: dict[str, tuple[str, str]] = {
    "import huey": ("huey", "import huey"),
    "import dramatiq": ("dramatiq", "import dramatiq"),
    "import celery": ("celery", "import celery"),
    "import rq": ("rq", "import rq"),
    "import opentelemetry.sdk.trace": ("opentelemetry.sdk.trace", "import opentelemetry.sdk.trace"),
    "import concurrent.futures (stdlib)": ("concurrent.futures", "import concurrent.futures"),
    "import asyncio (stdlib)": ("asyncio", "import asyncio"),
    "import sqlite3 (stdlib)": ("sqlite3", "import sqlite3"),
}

#: What a child runs: the statement between two clock reads; json only after them.
_CHILD = """\
import sys, time
wall0, cpu0 = time.perf_counter(), time.process_time()
exec(compile({statement!r}, "<bench>", "exec"), {{"__name__": "__bench__"}})
wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
package = sys.modules.get("threaddispatch")
import json
print(json.dumps({{"wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3, "from": getattr(package, "__file__", None)}}))
"""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package missing
        return False


def _environment(tree: Path, cache: Path, bytecode: bool) -> dict[str, str]:
    """The child's environment: ``tree`` first on the path (ahead of an editable install's finder).

    With ``bytecode``, every module's bytecode is written to and read from ``cache`` only (a
    tree's own ``__pycache__`` is never read nor written); without, none is written, and the
    standard library's installed bytecode is read as usual.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def _run(statement: str, env: dict[str, str], tree: Path, package_row: bool) -> dict[str, float]:
    """One fresh interpreter: the statement's own wall and CPU ms, and the whole process's wall ms."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD.format(statement=statement)],
        env=env,
        cwd=tempfile.gettempdir(),  # not the repository's root: ``-c`` puts the cwd first on sys.path
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    process_ms = (time.perf_counter() - started) * 1e3
    if done.returncode != 0:
        raise SystemExit(f"child failed ({statement!r}):\n{done.stderr}")
    found = json.loads(done.stdout.splitlines()[-1])
    if package_row and not str(found["from"]).startswith(str(tree)):
        raise SystemExit(f"the child imported threaddispatch from {found['from']}, not from {tree}")
    return {"wall_ms": found["wall_ms"], "cpu_ms": found["cpu_ms"], "process_ms": process_ms}


def _unpack(rev: str, into: Path) -> Path:
    """``git archive REV threaddispatch`` unpacked into ``into``; returns ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "threaddispatch"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(
    rows: dict[str, tuple[str, bool]], trees: dict[str, Path], repeat: int, bytecode: bool
) -> dict[str, dict[str, dict[str, float]]]:
    """Row -> tree -> the median of each measure over ``repeat`` fresh interpreters (trees alternated)."""
    with tempfile.TemporaryDirectory(prefix="bench-import-pyc-") as cache:
        envs = {name: _environment(tree, Path(cache), bytecode) for name, tree in trees.items()}
        if bytecode:  # one warm-up child per row and tree writes the bytecode every later child reads
            for statement, package_row in rows.values():
                for name, tree in trees.items():
                    _run(statement, envs[name], tree, package_row)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {row: {name: [] for name in trees} for row in rows}
        for step in range(repeat):
            for row, (statement, package_row) in rows.items():
                for name, tree in trees.items():  # alternated, so drift in the machine's load hits both
                    runs[row][name].append(_run(statement, envs[name], tree, package_row))
            print(f"  run {step + 1}/{repeat} done", file=sys.stderr)
    return {row: {name: _summary(found) for name, found in by.items()} for row, by in runs.items()}


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median of each measure, and ``cpu_spread``: (max - min) / median of the CPU ms."""
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    cpu = [run["cpu_ms"] for run in runs]
    medians["cpu_spread"] = (max(cpu) - min(cpu)) / medians["cpu_ms"] if medians["cpu_ms"] else 0.0
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=10, help="fresh interpreters per row and tree (median)")
    parser.add_argument("--before", type=Path, help="a tree holding the package as it was, to run beside this one")
    parser.add_argument("--before-rev", help="a git revision of this repository to unpack and run as --before")
    parser.add_argument("--now", type=Path, default=ROOT, help="the tree to measure (default: this one)")
    parser.add_argument("--no-bytecode", action="store_true", help="compile every module in every child")
    parser.add_argument("--no-peers", action="store_true", help="only threaddispatch's rows")
    args = parser.parse_args(argv)

    rows = {row: (statement, "threaddispatch" in statement) for row, statement in ROWS.items()}
    if not args.no_peers:
        rows.update({row: (statement, False) for row, (module, statement) in PEERS.items() if _installed(module)})
    with tempfile.TemporaryDirectory(prefix="bench-import-before-") as unpacked:
        before = _unpack(args.before_rev, Path(unpacked)) if args.before_rev else args.before
        trees = {"now": args.now.resolve()}
        if before is not None:
            trees = {"before": before.resolve(), **trees}
        results = measure(rows, trees, args.repeat, bytecode=not args.no_bytecode)
    _print_table(results, list(trees))
    cache = "no bytecode written (the package compiled in every child)" if args.no_bytecode else "bytecode cached"
    print(
        f"\nPython {sys.version.split()[0]}; median of {args.repeat} fresh interpreters per cell; {cache}. "
        "ms: the statement alone, inside the child; process ms: the whole child, interpreter start included; "
        "CPU spread: (max - min) / median; x BD: CPU over `from threaddispatch import BackgroundDispatcher` (now)."
    )


def _print_table(results: dict[str, dict[str, dict[str, float]]], trees: list[str]) -> None:
    headers = ["Row"]
    for name in trees:
        headers += [f"ms ({name})", f"CPU ms ({name})"]
    if len(trees) == 2:
        headers += ["before/now (wall)", "before/now (CPU)"]
    headers += ["CPU spread (now)", "process ms (now)", "x BD (CPU)"]
    reference = results["from threaddispatch import BackgroundDispatcher"]["now"]["cpu_ms"]
    table = []
    for row, by_tree in results.items():
        cells = [row]
        for name in trees:
            cells += [f"{by_tree[name]['wall_ms']:.1f}", f"{by_tree[name]['cpu_ms']:.1f}"]
        now = by_tree["now"]
        if len(trees) == 2:
            old = by_tree["before"]
            cells += [_ratio(old["wall_ms"], now["wall_ms"]), _ratio(old["cpu_ms"], now["cpu_ms"])]
        cells += [f"{now['cpu_spread']:.0%}", f"{now['process_ms']:.0f}", _ratio(now["cpu_ms"], reference)]
        table.append(cells)
    sys.path.insert(0, str(HERE.parent))
    from bench_buffered import print_table

    print_table(headers, table)


def _ratio(top: float, bottom: float) -> str:
    return f"{top / bottom:.1f}x" if bottom > 0.05 else "-"


if __name__ == "__main__":
    main()
