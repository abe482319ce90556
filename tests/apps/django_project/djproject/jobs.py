"""The project's engine (``THREADDISPATCH["ENGINE"] = "djproject.jobs.engine"``); its jobs are in ``shop/tasks.py``."""

import os
from pathlib import Path

from threaddispatch.jobs import JobEngine
from threaddispatch.stores import open_store

engine = JobEngine(
    open_store(f"sqlite:///{Path(os.environ['SHOP_DIR']) / 'jobs.db'}"), poll_interval=0.02, max_poll_interval=0.2
)
#: Not an engine: for the check that ENGINE must name one.
not_an_engine = 42
