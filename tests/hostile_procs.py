"""Helpers of the hostile cross-process tests: start a ``python -c`` script, and end the scripts started."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spawn(script: str) -> subprocess.Popen[str]:
    """Run ``script`` in a new interpreter, its stdin and stdout pipes of text."""
    return subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def end_all(processes: Sequence[subprocess.Popen[str]]) -> None:
    """Close every running script's stdin (a worker script then stops its engines), wait, kill what is left."""
    for process in processes:
        if process.poll() is None and process.stdin is not None:
            process.stdin.close()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
