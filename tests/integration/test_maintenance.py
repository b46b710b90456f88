"""Beat's jobs on real Redis with the SQLite store."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest
import redis

from cloudai.api import CloudAI, SubmitRequest
from cloudai.logevents import LogLine
from cloudai.logs import LogBus, LogEnd
from cloudai.maintenance import Maintenance, job_lock
from cloudai.models import Resources, TaskStatus, WorkerState, utcnow
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import placing, register

S = TaskStatus


@pytest.fixture
def api(settings: Settings) -> CloudAI:
    return CloudAI(settings, dispatch=lambda t: None)


@pytest.fixture
def maintenance(settings: Settings, api: CloudAI) -> Maintenance:
    return Maintenance(settings, api.store, api.bus, api.scheduler)


def _silence(store: SQLiteStore, worker_id: str, seconds: float) -> None:
    store.heartbeat(worker_id, utcnow() - timedelta(seconds=seconds))


def test_dead_worker_goes_offline_and_its_tasks_are_lost(
    api: CloudAI, store: SQLiteStore, maintenance: Maintenance, settings: Settings
) -> None:
    register(store, "dead")
    running = api.submit(SubmitRequest(image="busybox", command="sleep 100"))
    queued = api.submit(SubmitRequest(image="busybox", command="sleep 100"))
    store.transition(running.task_id, S.QUEUED, S.RUNNING)
    _silence(store, "dead", settings.heartbeat_timeout_s + 1)
    done = maintenance.reap()
    assert done["offline"] == ["dead"]
    assert sorted(done["lost"]) == sorted([running.task_id, queued.task_id])
    assert store.get_worker("dead").state == WorkerState.OFFLINE  # type: ignore[union-attr]
    for task_id in (running.task_id, queued.task_id):
        task = store.get_task(task_id)
        assert task is not None and task.status == S.LOST and task.completed_at is not None
        assert task.error is not None and "stopped heartbeating" in task.error.message
        end = list(api.follow(task_id))[-1]
        assert isinstance(end, LogEnd) and end.status == "lost"
    assert maintenance.reap() == {"offline": [], "lost": [], "retried": []}  # nothing acts twice


def test_lost_task_with_retries_is_requeued_elsewhere_as_a_new_attempt(
    api: CloudAI, store: SQLiteStore, maintenance: Maintenance, settings: Settings
) -> None:
    register(store, "dead", cpus=4)
    task = api.submit(SubmitRequest(image="busybox", command="true", retries=1))
    store.transition(task.task_id, S.QUEUED, S.RUNNING)
    register(store, "alive", cpus=4)
    _silence(store, "dead", settings.heartbeat_timeout_s + 1)
    done = maintenance.reap()
    assert done["retried"] == [task.task_id]
    again = store.get_task(task.task_id)
    assert again is not None and again.status == S.QUEUED and again.worker_id == "alive"
    assert again.attempt == 2 and again.error is not None and "dead" in again.error.message
    # a second loss exhausts the retries
    store.transition(task.task_id, S.QUEUED, S.RUNNING)
    _silence(store, "alive", settings.heartbeat_timeout_s + 1)
    maintenance.reap()
    assert store.get_task(task.task_id).status == S.LOST  # type: ignore[union-attr]


def test_only_one_beat_acts(redis_client: redis.Redis) -> None:
    with job_lock(redis_client, "reap", 10) as first, job_lock(redis_client, "reap", 10) as second:
        assert first and not second


def test_log_retention_expires_finished_streams_and_archives_lost_ones(
    api: CloudAI, store: SQLiteStore, maintenance: Maintenance, settings: Settings
) -> None:
    register(store, "w")
    finished = api.submit(SubmitRequest(image="busybox", command="true"))
    lost = api.submit(SubmitRequest(image="busybox", command="true"))
    live = api.submit(SubmitRequest(image="busybox", command="true"))
    bus: LogBus = api.bus
    for task in (finished, lost, live):
        writer = bus.writer(task.task_id)
        writer.add(f"from {task.task_id}", "2026-01-01T00:00:00Z")
        writer.flush()
    for task, final in ((finished, S.COMPLETED), (lost, S.LOST)):
        store.transition(task.task_id, S.QUEUED, S.RUNNING)
        store.transition(task.task_id, S.RUNNING, final, completed_at=utcnow())
    store.save_log(finished.task_id, ["2026-01-01T00:00:00Z from worker"])
    expired = maintenance.expire_logs()
    assert sorted(expired) == sorted([finished.task_id, lost.task_id])
    for task_id in expired:
        assert 0 < bus.redis.ttl(f"cloudai:logs:{task_id}") <= settings.log_retention_s
    assert bus.redis.ttl(f"cloudai:logs:{live.task_id}") == -1
    assert store.read_log(lost.task_id) == [f"2026-01-01T00:00:00Z from {lost.task_id}"]
    assert store.read_log(finished.task_id) == ["2026-01-01T00:00:00Z from worker"]  # the worker's archive stays


def test_archives_past_their_retention_are_removed_and_say_so(
    api: CloudAI, store: SQLiteStore, maintenance: Maintenance, settings: Settings
) -> None:
    register(store, "w")
    old, recent, running = (api.submit(SubmitRequest(image="busybox", command="true")) for _ in range(3))
    for task in (old, recent, running):
        store.transition(task.task_id, S.QUEUED, S.RUNNING)
        store.append_log(task.task_id, 1, [f"- line of {task.task_id}"] * 1000)
    ended = utcnow() - timedelta(seconds=settings.log_archive_retention_s + 60)
    store.transition(old.task_id, S.RUNNING, S.COMPLETED, completed_at=ended)
    store.transition(recent.task_id, S.RUNNING, S.COMPLETED, completed_at=utcnow())
    assert store.get_task(old.task_id).log_bytes > 0  # type: ignore[union-attr]
    with sqlite3.connect(store.path) as db:  # every chunk written long ago (the task that runs on: a long one)
        db.execute("UPDATE log_chunks SET written_at='2020-01-01T00:00:00.000000'")
    # only the task that ended before the retention period loses its archive
    assert maintenance.expire_archives() == [old.task_id]
    assert [e.text for e in api.logs(old.task_id) if isinstance(e, LogLine)] == [
        "[cloudai] this log was removed 30 days after the task ended (CLOUDAI_LOG_ARCHIVE_RETENTION)"]
    gone = store.get_task(old.task_id)
    assert gone is not None and gone.log_removed_at is not None and 0 < gone.log_bytes < 200  # the note
    for task in (recent, running):
        assert len(store.read_log(task.task_id) or []) == 1000
    assert Maintenance(settings.replace(log_archive_retention_s=0.0), store, api.bus,
                       api.scheduler).expire_archives() == []  # 0: kept for ever


def test_resources_are_released_at_every_terminal_status(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=1)
    first = api.submit(SubmitRequest(image="busybox", command="true", resources=Resources.parse(cpus=1)))
    waiting = api.submit(SubmitRequest(image="busybox", command="true", resources=Resources.parse(cpus=1)))
    assert waiting.status == S.PENDING
    api.cancel(first.task_id)  # a queued task's cancel frees its reservation at once
    assert store.get_task(waiting.task_id).status == S.QUEUED  # type: ignore[union-attr]


def test_queued_task_whose_message_was_lost_is_sent_again(
    settings: Settings, store: SQLiteStore, redis_client: redis.Redis
) -> None:
    api = placing(settings)  # real messages on the worker's queue
    maintenance = Maintenance(settings, api.store, api.bus, api.scheduler)
    register(store, "w")
    kept = api.submit(SubmitRequest(image="busybox", command="true"))
    lost = api.submit(SubmitRequest(image="busybox", command="true"))
    queue = "cloudai.worker.w"
    assert redis_client.llen(queue) == 2
    assert maintenance.redispatch_lost_messages(grace_s=0) == []  # both messages are there
    for message in redis_client.lrange(queue, 0, -1):
        if f"{lost.task_id}.1" in message:
            redis_client.lrem(queue, 1, message)  # what a Redis restart without persistence does
    assert maintenance.redispatch_lost_messages(grace_s=60) == []  # too recent to judge
    assert maintenance.redispatch_lost_messages(grace_s=0) == [lost.task_id]
    messages = redis_client.lrange(queue, 0, -1)
    assert len(messages) == 2 and any(f"{lost.task_id}.1" in m for m in messages)
    assert any(f"{kept.task_id}.1" in m for m in messages)
