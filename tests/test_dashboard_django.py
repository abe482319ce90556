"""The dashboard mounted in Django with ``ADMIN_AUTH = "staff"``, in a real browser: its mutations pass the CSRF check.

The fixture project (tests/apps/django_project) runs under gunicorn on 127.0.0.1; headless
Chromium logs in through the Django admin's form, opens the dashboard and pauses a queue
by clicking. Django refuses a session-authenticated POST without ``X-CSRFToken`` (403), so
the page must send the ``csrftoken`` cookie back. Skipped where Django, gunicorn,
Chromium or selenium is missing (failed with ``CI`` set, as the other browser tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")
pytest.importorskip("gunicorn")

from test_dashboard_browser import WAIT, _click, _css, _until, _visible, driver  # noqa: F401 - driver: a fixture
from test_django_native import PASSWORD, PROJECT, manage, project_env

from tests.apps import Processes
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import SQLiteStore
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    """The project under gunicorn (staff mode, a staff user ``ops``); its base URL."""
    for args in (("migrate", "--noinput"), ("createsuperuser", "--noinput", "--username", "ops", "--email", "o@x.io")):
        done = manage(tmp_path, *args)
        assert done.returncode == 0, done.stderr
    with Processes(tmp_path) as processes:
        _server, port = processes.gunicorn("gunicorn", "djproject.wsgi:application", cwd=PROJECT,
                                           env=project_env(tmp_path))  # fmt: skip
        yield f"http://127.0.0.1:{port}"


def test_the_dashboard_pauses_a_queue_behind_the_django_staff_login(
    driver: Any,  # noqa: F811 - the fixture imported above
    site: str,
    tmp_path: Path,
) -> None:
    """Logged in as staff, a click on Pause pauses the queue: the POST carried the CSRF token Django asks for."""
    driver.get(f"{site}/admin/login/?next=/ops/dispatch/")
    _visible(driver, "id_username").send_keys("ops")
    driver.find_element("id", "id_password").send_keys(PASSWORD)
    driver.find_element("css selector", "input[type=submit]").click()
    _visible(driver, "app")  # the dashboard, with no token asked: the session decides
    _css(driver, '#queues tr[data-queue="default"] button')

    store = SQLiteStore(tmp_path / "jobs.db")
    try:
        engine = JobEngine(store)
        _click(driver, '#queues tr[data-queue="default"] button')
        status = driver.find_element("id", "status")

        def settled(_driver: Any) -> bool:
            return "default" in engine.paused_queues() or ("/pause: " in status.text and "done" not in status.text)

        _until(driver, settled, "the pause answered")
        assert engine.paused_queues() == {"default"}, status.text
        state = '#queues tr[data-queue="default"] .queue-state'
        _until(driver, lambda d: d.find_element("css selector", state).text == "paused", "paused shown")
        wait_for(lambda: engine.paused_queues() == {"default"}, WAIT, message="still paused")
    finally:
        store.close()
