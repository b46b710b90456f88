"""A Redis outage in the middle of a task: the container keeps running, no line is lost or repeated."""

from __future__ import annotations

import time

import pytest

from cloudai.api import CloudAI
from cloudai.logs import LogEnd, LogLine
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import executor, message, queued_task, register, run_in_thread, wait_for
from tests.services import PersistentRedis


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
