"""The Dispatcher on real Redis: the message with the full spec lands on the worker's own queue, Flower's
``task-sent`` event goes with it (both in one round trip), and a dropped connection is survived."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from cloudai.celery_app import Dispatcher, make_app
from cloudai.models import Task
from cloudai.settings import Settings
from tests.helpers import capture_events, wait_for
from tests.helpers import message as wire


def _task(task_id: str, worker: str) -> Task:
    return Task(task_id=task_id, user_id="alice", docker_image="busybox", command="echo hi", worker_id=worker)


def _bodies(client: redis.Redis, queue: str) -> list[tuple[list[Any], dict[str, Any]]]:
    out = []
    for raw in client.lrange(queue, 0, -1):  # type: ignore[union-attr]
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append((args, message["headers"]))
    return out


def test_message_lands_on_the_workers_own_queue_with_its_task_sent_event(
    settings: Settings, redis_client: redis.Redis
) -> None:
    celery_app = make_app(settings)
    events = capture_events(celery_app, redis_client, "task-sent", 3)
    dispatch = Dispatcher(settings.redis_url)
    tasks = [_task("d1", "wa"), _task("d2", "wb"), _task("d3", "wa")]
    for task in tasks:
        dispatch(task)
    on_a, on_b = _bodies(redis_client, "cloudai.worker.wa"), _bodies(redis_client, "cloudai.worker.wb")
    assert [args for args, _ in on_a] == [[wire(tasks[2])], [wire(tasks[0])]]  # LPUSH: newest first
    assert [args for args, _ in on_b] == [[wire(tasks[1])]]
    headers = on_b[0][1]
    assert headers["id"] == "d2.1" and headers["task"] == "cloudai.run_container"
    assert headers["argsrepr"] == repr([wire(tasks[1])])  # what Flower shows as the arguments
    wait_for(lambda: len(events) == 3, 15, what="task-sent events")
    assert [(e["uuid"], e["queue"]) for e in events] == [
        ("d1.1", "cloudai.worker.wa"), ("d2.1", "cloudai.worker.wb"), ("d3.1", "cloudai.worker.wa")]
    assert events[1]["args"] == headers["argsrepr"]


def test_a_dropped_connection_is_reopened(settings: Settings, redis_client: redis.Redis) -> None:
    dispatch = Dispatcher(settings.redis_url)
    dispatch(_task("k1", "wk"))
    # the dispatcher's kept connection is the one whose last command was the task-sent event's PUBLISH
    mine = [c["id"] for c in redis_client.client_list() if c.get("cmd") == "publish"]
    assert mine and all(redis_client.client_kill_filter(_id=client_id) == 1 for client_id in mine)
    dispatch(_task("k2", "wk"))
    assert [args[0]["task_id"] for args, _ in _bodies(redis_client, "cloudai.worker.wk")] == ["k2", "k1"]
