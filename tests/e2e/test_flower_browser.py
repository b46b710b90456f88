"""Flower in a real headless Chromium: it shows the registered worker and a finished run_container task with
readable arguments. The screenshots are kept in artifacts/."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from cloudai.models import TaskStatus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, ServerProc, cli_env, cloudai, wait_for
from tests.services import TEST_IMAGE, chromium, free_port

ARTIFACTS = ROOT / "artifacts"
AUTH = ("viewer", "s3cret")


@pytest.fixture
def flower(settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    with open(tmp_path / "flower.log", "wb") as log:
        proc = subprocess.Popen(cloudai("flower", "--port", str(port), "--basic-auth", ":".join(AUTH)), cwd=ROOT,
                                env=cli_env(settings), stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            except urllib.error.HTTPError:
                return True  # it answers (401 without credentials)
            except OSError:
                return False
            return True

        wait_for(up, 60, 0.2, "flower to listen")
        yield f"127.0.0.1:{port}"
        proc.terminate()
        proc.wait(20)


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    chrome = chromium("1400,900")
    yield chrome
    chrome.quit()


@pytest.mark.timeout(240)
def test_flower_shows_workers_and_tasks_with_readable_arguments_and_true_states(
    settings: Settings, store: SQLiteStore, workers, flower: str, browser, api_server: ServerProc  # type: ignore[no-untyped-def]
) -> None:
    """Also issue 11's "Flower tells the truth": a container that exited 2 and one killed for memory show as
    FAILURE with the reason (from the worker's events: the messages are sent with ``ignore_result``, so the
    result backend holds nothing; the store has the outcome)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"http://{flower}/", timeout=5)
    assert denied.value.code == 401  # basic auth is on

    env = api_server.cli_env(api_server.token(settings.user))

    def submit(*args: str) -> str:
        result = subprocess.run(cloudai("submit", "-q", *args), cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    proc = workers()
    task_id = submit( "--cpus", "0.5", "-m", "64m", "--shell", TEST_IMAGE, "echo hello from flower test")
    failed_id = submit("-m", "64m", "--shell", TEST_IMAGE, "echo failing; exit 2")
    oom_id = submit("-m", "32m", "--shell", TEST_IMAGE, "x=$(head -c 200000000 /dev/zero | tr '\\0' a)")
    wait_for(lambda: store.get_task(task_id).status == TaskStatus.COMPLETED, 60, what="task")  # type: ignore[union-attr]
    for other in (failed_id, oom_id):
        wait_for(lambda o=other: store.get_task(o).status == TaskStatus.FAILED, 60, what="failure")  # type: ignore[misc,union-attr]
    ARTIFACTS.mkdir(exist_ok=True)
    user, password = AUTH
    base = f"http://{user}:{password}@{flower}"

    def body() -> str:  # the page's visible text; a narrow column may wrap a name at its hyphen
        return str(browser.find_element(By.TAG_NAME, "body").text).replace("\n-", "-")

    def worker_listed(_: object) -> bool:
        browser.get(f"{base}/workers?refresh=1")  # Flower asks the workers (inspect) on a refresh
        return f"{proc.worker_id}@" in body()

    WebDriverWait(browser, 40, poll_frequency=1).until(worker_listed)
    browser.save_screenshot(str(ARTIFACTS / "flower-workers.png"))

    browser.get(f"{base}/tasks")
    WebDriverWait(browser, 30).until(lambda _: f"{task_id}.1" in body())
    text = body()
    assert "cloudai.run_container" in text and "SUCCESS" in text
    browser.save_screenshot(str(ARTIFACTS / "flower-tasks.png"))

    browser.get(f"{base}/task/{task_id}.1")
    WebDriverWait(browser, 30).until(lambda _: "cloudai.run_container" in body())
    text = body()
    for readable in (task_id, TEST_IMAGE, "'user': 'tester'", "'cpus': 0.5", "'memory_bytes': 67108864",
                     "echo hello from flower test"):
        assert readable in text, readable
    browser.save_screenshot(str(ARTIFACTS / "flower-task.png"))

    for tid, reason, shot in ((failed_id, "exit 2", "flower-task-failed.png"),
                              (oom_id, "killed: out of memory, limit 32 MiB", "flower-task-oom.png")):
        def failure_shown(_: object, tid: str = tid, reason: str = reason) -> bool:
            browser.get(f"{base}/task/{tid}.1")
            text = body()
            return "FAILURE" in text and f"TaskFailed('{reason}')" in text

        WebDriverWait(browser, 30, poll_frequency=1).until(failure_shown)
        browser.save_screenshot(str(ARTIFACTS / shot))
    browser.get(f"{base}/tasks")
    WebDriverWait(browser, 30).until(lambda _: f"{oom_id}.1" in body() and f"{failed_id}.1" in body())
    assert body().count("FAILURE") >= 2
    browser.save_screenshot(str(ARTIFACTS / "flower-tasks-failures.png"))
    assert not redis.Redis.from_url(settings.redis_url).keys("celery-task-meta-*")  # ignore_result: none kept
