"""Outputs and uploads on the worker, with the executor in-process on real Docker and Redis, the SQLite store and
a directory artifact store: outputs come back however the task ends (a timeout too), only the current attempt
stores them, a user's artifact quota is a clear reason, an upload that is gone fails the task before its
container runs, and beat's retention removes what outlived its task."""

from __future__ import annotations

import io
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest

from cloudai.api import CloudAI
from cloudai.artifacts import ArtifactKey, ArtifactStore, open_artifacts
from cloudai.logs import LogBus, LogLine
from cloudai.maintenance import Maintenance, lose_task
from cloudai.models import TaskStatus, utcnow
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import executor, message, placing, queued_task, register, run_in_thread, wait_for, wait_started

S = TaskStatus
pytestmark = pytest.mark.usefixtures("docker_ready")


@pytest.fixture(autouse=True)
def _registered(settings: Settings, store: SQLiteStore) -> None:
    register(store, settings.worker_id)


@pytest.fixture
def artifacts(settings: Settings) -> ArtifactStore:
    return open_artifacts(settings)


def log_lines(settings: Settings, task_id: str) -> list[str]:
    return [e.text for e in LogBus.from_url(settings.redis_url).history(task_id) if isinstance(e, LogLine)]


def test_a_timed_out_task_still_gives_its_outputs_back(settings: Settings, store: SQLiteStore,
                                                       artifacts: ArtifactStore) -> None:
    task = queued_task(store, settings.worker_id, "mkdir /out && echo partial > /out/ckpt && sleep 300",
                       timeout_s=1.0, outputs=["/out"])
    assert executor(settings, store).run(message(task)) == "timeout"
    assert [(a.path, a.size) for a in artifacts.find(task.task_id, task.execution_id)] == [("/out/ckpt", 8)]
    assert "[cloudai] outputs: 1 file, 8 B stored" in log_lines(settings, task.task_id)[-1]


def test_past_a_users_artifact_quota_outputs_are_not_stored_and_the_reason_says_so(
    settings: Settings, store: SQLiteStore, artifacts: ArtifactStore
) -> None:
    artifacts.put(ArtifactKey("older", "0001-x", "output", "/old", "tester"), [b"x" * 900])
    quota = settings.replace(artifact_quota_bytes=1000)
    task = queued_task(store, settings.worker_id, "mkdir /out && head -c 500 /dev/zero > /out/weights",
                       outputs=["/out"])
    assert executor(quota, store).run(message(task)) == "completed"
    got = store.get_task(task.task_id)
    assert got is not None and got.status == S.COMPLETED and got.error is not None
    assert got.error.message == ("output /out not stored: it passes what is left of tester's artifact quota "
                                 "(100 B of 1000 B, CLOUDAI_ARTIFACT_QUOTA_BYTES)")
    assert artifacts.find(task.task_id) == []
    assert f"[cloudai] {got.error.message}" in log_lines(settings, task.task_id)


def test_only_the_current_attempt_stores_outputs(settings: Settings, store: SQLiteStore,
                                                 artifacts: ArtifactStore) -> None:
    """The task moved on (its worker was declared dead and the task retried) while this container ran: when it
    ends, nothing of it is stored, under either attempt."""
    task = queued_task(store, settings.worker_id, "mkdir /out && echo stale > /out/f && echo ready && sleep 300",
                       outputs=["/out"], retries=1)
    thread, result = run_in_thread(executor(settings, store).run, message(task))
    running = wait_started(store, task.task_id)
    wait_for(lambda: "ready" in log_lines(settings, task.task_id), what="the output to be written")
    api = placing(settings)
    assert lose_task(store, api.bus, running, "test: declared dead") == S.PENDING
    DockerRuntime().kill(running.container_id or "")
    thread.join(60)
    assert result == ["pending"]  # its outcome was refused: the task waits for its next attempt
    assert artifacts.find(task.task_id) == []


def test_an_upload_that_is_gone_fails_the_task_before_its_container_runs(settings: Settings,
                                                                         store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id, "ls", upload="/workspace", workdir="/workspace")
    assert executor(settings, store).run(message(task)) == "failed"
    got = store.get_task(task.task_id)
    assert got is not None and got.exit_code is None and got.error is not None
    assert "the task's upload is no longer in the artifact store" in got.error.message


def test_an_upload_lands_owned_by_the_tasks_user(settings: Settings, store: SQLiteStore) -> None:
    source = io.BytesIO()
    with tarfile.open(fileobj=source, mode="w:gz") as tar:
        info = tarfile.TarInfo("run.sh")
        info.size, info.mode = 10, 0o755
        tar.addfile(info, io.BytesIO(b"echo ran\n\n"))
    api = CloudAI(settings)
    task = queued_task(store, settings.worker_id, "stat -c '%u:%g %a' run.sh; pwd; sh run.sh",
                       upload="/job/code", workdir="/job/code", container_user="0:1234")
    api.store_upload(task, source)
    assert executor(settings, store).run(message(task)) == "completed"
    assert log_lines(settings, task.task_id) == ["0:1234 755", "/job/code", "ran"]


def test_retention_removes_the_files_of_tasks_that_ended_long_ago(settings: Settings, store: SQLiteStore,
                                                                  artifacts: ArtifactStore) -> None:
    api = placing(settings)
    old = queued_task(store, settings.worker_id, "true", status=S.COMPLETED,
                      completed_at=utcnow() - timedelta(days=40))
    waiting = queued_task(store, settings.worker_id, "true", status=S.PENDING)
    recent = queued_task(store, settings.worker_id, "true", status=S.COMPLETED, completed_at=utcnow())
    for task in (old, waiting, recent):
        artifacts.put(ArtifactKey(task.task_id, task.execution_id, "output", "/out/f", "tester"), [b"x"])
    later = settings.replace(artifact_retention_s=1.0)
    wait_for(lambda: all(a.stored_at < utcnow() - timedelta(seconds=1) for a in artifacts.find(old.task_id)),
             what="the files to be older than the retention period")
    assert store.update_task(recent.task_id, S.COMPLETED, completed_at=utcnow())  # it ended within the period
    removed = Maintenance(later, store, api.bus, api.scheduler, artifacts).expire_artifacts()
    assert removed == [old.task_id]
    assert artifacts.find(old.task_id) == [] and artifacts.find(waiting.task_id) and artifacts.find(recent.task_id)
    assert Maintenance(settings.replace(artifact_retention_s=0.0), store, api.bus, api.scheduler,
                       artifacts).expire_artifacts() == []  # 0: kept for ever


def test_the_artifact_directory_is_the_one_beside_the_store(settings: Settings, tmp_path: Path) -> None:
    store = open_artifacts(settings)
    assert getattr(store, "root", None) == Path(settings.store_url.removeprefix("sqlite:///")).parent / "artifacts"
