"""Logs a machine can read: :class:`JsonFormatter`, and the job fields of the worker's log lines.

Every per-job line of a JobEngine worker (started, done, retrying, dead-lettered, cancelled)
carries :func:`job_fields` as ``extra``: the record gets ``job_id``, ``job_name``, ``queue``,
``attempt`` and ``outcome`` attributes, which :class:`JsonFormatter` (or any JSON formatter
reading a record's extra attributes) writes as fields. The message text carries them too.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from threaddispatch.stores.base import JobRecord

__all__ = ["JsonFormatter", "job_fields", "log_job"]

# The attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def job_fields(job: JobRecord, outcome: str, **more: object) -> dict[str, object]:
    """The ``extra`` of a per-job log line: the job's id, name, queue and attempt, the outcome, ``more``."""
    return {
        "job_id": job.id,
        "job_name": job.name,
        "queue": job.queue,
        "attempt": job.attempts,
        "outcome": outcome,
        **more,
    }


def log_job(
    logger: logging.Logger,
    level: int,
    job: JobRecord,
    outcome: str,
    text: str,
    *,
    exc_info: BaseException | None = None,
    **more: object,
) -> None:
    """Log ``job <name> <id> (queue <q>, attempt <n>) <text>`` at ``level`` with :func:`job_fields` as extra."""
    logger.log(
        level, "job %s %s (queue %s, attempt %d) %s", job.name, job.id, job.queue, job.attempts, text,
        exc_info=exc_info, extra=job_fields(job, outcome, **more),
    )  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``process`` (the pid: worker processes of one supervisor are told apart), ``message``,
    every ``extra`` field of the record, and ``exc_info`` / ``stack_info`` as text when the
    record has them. A value JSON cannot hold is written as its ``str()``.

    For containers: ``threaddispatch worker --log-format json``; or
    ``handler.setFormatter(JsonFormatter())`` on any handler.
    """

    def format(self, record: logging.LogRecord) -> str:
        """``record`` as one line of JSON (no newline inside: tracebacks are escaped)."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = record.exc_text or self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
