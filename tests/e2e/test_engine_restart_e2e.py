"""A Docker engine restart mid-task, on a PRIVATE dockerd this test starts (never the shared one): the task ends
`failed` with a clear reason, not a raw `Connection aborted`, and nothing is left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import pytest

from cloudai.models import TaskStatus
from cloudai.runtime import ENGINE_RESTARTED, DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.e2e.conftest import submit
from tests.e2e.test_beat_e2e import beat  # noqa: F401  (the fixture)
from tests.e2e.test_fencing_e2e import OneCopy, counting, log_lines
from tests.helpers import WorkerProc, wait_ended, wait_for
from tests.services import TEST_IMAGE, missing

S = TaskStatus


class PrivateDockerd:
    """A dockerd of this test's own: its socket, data root, exec root (so its own containerd) and pidfile."""

    def __init__(self) -> None:
        binary = shutil.which("dockerd")
        if binary is None or os.geteuid() != 0:
            missing("a private dockerd needs the dockerd binary and root")
        self.binary = str(binary)
        self.root = Path(tempfile.mkdtemp(prefix="cai-dk-", dir="/tmp"))  # a short path: unix socket limit
        self.url = f"unix://{self.root}/docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-H", self.url, "--data-root", str(self.root / "data"), "--exec-root",
                 str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"), "--iptables=false",
                 "--bridge=none", "--storage-driver=vfs", "--shutdown-timeout", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        def answers() -> bool:
            try:
                return bool(docker.DockerClient(base_url=self.url, timeout=5).ping())
            except Exception:
                return False

        wait_for(answers, 60, 0.2, f"private dockerd (log: {self.root / 'dockerd.log'})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def load(self, shared: docker.DockerClient, image: str) -> None:
        data = b"".join(shared.api.get_image(image))
        docker.DockerClient(base_url=self.url, timeout=60).api.load_image(data)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.timeout(240)
def test_dockerd_restart_mid_task_is_a_clear_reason(
    settings: Settings, store: SQLiteStore, docker_session, beat, tmp_path,  # type: ignore[no-untyped-def]  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = PrivateDockerd()
    worker: WorkerProc | None = None
    try:
        engine.start()
        engine.load(docker_session, TEST_IMAGE)
        monkeypatch.setenv("DOCKER_HOST", engine.url)  # the worker and this test's Docker calls use it
        worker = WorkerProc(settings, store, settings.worker_id, tmp_path).start()
        task_id = submit(settings, "--shell", TEST_IMAGE, counting(60, 0.2))
        wait_for(lambda: "line 2" in log_lines(settings, task_id), 60, 0.2, "the task's first lines")
        watch = OneCopy(task_id).start()
        engine.stop()  # the engine goes away and (no live-restore) kills the container
        time.sleep(1.0)
        engine.start()
        done = wait_ended(store, task_id, 90)
        assert watch.stop() <= 1
        assert done.status == S.FAILED and done.error is not None
        assert done.error.message.startswith(ENGINE_RESTARTED), done.error.message
        assert "Connection aborted" not in done.error.message
        wait_for(lambda: DockerRuntime().find(task_id=task_id) == [], 15, what="container removed")
    finally:
        if worker is not None:
            worker.stop()
        engine.remove()
