"""The shop's jobs, registered on the project's engine when autodiscovery imports this module."""

import os
from pathlib import Path
from typing import Any

from djproject.jobs import engine

from tests.apps import record_run


@engine.job("shop.record")
def record(ctx: Any, payload: dict[str, int]) -> int:
    """One row per run in ``<SHOP_DIR>/runs.db``: the test counts them."""
    record_run(Path(os.environ["SHOP_DIR"]) / "runs.db", payload["n"])
    return payload["n"]
