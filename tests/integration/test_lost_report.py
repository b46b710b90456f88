"""A dead worker can't tell Celery its attempt ended: beat's reaper records FAILURE ("lost: ...") in the result
backend and sends task-failed, which is what Flower shows (issue 11, "Flower tells the truth"). Real Redis."""

from __future__ import annotations

from datetime import timedelta

import redis

from cloudai.api import CloudAI, SubmitRequest
from cloudai.beat.tasks import report_lost
from cloudai.celery_app import make_app
from cloudai.maintenance import Maintenance
from cloudai.models import TaskStatus, utcnow
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import capture_events, register, wait_for

S = TaskStatus


def test_lost_and_retried_attempts_are_failures_in_celery(settings: Settings, store: SQLiteStore,
                                                         redis_client: redis.Redis) -> None:
    api = CloudAI(settings, dispatch=lambda t: None)
    register(store, "dead")
    lost = api.submit(SubmitRequest(image="busybox", command="sleep 100"))
    retried = api.submit(SubmitRequest(image="busybox", command="sleep 100", retries=1))
    store.heartbeat("dead", utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 1))
    done = Maintenance(settings, api.store, api.bus, api.scheduler).reap()
    assert done["lost"] == [lost.task_id] and done["retried"] == [retried.task_id]

    celery_app = make_app(settings)
    events = capture_events(celery_app, redis_client, "task-failed", 2)
    reported = report_lost(celery_app, store, done["lost"] + done["retried"])
    assert reported == [f"{lost.task_id}.1", f"{retried.task_id}.1"]
    wait_for(lambda: len(events) == 2, 15, what="task-failed events")
    assert [e["uuid"] for e in events] == reported
    assert events[0]["exception"].startswith("TaskFailed('lost: worker dead stopped heartbeating")
    assert events[1]["exception"].startswith("TaskFailed('lost: worker dead stopped heartbeating")
