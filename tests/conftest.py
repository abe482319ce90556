"""Shared fixtures: every test must leave no threaddispatch thread running."""

from __future__ import annotations

import gc
import time

import pytest

from threaddispatch.testing import live_dispatch_threads


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> object:
    """Fail a test that leaves a ``threaddispatch-*`` thread alive (after a short grace to exit)."""
    before = set(live_dispatch_threads())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        left = [t for t in live_dispatch_threads() if t not in before]
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"test left threads running: {[t.name for t in left]}")
        gc.collect()
        left[0].join(0.05)
