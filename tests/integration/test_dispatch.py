"""The Dispatcher on real Redis: the message with the full spec lands on the worker's own queue, Flower's
``task-sent`` event goes with it (both in one round trip), a dropped connection is survived, and what it writes
is what Celery's own ``send_task`` writes for the same task, field by field (the worker, Flower and ``celery
inspect`` read it; the end-to-end tests run real workers on it)."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis

from cloudai import keys
from cloudai.celery_app import make_app, queue
from cloudai.dispatch import Dispatcher
from cloudai.models import Task
from cloudai.settings import Settings
from tests.helpers import capture_events, wait_for
from tests.helpers import message as wire


def _task(task_id: str, worker: str, command: str = "echo hi") -> Task:
    return Task(task_id=task_id, user_id="alice", docker_image="busybox", command=command, worker_id=worker)


def _messages(client: redis.Redis, name: str) -> list[dict[str, Any]]:
    out = []
    for raw in client.lrange(name, 0, -1):  # type: ignore[union-attr]
        message = json.loads(raw)
        message["body"] = json.loads(base64.b64decode(message["body"]))
        out.append(message)
    return out


def _bodies(client: redis.Redis, name: str) -> list[tuple[list[Any], dict[str, Any]]]:
    return [(m["body"][0], m["headers"]) for m in _messages(client, name)]


def test_message_lands_on_the_workers_own_queue_with_its_task_sent_event(
    settings: Settings, redis_client: redis.Redis
) -> None:
    celery_app = make_app(settings)
    events = capture_events(celery_app, redis_client, "task-sent", 3)
    dispatch = Dispatcher.from_url(settings.redis_url)
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
    # the queue is bound to its own direct exchange, as kombu's declaration leaves it
    assert redis_client.smembers("_kombu.binding.cloudai.worker.wa") == {
        "cloudai.worker.wa\x06\x16\x06\x16cloudai.worker.wa"}


def test_what_it_writes_is_what_celery_writes_for_the_same_task(
    settings: Settings, redis_client: redis.Redis
) -> None:
    celery_app = make_app(settings)
    events = capture_events(celery_app, redis_client, "task-sent", 2)
    long_command = "echo " + "x" * 2000
    name = "cloudai.worker.same"
    for command in ("echo hi", long_command):
        task = _task("same", "same", command)
        Dispatcher.from_url(settings.redis_url)(task)
        ours = _messages(redis_client, name)[0]
        redis_client.delete(name)
        with celery_app.producer_or_acquire() as producer:
            celery_app.send_task(keys.RUN_CONTAINER_TASK, args=[wire(task)], queue=queue(name),
                                 task_id="same.1", producer=producer)
        theirs = _messages(redis_client, name)[0]
        redis_client.delete(name)
        assert ours["body"] == theirs["body"]
        if command == long_command:  # what Flower shows is cut under Celery's limit (Celery cuts per item)
            for shown in (ours["headers"].pop("argsrepr"), theirs["headers"].pop("argsrepr")):
                assert len(shown) <= 1024 and "'echo" in shown and "..." in shown
        assert ours["headers"] == theirs["headers"]  # origin included: both name this process
        assert ours.keys() == theirs.keys()
        assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == {
            k: v for k, v in theirs.items() if k not in ("body", "headers", "properties")}
        # the delivery tag is unique per message; reply_to names the sending app (read by the rpc backend only)
        varying = ("delivery_tag", "reply_to")
        assert {k: v for k, v in ours["properties"].items() if k not in varying} == {
            k: v for k, v in theirs["properties"].items() if k not in varying}
        assert ours["properties"]["delivery_tag"] != theirs["properties"]["delivery_tag"]
    wait_for(lambda: len(events) >= 2, 15, what="task-sent events")
    ours_event, theirs_event = events[0], events[1]  # the first pair: ours, then Celery's, of the same task
    assert ours_event["uuid"] == theirs_event["uuid"] == "same.1"
    assert ours_event.keys() == theirs_event.keys()
    varying = ("timestamp", "clock", "local_received")  # when
    assert {k: v for k, v in ours_event.items() if k not in varying} == {
        k: v for k, v in theirs_event.items() if k not in varying}
    assert (ours_event["queue"], ours_event["routing_key"]) == (name, name)


def test_a_dropped_connection_is_reopened(settings: Settings, redis_client: redis.Redis) -> None:
    dispatch = Dispatcher.from_url(settings.redis_url)
    dispatch(_task("k1", "wk"))
    # the dispatcher's kept connection is the one whose last command was the task-sent event's PUBLISH
    mine = [c["id"] for c in redis_client.client_list() if c.get("cmd") == "publish"]
    assert mine and all(redis_client.client_kill_filter(_id=client_id) == 1 for client_id in mine)
    dispatch(_task("k2", "wk"))
    assert [args[0]["task_id"] for args, _ in _bodies(redis_client, "cloudai.worker.wk")] == ["k2", "k1"]
