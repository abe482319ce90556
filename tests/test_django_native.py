"""The Django app the Django way, in a fresh project (tests/apps/django_project) run as its users run it.

Every test runs ``manage.py`` or gunicorn in its own process, so the project's settings
never meet the in-process settings of tests/test_contrib_django.py: system checks
(``manage.py check``), autodiscovery of ``tasks.py``, the admin behind
``staff_member_required`` and a worker process running each job exactly once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

pytest.importorskip("django")

from tests.apps import ROOT, Processes, check_each_job_ran_once, cookies, http, place_orders

pytestmark = pytest.mark.timeout(120)

PROJECT = ROOT / "tests" / "apps" / "django_project"
PASSWORD = "fixture-password-1"


def project_env(directory: Path, settings: dict[str, object] | None = None, **extra: str) -> dict[str, str]:
    """The environment of the project's processes: its directory, THREADDISPATCH as JSON, ``tests.apps`` importable."""
    env = {"SHOP_DIR": str(directory), "PYTHONPATH": str(ROOT), "DJANGO_SUPERUSER_PASSWORD": PASSWORD, **extra}
    if settings is not None:
        env["TD_SETTINGS"] = json.dumps(settings)
    return env


def manage(directory: Path, *args: str, settings: dict[str, object] | None = None, **extra: str,
           ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``python manage.py ARGS`` in the project; its output in ``stdout`` and ``stderr``."""
    env = {**os.environ, **project_env(directory, settings, **extra)}
    argv = [sys.executable, "manage.py", *args]
    return subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.mark.parametrize(
    ("settings", "extra", "ids"),
    [
        ({"ENGINE": "djproject.nope.engine", "TOKEN": "t"}, {}, ["threaddispatch.E001"]),
        ({"ENGINE": "djproject.jobs.not_an_engine", "TOKEN": "t"}, {}, ["threaddispatch.E001"]),
        ({"ENGINE": "djproject.jobs.engine"}, {}, ["threaddispatch.E002"]),
        ({"ENGINE": "djproject.jobs.engine", "ADMIN_AUTH": "staff"}, {"TD_NO_ADMIN": "1"}, ["threaddispatch.E004"]),
        ({"TOKEN": "t"}, {}, ["threaddispatch.W001"]),
        ({"ENGINE": "djproject.jobs.engine", "TOKEN": "t"}, {}, []),
        ({"ENGINE": "djproject.jobs.engine", "ADMIN_AUTH": "staff"}, {}, []),
    ],
)
def test_manage_py_check_reports_the_setting_with_ids_and_hints(
    tmp_path: Path, settings: dict[str, object], extra: dict[str, str], ids: list[str]
) -> None:
    """A bad ENGINE path or object, a missing TOKEN, staff without the admin: one message each, with a hint."""
    result = manage(tmp_path, "check", settings=settings, **extra)
    output = result.stdout + result.stderr
    assert re.findall(r"\((threaddispatch\.[EW]\d{3})\)", output) == ids, output
    if not ids:
        assert result.returncode == 0 and "no issues" in output, output
        return
    assert "HINT:" in output
    assert result.returncode == (0 if ids[0].startswith("threaddispatch.W") else 1), output


def test_checks_report_a_setting_changed_after_startup(tmp_path: Path) -> None:
    """E003: a setting made invalid later (override_settings) is a check error, not a crash of the check run."""
    code = "\n".join([
        "from django.core import checks",
        "from django.test import override_settings",
        "with override_settings(THREADDISPATCH={'STOR': 'x'}):",
        "    print([(m.id, m.msg) for m in checks.run_checks() if m.id.startswith('threaddispatch')])",
    ])  # fmt: skip
    result = manage(tmp_path, "shell", "-c", code, settings={"ENGINE": "djproject.jobs.engine", "TOKEN": "t"})
    assert "[('threaddispatch.E003', \"settings.THREADDISPATCH: unknown key 'STOR'" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("settings", "registered"),
    [
        ({"ENGINE": "djproject.jobs.engine", "TOKEN": "t"}, ["shop.record"]),
        ({"ENGINE": "djproject.jobs.engine", "TOKEN": "t", "AUTODISCOVER": False}, []),
    ],
)
def test_tasks_modules_are_autodiscovered_at_startup(
    tmp_path: Path, settings: dict[str, object], registered: list[str]
) -> None:
    """shop/tasks.py, imported by nothing, registers its job at ready() unless AUTODISCOVER is False."""
    code = "from threaddispatch.contrib.django import get_engine; print(sorted(get_engine().definitions()))"
    result = manage(tmp_path, "shell", "-c", code, settings=settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr(registered)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ENGINE": "djproject.jobs.engine", "ADMIN_AUTH": "session"}, "ADMIN_AUTH must be 'token' or 'staff'"),
        ({"ENGINE": "djproject.jobs.engine", "ADMIN_AUTH": "staff", "TOKEN": "t"}, "TOKEN is not used"),
        ({"ENGINE": "djproject.jobs.engine", "AUTODISCOVER": "my tasks"}, "AUTODISCOVER must be True, False"),
    ],
)
def test_bad_new_settings_stop_the_startup(tmp_path: Path, settings: dict[str, object], message: str) -> None:
    result = manage(tmp_path, "check", settings=settings)
    assert result.returncode != 0 and f"ImproperlyConfigured: settings.THREADDISPATCH: {message}" in result.stderr


def test_worker_command_log_level_is_checked(tmp_path: Path) -> None:
    result = manage(tmp_path, "threaddispatch_worker", "--log-level", "LOUD")
    assert result.returncode != 0 and "--log-level" in result.stderr


# -- a real server: gunicorn --preload -w 2, the Django admin's login, a worker process ----------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The processes a test starts: every one is stopped at teardown."""
    with Processes(tmp_path) as started:
        yield started


def log_in(port: int) -> dict[str, str]:
    """Log in as the staff user through the Django admin's form; returns the session's cookies."""
    status, headers, body = http(port, "GET", "/admin/login/")
    assert status == 200
    jar = cookies(headers)
    form_token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', body)
    assert form_token is not None
    form = urlencode({"username": "ops", "password": PASSWORD, "csrfmiddlewaretoken": form_token.group(1).decode(),
                      "next": "/ops/dispatch/"})  # fmt: skip
    status, headers, body = http(port, "POST", "/admin/login/", body=form.encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie_header(jar)})  # fmt: skip
    assert status == 302 and headers["Location"] == "/ops/dispatch/", body
    return {**jar, **cookies(headers)}


def cookie_header(jar: dict[str, str]) -> str:
    return "; ".join(f"{name}={value}" for name, value in jar.items())


@pytest.mark.timeout(240)
def test_gunicorn_serves_the_project_and_the_worker_command_runs_each_job_once(
    tmp_path: Path, processes: Processes
) -> None:
    """gunicorn --preload -w 2 on 127.0.0.1: orders through HTTP, the admin behind the staff login,
    ``manage.py threaddispatch_worker`` in its own process running each job exactly once."""
    pytest.importorskip("gunicorn")
    for args in (("migrate", "--noinput"), ("createsuperuser", "--noinput", "--username", "ops", "--email", "o@x.io")):
        done = manage(tmp_path, *args)
        assert done.returncode == 0, done.stderr
    env = project_env(tmp_path)
    server, port = processes.gunicorn("gunicorn", "djproject.wsgi:application", cwd=PROJECT, env=env)

    status, headers, _body = http(port, "GET", "/ops/dispatch/jobs")
    assert status == 302 and headers["Location"].startswith("/admin/login/?next=/ops/dispatch/jobs")
    jar = log_in(port)
    session = {"Cookie": cookie_header(jar)}
    status, headers, body = http(port, "GET", "/ops/dispatch/", headers={**session, "Accept": "text/html"})
    assert status == 200 and b'data-base="/ops/dispatch"' in body  # the dashboard, behind the login too
    assert http(port, "POST", "/ops/dispatch/queues/default/pause", headers=session)[0] == 403  # no CSRF token
    csrf = {**session, "X-CSRFToken": jar["csrftoken"]}
    status, _headers, body = http(port, "POST", "/ops/dispatch/queues/default/pause", headers=csrf)
    assert (status, json.loads(body)) == (200, {"queue": "default", "paused": True})
    assert http(port, "POST", "/ops/dispatch/queues/default/resume", headers=csrf)[0] == 200

    job_ids = place_orders(port, 20)
    worker_argv = [sys.executable, "manage.py", "threaddispatch_worker", "--log-level", "INFO"]
    worker = processes.start("worker", worker_argv, cwd=PROJECT, env=env)
    check_each_job_ran_once(tmp_path, job_ids)
    status, _headers, body = http(port, "GET", "/ops/dispatch/jobs/counts", headers=session)
    assert status == 200 and json.loads(body)["counts"]["completed"] == len(job_ids)
    assert processes.stop(worker) == 0, processes.log(worker)
    log = processes.log(worker)
    assert "worker starting: threaddispatch.contrib.django.conf:get_engine" in log and "concurrency=4" in log
    assert "worker stopped (clean)" in log and "threaddispatch worker: stopped cleanly" in log
    assert processes.stop(server) == 0, processes.log(server)
