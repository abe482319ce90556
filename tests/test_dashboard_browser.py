"""The dashboard in a real browser: headless Chromium (Debian's, driven by selenium) against a real server on 127.0.0.1.

Skipped where chromium, chromedriver or selenium is missing, failed instead with ``CI``
set. Every wait is on the page's state (WebDriverWait) or the store's (wait_for).
The screenshot goes to the test's tmp_path; with THREADDISPATCH_SCREENSHOT=1 also to
docs/dashboard.png (the README's picture; not rewritten by every run).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from threaddispatch._cli_admin import _when as cli_when
from threaddispatch._job_enqueue import new_record
from threaddispatch.admin import make_server, make_wsgi_app
from threaddispatch.jobs import JobEngine
from threaddispatch.stores import MemoryStore
from threaddispatch.stores.base import JobState
from threaddispatch.testing import wait_for

pytestmark = pytest.mark.timeout(120)

TOKEN = "browser-token"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
XSS = "<img src=x onerror=window.__pwned=1>"  # no double quote: JSON.stringify shows it verbatim
DOCS_PNG = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
WAIT = 30.0


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason}; CI is set, so the browser tests must run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (a fresh profile); each test clears its session storage."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _missing(f"{path} not found (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1700",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield browser
    finally:
        browser.quit()


class Site:
    """An engine on a MemoryStore with a failing job's dead letter, served by the admin app on 127.0.0.1."""

    def __init__(self) -> None:
        self.engine = JobEngine(MemoryStore())
        self.engine.register("send_email", lambda ctx, payload: {"sent": True})
        self.engine.register("boom", _boom, max_retries=0)
        self.engine.register("report", lambda ctx, payload: None, queue="reports")
        self.jobs = [self.engine.enqueue("send_email", {"to": f"user{i}@example.com"}) for i in range(3)]
        self.xss_job = self.engine.enqueue("send_email", {"subject": XSS})
        self.engine.cron("*/5 * * * *", "report", name="nightly-report")
        self.failed = self.engine.enqueue("boom", {"n": 1})
        self.report = self.engine.enqueue("report", {"day": 1})  # its queue is not run: it stays pending
        self.waiting = self.engine.enqueue("report", {"day": 2}, depends_on=[self.report], lock="reports")
        self.engine.run_pending(queues=["default"])  # the failing job dies; the others complete
        assert self.engine.get_job(self.failed).state is JobState.FAILED
        app = make_wsgi_app(self.engine, token=TOKEN)
        self.httpd = make_server(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/api/dispatch/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="threaddispatch-test-dashboard"
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
        self.engine.stop(5)


def _boom(ctx: object, payload: object) -> object:
    raise RuntimeError("mail server said no")


@pytest.fixture
def site() -> Iterator[Site]:
    made = Site()
    yield made
    made.close()


@pytest.fixture
def page(driver: Any, site: Site) -> Any:
    """The browser on the dashboard with no token in the tab."""
    driver.get(site.url)
    driver.execute_script("sessionStorage.clear()")
    driver.get(site.url)
    return driver


def _until(driver: Any, condition: Callable[[Any], Any], message: str) -> Any:
    """Wait for ``condition``; an element a refresh replaced meanwhile (stale) is looked up again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, WAIT, ignored_exceptions=ignored).until(condition, message)


def _click(driver: Any, selector: str) -> None:
    """Click the element at ``selector``, found again when a refresh replaced it before the click."""
    _until(driver, lambda d: d.find_element("css selector", selector).click() or True, f"{selector} clicked")


def _visible(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return _until(driver, ec.visibility_of_element_located((By.ID, element_id)), f"#{element_id} visible")


def _css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return _until(driver, ec.presence_of_element_located((By.CSS_SELECTOR, selector)), f"{selector} present")


def _login(driver: Any, token: str = TOKEN) -> None:
    box = _visible(driver, "token")
    box.send_keys(token)
    driver.find_element("id", "login-submit").click()


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_without_a_token_the_page_asks_for_one_and_the_api_refuses(page: Any, site: Site) -> None:
    _visible(page, "login-form")
    assert not page.find_element("id", "app").is_displayed()
    assert _status(site.url + "jobs") == 401
    assert _status(site.url + "jobs", TOKEN) == 200


def test_a_wrong_token_is_refused_and_asked_again(page: Any, site: Site) -> None:
    _login(page, "not-the-token")
    _until(page, lambda d: "refused" in d.find_element("id", "login-error").text, "the refusal shown")
    assert page.execute_script("return sessionStorage.length") == 0
    _login(page)
    _visible(page, "app")


def test_the_token_lives_in_the_tab_and_a_401_asks_again(page: Any, site: Site) -> None:
    _login(page)
    _css(page, f'#jobs tr[data-job="{site.jobs[0]}"]')
    assert page.execute_script("return sessionStorage.getItem('threaddispatch.admin.token')") == TOKEN
    page.execute_script("sessionStorage.setItem('threaddispatch.admin.token', 'revoked')")
    page.refresh()
    _visible(page, "login-form")
    _until(page, lambda d: "refused" in d.find_element("id", "login-error").text, "the refusal shown")


def test_an_operator_session(page: Any, site: Site, tmp_path: Path) -> None:
    _login(page)
    # The jobs a test enqueued, and the counts.
    for job_id in site.jobs:
        _css(page, f'#jobs tr[data-job="{job_id}"]')
    _until(page, lambda d: d.find_element("css selector", '#counts [data-state="failed"] b').text == "1", "counts")

    # A job's detail shows its payload as text: the markup in it is not rendered.
    _click(page, f'#jobs a[data-id="{site.xss_job}"]')
    _until(page, lambda d: XSS in d.find_element("id", "detail-payload").text, "the payload shown as text")
    assert page.find_elements("css selector", "img") == []
    assert page.execute_script("return window.__pwned === undefined")
    assert '"sent": true' in page.find_element("id", "detail-result").text
    state = '#detail-fields [data-field="state"]'
    _until(page, lambda d: d.find_element("css selector", state).text == "completed", "the job's state")

    # A job waiting on another shows what it waits for, and counts as waiting.
    _until(page, lambda d: d.find_element("css selector", '#counts [data-state="waiting"] b').text == "1", "waiting")
    _click(page, f'#jobs a[data-id="{site.waiting}"]')
    depends = '#detail-fields [data-field="depends on"]'
    _until(page, lambda d: d.find_element("css selector", depends).text == site.report, "the dependency shown")
    assert page.find_element("css selector", '#detail-fields [data-field="state"]').text == "waiting"
    assert page.find_element("css selector", '#detail-fields [data-field="lock"]').text == "reports"

    # Replay the dead letter by clicking: a new job appears in the store and on the page.
    letter = site.engine.dlq()[0]
    _click(page, f'#dlq tr[data-dead-letter="{letter.id}"] button.replay')

    def replays() -> list[str]:
        return [job.id for job in site.engine.list_jobs() if job.name == "boom" and job.id != site.failed]

    replayed = wait_for(replays, WAIT, message="the replayed job")
    _css(page, f'#jobs tr[data-job="{replayed[0]}"]')

    # Pause a queue: the store says paused, the page too.
    _click(page, '#queues tr[data-queue="reports"] button')
    wait_for(lambda: "reports" in site.engine.paused_queues(), WAIT, message="queue paused")
    state = '#queues tr[data-queue="reports"] .queue-state'
    _until(page, lambda d: d.find_element("css selector", state).text == "paused", "paused shown")

    # Disable the cron entry.
    _click(page, '#crons tr[data-cron="nightly-report"] button')
    wait_for(lambda: not site.engine.get_cron("nightly-report").enabled, WAIT, message="cron disabled")
    state = '#crons tr[data-cron="nightly-report"] .cron-state'
    _until(page, lambda d: d.find_element("css selector", state).text == "disabled", "disabled shown")

    # The throughput chart holds this minute's jobs; the workers panel shows only where GET /workers answers.
    _css(page, "#throughput svg rect.bar-completed")
    _css(page, "#throughput svg rect.bar-failed")
    workers_route = _status(site.url + "workers", TOKEN) == 200
    _until(page, lambda d: d.find_element("id", "workers-panel").is_displayed() == workers_route, "the workers panel")

    page.execute_script("window.scrollTo(0, 0)")
    screenshot = tmp_path / "dashboard.png"
    page.save_screenshot(str(screenshot))
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("THREADDISPATCH_SCREENSHOT") == "1":
        DOCS_PNG.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, DOCS_PNG)


def test_purge_asks_first(page: Any, site: Site) -> None:
    from selenium.webdriver.support import expected_conditions as ec

    _login(page)
    _css(page, "#dlq tr[data-dead-letter]")
    page.find_element("id", "dlq-purge").click()
    _until(page, ec.alert_is_present(), "the confirmation").dismiss()
    assert site.engine.dlq_count() == 1
    page.find_element("id", "dlq-purge").click()
    _until(page, ec.alert_is_present(), "the confirmation").accept()
    wait_for(lambda: site.engine.dlq_count() == 0, WAIT, message="purged")
    _until(page, lambda d: not d.find_elements("css selector", "#dlq tr[data-dead-letter]"), "the list emptied")


def _stored_due_at(site: Site, run_at: float) -> str:
    """A pending job due at ``run_at`` written straight to the store, as an older client could have."""
    now = time.time()
    record = dataclasses.replace(new_record("send_email", "1", "default", 0, 3, 300.0, now, now), run_at=run_at)
    [job_id] = site.engine.store.enqueue([record])
    return job_id


def _text_is(by: str, selector: str, text: str) -> Callable[[Any], bool]:
    """A wait condition: the element at ``selector`` shows ``text``."""
    return lambda driver: bool(driver.find_element(by, selector).text == text)


def test_a_stored_time_no_date_holds_shows_as_the_cli_shows_it(page: Any, site: Site) -> None:
    """Past year 9999 (or before year 1) the page shows the CLI's 'far future (epoch 1e+15)', never 'Invalid Date'."""
    times = [1e15, 1e300, -1e15, 1e12, 253402300800.0, 123456789012345.6]
    jobs = {_stored_due_at(site, run_at): run_at for run_at in times}
    _login(page)
    field = '#detail-fields [data-field="run at"]'
    for job_id, run_at in jobs.items():
        _click(page, f'#jobs a[data-id="{job_id}"]')
        _until(page, _text_is("id", "detail-id", job_id), "the job's detail")
        _until(page, _text_is("css selector", field, cli_when(run_at)), cli_when(run_at))
    assert "Invalid Date" not in page.find_element("id", "app").text
    # A time a date holds is shown as a date, not as an epoch number.
    _click(page, f'#jobs a[data-id="{site.jobs[0]}"]')
    _until(page, lambda d: d.find_element("id", "detail-id").text == site.jobs[0], "a plain job's detail")
    assert "epoch" not in page.find_element("css selector", field).text


def test_the_locks_panel_lists_the_holds(page: Any, site: Site) -> None:
    """A handler that outlived its claim: its hold is a row (lock, job, name, state, worker); its release empties it."""
    store = site.engine.store
    job_id = site.engine.enqueue("send_email", {"to": "held@example.com"}, lock="customer:42", priority=1 << 40)
    [claimed] = store.claim(["default"], 1, worker_id="w-held", now=time.time() + 1)
    assert claimed.id == job_id
    assert store.hold_locks([(job_id, 1)], worker_id="w-held", now=time.time()) == {job_id}
    assert store.fail(job_id, worker_id="w-held", attempts=1, error="timed out", now=time.time())
    _login(page)
    _visible(page, "locks-panel")
    row = f'#locks tr[data-job="{job_id}"]'
    _css(page, row)
    cells = [cell.text for cell in page.find_elements("css selector", f"{row} td")]
    assert cells[:6] == ["customer:42", job_id, "send_email", "failed", "1", "w-held"]
    assert all(cell and "Invalid" not in cell for cell in cells[6:8]), cells  # held since, heartbeat
    assert store.release_holds([(job_id, 1)], worker_id="w-held") == 1
    _until(page, lambda d: not d.find_elements("css selector", "#locks tr[data-job]"), "the hold gone")
    assert "no lock holds" in page.find_element("id", "locks").text
