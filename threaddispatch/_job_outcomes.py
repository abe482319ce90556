"""The one write path of job outcomes: a batch of finished attempts becomes store writes.

Every outcome (a handler's success or failure, a timeout, in normal or immediate mode,
while running or after stop) is an :class:`Outcome`, and every batch of them is written by
:meth:`Recorder.write`: failures one store call each (cancelled, retrying, or failed with a
dead letter), successes in ONE ``complete_many`` (the group commit), or in one
``complete_and_claim`` with the fetcher's next claim. The writer updates each job record
as stored and returns what follows (:class:`Effects`); the runtime applies those to its
in-flight table and emits the events. Never called with the shared lock held.

Each outcome, once stored, is logged here, one line a job with :func:`job_fields` as
``extra``: done (INFO), a retry asked for with ``Retry`` (INFO) or after an error (WARNING,
the error's one-line summary; its traceback at DEBUG), dead-lettered (WARNING, with the
traceback of the final failure), cancelled by ``Cancel`` (INFO, no traceback). With
``metrics=`` it is counted there too, by the engine's
:class:`~threaddispatch.metrics.JobRecorder` (None without: one test per outcome).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from typing import Any

from threaddispatch._job_shared import Shared, Slot
from threaddispatch._log_json import log_job
from threaddispatch._validate import check_seconds
from threaddispatch.backoff import RetryPolicy
from threaddispatch.errors import Cancel, ConfigurationError, Retry, StoreError
from threaddispatch.metrics import JobRecorder
from threaddispatch.stores.base import Completion, JobRecord, JobState

__all__ = ["Effects", "Outcome", "Recorder", "encode_result", "error_text", "storable"]

_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_MAX_ERROR_TEXT = 8000


def storable(text: str) -> str:
    """``text`` as every store can hold it: NUL and lone surrogates spelled out (``\\x00``, ``\\ud800``).

    PostgreSQL cannot store NUL in text, and neither SQLite nor PostgreSQL can store a lone
    surrogate (UTF-8 cannot encode it; ``os.fsdecode`` of undecodable bytes makes them): an
    unstorable error text would strand its job as running until the reaper.
    """
    text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def error_text(error: BaseException) -> str:
    """``error`` with its traceback as stored (:func:`storable`), at most the last 8,000 characters."""
    text = storable("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return text if len(text) <= _MAX_ERROR_TEXT else "...\n" + text[-_MAX_ERROR_TEXT:]


def encode_result(shared: Shared, job: JobRecord, result: object) -> tuple[str | None, str | None]:
    """A handler's result as stored: (JSON text, None), or (None, a note) when it is not JSON."""
    if result is None:
        return None, None
    try:
        return _ENCODER.encode(result), None
    except (TypeError, ValueError, RecursionError) as error:
        note = storable(f"result not stored: not JSON-serialisable ({error})")
        shared.logger.error("job %s %s: %s", job.name, job.id, note)
        return None, note


def span_text(seconds: float) -> str:
    """``seconds`` for a log line: ``0 s``, ``0.4 ms``, ``12 ms``, ``4 s``, ``12.5 s``, ``3600 s``."""
    if seconds <= 0:
        return "0 s"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"


def summary(error: BaseException) -> str:
    """``error`` on one line: its type and the first line of its message."""
    message = str(error).strip().partition("\n")[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Outcome:
    """One finished attempt: ``error`` None for a success (``text``/``note``/``result`` then hold it).

    ``ends_slot``: the handler is done, so the slot leaves the in-flight table once written;
    False for a timeout, whose thread still runs the handler (that thread ends the slot).
    ``elapsed``: seconds from the attempt's start to this outcome (for the log line).
    """

    __slots__ = ("elapsed", "ends_slot", "error", "note", "result", "slot", "text")

    def __init__(
        self,
        slot: Slot,
        error: BaseException | None,
        *,
        text: str | None = None,
        note: str | None = None,
        result: object = None,
        ends_slot: bool = True,
    ) -> None:
        self.slot = slot
        self.error = error
        self.text = text
        self.note = note
        self.result = result
        self.ends_slot = ends_slot
        self.elapsed = time.monotonic() - slot.ctx.started


class Effects:
    """What a written batch leads to: counters to add, claims found lost, events to emit in order.

    ``store_failed``: the success write (and the claim with it) raised ``store_error`` (any
    Exception, a StoreError or not: the claim took nothing we know of, and the batch's
    successes are left to the reaper).
    """

    __slots__ = ("counts", "events", "lost", "store_error", "store_failed")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.lost: list[Slot] = []
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self.store_failed = False
        self.store_error: Exception | None = None

    def add(self, counter: str) -> None:
        self.counts[counter] = self.counts.get(counter, 0) + 1


class Recorder:
    """Writes batches of outcomes for the claims of ``worker_id`` (see the module docstring)."""

    def __init__(self, shared: Shared, worker_id: str, meter: JobRecorder | None = None) -> None:
        self._shared = shared
        self._worker_id = worker_id
        self._meter = meter  # None: no metrics (one test per outcome)

    def write(
        self, batch: Sequence[Outcome], claim: tuple[Sequence[str], int] | None = None
    ) -> tuple[Effects, list[JobRecord]]:
        """Write ``batch``; with ``claim = (queues, limit)`` also claim that many jobs in the success write.

        Returns the effects and the jobs claimed. A StoreError on a failure's write leaves that
        job to the reaper; on the success write, every success of the batch (``store_failed``).
        """
        effects = Effects()
        successes = []
        for outcome in batch:
            if outcome.error is None:
                successes.append(outcome)
            else:
                self._failure(outcome, outcome.error, effects)
        claimed: list[JobRecord] = []
        if successes or claim is not None:
            claimed = self._successes(successes, claim, effects)
        return effects, claimed

    # -- successes -------------------------------------------------------------------------------------

    def _successes(
        self, batch: list[Outcome], claim: tuple[Sequence[str], int] | None, effects: Effects
    ) -> list[JobRecord]:
        store = self._shared.store
        completions = [Completion(o.slot.job.id, self._worker_id, o.slot.job.attempts, o.text, o.note) for o in batch]
        now = time.time()
        claimed: list[JobRecord] = []
        try:
            if claim is None:
                applied = store.complete_many(completions, now=now)
            elif completions:
                # Group commit: the finished jobs and the next claim share one transaction.
                queues, limit = claim
                applied, claimed = store.complete_and_claim(
                    completions, queues, limit, worker_id=self._worker_id, now=now
                )
            else:
                queues, limit = claim
                applied = set()
                claimed = store.claim(queues, limit, worker_id=self._worker_id, now=now)
        except Exception as error:  # any error (a store bug, a codec error): as a StoreError, reaped
            effects.store_failed = True
            effects.store_error = error
            if batch:
                self._shared.logger.error(
                    "%d jobs ran but their completion was not stored; they will be reaped and may run again",
                    len(batch),
                    exc_info=True,
                )
            return []
        listening = self._shared.events.has_listeners("job_completed")
        logger = self._shared.logger
        logging_done = logger.isEnabledFor(logging.INFO)
        meter = self._meter
        completed = 0
        for outcome in batch:
            job = outcome.slot.job
            if job.id not in applied:
                effects.lost.append(outcome.slot)
                continue
            job.state, job.result, job.finished_at, job.error = JobState.COMPLETED, outcome.text, now, outcome.note
            completed += 1
            if meter is not None:
                meter.completed(job, outcome.elapsed)
            if listening:
                effects.events.append(("job_completed", (job, outcome.result)))
            if logging_done:
                log_job(logger, logging.INFO, job, "done", f"done in {span_text(outcome.elapsed)}",
                        duration_ms=round(outcome.elapsed * 1000, 3))  # fmt: skip
        if completed:
            effects.counts["completed"] = completed
        return claimed

    # -- failures --------------------------------------------------------------------------------------

    def _failure(self, outcome: Outcome, error: BaseException, effects: Effects) -> None:
        """Record a failed attempt: cancelled, retrying, or failed with a dead letter. Never raises.

        When deciding or recording the outcome raises (anything but a StoreError, which leaves
        the job to the reaper), the attempt still ends: the job fails for good with a dead letter.
        """
        slot = outcome.slot
        try:
            self._settle_failure(outcome, error, effects)
        except Exception as broken:  # a job must never be left running by a bug here
            self._shared.logger.exception(
                "job %s %s: recording its failure (%s) raised; failing it for good", slot.job.name, slot.job.id,
                type(error).__name__,
            )  # fmt: skip
            self._fail_for_good(outcome, error, broken, effects)

    def _fail_for_good(self, outcome: Outcome, error: BaseException, broken: Exception, effects: Effects) -> None:
        """The fallback of :meth:`_failure`: fail the claim with a dead letter carrying both errors."""
        slot = outcome.slot
        job = slot.job
        now = time.time()
        try:
            text = f"{error_text(error)}\nwhile recording it: {error_text(broken)}"
            letter = self._shared.store.fail(
                job.id, worker_id=self._worker_id, attempts=job.attempts, error=text, now=now
            )
        except Exception:  # nothing is left to try: the reaper recovers the job
            self._shared.logger.exception("job %s %s: its failure was not stored; it will be reaped", job.name, job.id)
            return
        if letter is None:
            effects.lost.append(slot)
            return
        job.state, job.error, job.finished_at = JobState.FAILED, text, now
        effects.add("failed")
        effects.add("dead_lettered")
        if self._meter is not None:
            self._meter.failed(job, outcome.elapsed, error, retried=False)
        self._log_dead_letter(job, error, None)

    def _retry_delay(self, slot: Slot, error: BaseException) -> tuple[float | None, BaseException]:
        """Seconds before the next attempt (None: fail for good), and the error to record.

        The decision is :meth:`RetryPolicy.next_delay`'s, with the job's own limit
        (``max_retries + 1`` attempts) and the definition's backoff or the engine's. A
        ``Retry`` whose delay is bad (set after construction: the constructor checks it)
        makes the failure final at once, recorded with that ConfigurationError, as
        ``next_delay`` rules. (``Retry(delay=-1)`` itself raises in the handler: an
        ordinary error, retried like any other.)
        """
        if isinstance(error, Retry) and error.delay is not None:
            try:
                check_seconds("Retry delay", error.delay)
            except ConfigurationError as bad:
                bad.__cause__ = error
                return None, bad
        backoff = (slot.definition.backoff if slot.definition else None) or self._shared.config.backoff
        policies = self._shared.policies
        try:
            policy = policies.get(backoff)
            if policy is None:
                policy = policies[backoff] = RetryPolicy(backoff=backoff)
        except TypeError:  # an unhashable backoff: no cache
            policy = RetryPolicy(backoff=backoff)
        job = slot.job
        return policy.next_delay(job.attempts, error, max_attempts=job.max_retries + 1), error

    def _settle_failure(self, outcome: Outcome, error: BaseException, effects: Effects) -> None:
        store = self._shared.store
        slot = outcome.slot
        job = slot.job
        now = time.time()
        text = error_text(error)
        worker_id = self._worker_id
        try:
            if isinstance(error, Cancel):
                if store.cancel(job.id, now=now, worker_id=worker_id, attempts=job.attempts, error=text):
                    job.state, job.error, job.finished_at = JobState.CANCELLED, text, now
                    effects.add("cancelled")
                    effects.events.append(("job_cancelled", (job, error)))
                    self._log_cancelled(job, error)
                else:
                    effects.lost.append(slot)
                return
            delay, error = self._retry_delay(slot, error)
            text = error_text(error)
            if delay is not None:
                if self._shared.config.immediate:
                    delay = 0.0  # immediate mode retries at once
                run_at = now + delay
                if store.retry_later(
                    job.id, worker_id=worker_id, attempts=job.attempts, run_at=run_at, error=text, now=now
                ):
                    job.state, job.error, job.run_at = JobState.RETRYING, text, run_at
                    effects.add("retried")
                    if self._meter is not None:
                        self._meter.failed(job, outcome.elapsed, error, retried=True)
                    effects.events.append(("job_retrying", (job, error, delay)))
                    self._log_retrying(outcome, error, delay)
                else:
                    effects.lost.append(slot)
                return
            letter = store.fail(job.id, worker_id=worker_id, attempts=job.attempts, error=text, now=now)
            if letter is None:
                effects.lost.append(slot)
                return
            job.state, job.error, job.finished_at = JobState.FAILED, text, now
            effects.add("failed")
            effects.add("dead_lettered")
            if self._meter is not None:
                self._meter.failed(job, outcome.elapsed, error, retried=False)
            effects.events.append(("job_failed", (job, error)))
            effects.events.append(("job_dlq", (job, letter)))
            self._log_dead_letter(job, error, outcome.elapsed)
        except StoreError:
            self._shared.logger.exception(
                "job %s %s failed (%s) but the failure was not stored; it will be reaped and run again",
                job.name, job.id, type(error).__name__,
            )  # fmt: skip

    # -- the log lines of failures -----------------------------------------------------------------

    def _log_cancelled(self, job: JobRecord, error: BaseException) -> None:
        """A deliberate ``Cancel``: INFO, no traceback."""
        logger = self._shared.logger
        if logger.isEnabledFor(logging.INFO):
            log_job(logger, logging.INFO, job, "cancelled", f"cancelled: {summary(error)}")

    def _log_retrying(self, outcome: Outcome, error: BaseException, delay: float) -> None:
        """A retry: INFO when the handler asked for it (``Retry``), else WARNING with the error's
        summary; the traceback at DEBUG, in a line of its own."""
        logger = self._shared.logger
        job = outcome.slot.job
        asked = isinstance(error, Retry)
        level = logging.INFO if asked else logging.WARNING
        if logger.isEnabledFor(level):
            what = "asked for a retry" if asked else "failed"
            log_job(logger, level, job, "retrying", f"{what} after {span_text(outcome.elapsed)} ({summary(error)}), "
                    f"retry in {span_text(delay)}", error=summary(error), retry_in=delay)  # fmt: skip
        if not asked and logger.isEnabledFor(logging.DEBUG):
            log_job(logger, logging.DEBUG, job, "retrying", "traceback of the failed attempt", exc_info=error)

    def _log_dead_letter(self, job: JobRecord, error: BaseException, elapsed: float | None) -> None:
        """The final failure: WARNING, with its traceback (the operator's one place to find it)."""
        took = "" if elapsed is None else f" after {span_text(elapsed)}"
        text = f"failed{took} ({summary(error)}), dead-lettered after {_plural(job.attempts, 'attempt')}"
        log_job(self._shared.logger, logging.WARNING, job, "dead_lettered", text, exc_info=error, error=summary(error))
