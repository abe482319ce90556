"""What a job's outcome stores is text every store can hold: NUL and lone surrogates spelled out.

A lone surrogate (``os.fsdecode`` of undecodable bytes makes them) cannot be encoded as
UTF-8, so SQLite and PostgreSQL cannot store it; NUL cannot be stored by PostgreSQL. The
error text of a failed attempt is pinned in test_hostile_s25_jobs_text (every store); here
:func:`~threaddispatch._job_outcomes.storable` itself, which the error texts and the note of a
result that is not JSON go through.
"""

from __future__ import annotations

import pytest

from threaddispatch._job_outcomes import storable


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("plain é €", "plain é €"),
        ("a\x00b", "a\\x00b"),
        ("bad \ud800 text", "bad \\ud800 text"),
        ("\udcff\x00", "\\udcff\\x00"),
    ],
)
def test_storable_spells_out_only_what_no_store_can_hold(text: str, stored: str) -> None:
    assert storable(text) == stored
    stored.encode("utf-8")  # encodable: no UnicodeEncodeError
