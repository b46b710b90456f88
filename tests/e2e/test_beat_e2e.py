"""Beat in a real process: a SIGKILLed worker's task becomes lost (or retried) once its heartbeat stops; the dead
worker's orphan container is removed when it comes back. How soon is measured in bench/, not here."""

from __future__ import annotations

import subprocess

import pytest

from cloudai.models import TaskStatus
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.e2e.conftest import submit
from tests.helpers import ROOT, cli_env, cloudai, wait_ended, wait_for
from tests.services import TEST_IMAGE

S = TaskStatus


@pytest.fixture
def beat(settings: Settings, tmp_path):  # type: ignore[no-untyped-def]
    with open(tmp_path / "beat.log", "wb") as log:
        proc = subprocess.Popen(cloudai("beat", "--schedule", str(tmp_path / "beat-schedule")), cwd=ROOT,
                                env=cli_env(settings), stdout=log, stderr=subprocess.STDOUT)
        yield proc
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.timeout(240)
def test_killed_worker_task_is_lost(
    settings: Settings, store: SQLiteStore, workers, beat  # type: ignore[no-untyped-def]
) -> None:
    proc = workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, "sleep 300")
    running = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
    proc.kill()
    lost = wait_ended(store, task_id, 60)
    assert lost.status == S.LOST and "stopped heartbeating" in (lost.error.message if lost.error else "")
    assert DockerRuntime().is_running(running.container_id)  # nobody stopped it yet...
    workers(proc.worker_id)  # ...until its worker returns and removes the orphan
    wait_for(lambda: DockerRuntime().inspect(running.container_id) is None, 30, what="orphan removal")
    assert store.get_task(task_id).status == S.LOST  # type: ignore[union-attr]


@pytest.mark.timeout(240)
def test_killed_worker_task_with_retries_runs_again_elsewhere(
    settings: Settings, store: SQLiteStore, workers, beat  # type: ignore[no-untyped-def]
) -> None:
    first = workers("first-" + settings.worker_id)
    second = workers("second-" + settings.worker_id)  # up before the kill: a slow start can't outlast the task
    task_id = submit(settings, "--retries", "1", "--shell", TEST_IMAGE, "echo attempt; sleep 4; echo finished")
    started = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
    if started.worker_id == second.worker_id:
        first, second = second, first
    from tests.e2e.conftest import run

    wait_for(lambda: run(settings, "logs", task_id).stdout.startswith("attempt"), 30, 0.1, "attempt 1's line")
    first.kill()
    done = wait_ended(store, task_id, 90)
    assert done.status == S.COMPLETED and done.attempt == 2 and done.worker_id == second.worker_id

    lines = run(settings, "logs", task_id).stdout.splitlines()
    assert lines[0] == "attempt" and "retrying (attempt 2 of 2)" in lines[1]
    assert lines[2].startswith("[cloudai] attempt 2 started on worker")  # the retry's section of the log
    assert lines[3:5] == ["attempt", "finished"]
