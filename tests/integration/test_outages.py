"""A Redis outage in the middle of a task: the container keeps running, no line is lost or repeated."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cloudai.api import CloudAI
from cloudai.logs import LogEnd, LogLine
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import executor, message, queued_task, register, run_in_thread, wait_for
from tests.services import free_port, missing


class PersistentRedis:
    """A private redis-server with an append-only file, so a restart keeps the streams."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or missing("redis-server is not installed")
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _pings(self.url), 10, 0.05, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.usefixtures("docker_ready")
def test_redis_outage_mid_task_loses_no_line_and_keeps_the_container(
    settings: Settings, store: SQLiteStore, own_redis: PersistentRedis
) -> None:
    settings = settings.replace(redis_url=own_redis.url)
    register(store, settings.worker_id)
    task = queued_task(store, settings.worker_id, "for i in $(seq 1 80); do echo line $i; sleep 0.05; done")
    run, result = run_in_thread(executor(settings, store).run, message(task))
    wait_for(lambda: store.get_task(task.task_id).started_at, 30, what="start")  # type: ignore[union-attr]
    time.sleep(1.0)
    own_redis.stop()  # ~20 lines are written while Redis is away
    time.sleep(1.5)
    own_redis.start()
    run.join(120)
    assert result == ["completed"]
    events = list(CloudAI(settings).follow(task.task_id))
    lines = [e for e in events if isinstance(e, LogLine)]
    assert [ln.text for ln in lines] == [f"line {i}" for i in range(1, 81)]
    assert [ln.seq for ln in lines] == list(range(1, 81))
    assert isinstance(events[-1], LogEnd) and events[-1].status == "completed"
