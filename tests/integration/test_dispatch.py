"""The dispatcher (Celery's ``send_task``) on real Redis: the message with the full spec lands on the worker's
own queue, declared so that a worker that has not started yet finds it; Flower's ``task-sent`` event goes with
it; nothing subscribes to a result; a dropped connection is survived. The end-to-end tests run real workers on
these messages."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from cloudai.celery_app import dispatcher, make_app
from cloudai.message import RunMessage
from cloudai.models import Task
from cloudai.settings import Settings
from tests.helpers import capture_events, wait_for
from tests.helpers import message as wire


def _task(task_id: str, worker: str, command: str = "echo hi") -> Task:
    return Task(task_id=task_id, user_id="alice", docker_image="busybox", command=command, worker_id=worker)


def _bodies(client: redis.Redis, name: str) -> list[tuple[list[Any], dict[str, Any]]]:
    """(args, headers) of each message on the list ``name``, newest first (kombu LPUSHes)."""
    out = []
    for raw in client.lrange(name, 0, -1):  # type: ignore[union-attr]
        message = json.loads(raw)
        out.append((json.loads(base64.b64decode(message["body"]))[0], message["headers"]))
    return out


def test_message_lands_on_the_workers_own_queue_with_its_task_sent_event(
    settings: Settings, redis_client: redis.Redis
) -> None:
    celery_app = make_app(settings)
    events = capture_events(celery_app, redis_client, "task-sent", 3)
    dispatch = dispatcher(celery_app)
    tasks = [_task("d1", "wa"), _task("d2", "wb"), _task("d3", "wa")]
    for task in tasks:
        dispatch(task)
    on_a, on_b = _bodies(redis_client, "cloudai.worker.wa"), _bodies(redis_client, "cloudai.worker.wb")
    assert [args for args, _ in on_a] == [[wire(tasks[2])], [wire(tasks[0])]]
    assert [args for args, _ in on_b] == [[wire(tasks[1])]]
    assert RunMessage.from_wire(on_b[0][0][0]).task_id == "d2"  # the one wire format, whole
    headers = on_b[0][1]
    assert headers["id"] == "d2.1" and headers["task"] == "cloudai.run_container"
    wait_for(lambda: len(events) == 3, 15, what="task-sent events")
    assert [(e["uuid"], e["queue"]) for e in events] == [
        ("d1.1", "cloudai.worker.wa"), ("d2.1", "cloudai.worker.wb"), ("d3.1", "cloudai.worker.wa")]
    # declared: the queue is bound to its own direct exchange, so a worker that starts later consumes it
    assert redis_client.smembers("_kombu.binding.cloudai.worker.wa")


def test_no_result_is_subscribed_or_stored(settings: Settings, redis_client: redis.Redis) -> None:
    """``ignore_result``: the sender waits on nothing, so it subscribes to no result channel (a master sending
    thousands of tasks held a subscription per task) and no result key is written for the message."""
    dispatch = dispatcher(make_app(settings))
    for n in range(5):
        dispatch(_task(f"r{n}", "wr"))
    assert redis_client.pubsub_channels("celery-task-meta-*") == []
    assert redis_client.keys("celery-task-meta-*") == []
    assert redis_client.llen("cloudai.worker.wr") == 5


def test_a_dropped_connection_is_reopened(settings: Settings, redis_client: redis.Redis) -> None:
    dispatch = dispatcher(make_app(settings))
    dispatch(_task("k1", "wk"))
    for client in redis_client.client_list():  # every connection but this test's own
        if client.get("cmd") != "client|list":
            redis_client.client_kill_filter(_id=client["id"])
    dispatch(_task("k2", "wk"))
    assert [args[0]["task_id"] for args, _ in _bodies(redis_client, "cloudai.worker.wk")] == ["k2", "k1"]
