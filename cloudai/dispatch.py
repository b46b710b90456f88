"""Dispatch: a queued task's Celery message onto its worker's own Redis queue, and Flower's ``task-sent`` event
beside it, in one pipelined round trip on a Redis client the caller already has.

The message is Celery's task protocol 2 in kombu's Redis envelope, written here rather than through
``app.send_task``: importing Celery and building a message through kombu cost a CLI process ~0.15 s and a
submit ~1.3 ms (issues 13 and 14), and ``send_task`` also subscribed to the result channel of every task it
sent. What the worker, Flower and ``celery inspect`` read is exactly what Celery writes:
``tests/integration/test_dispatch.py`` builds the same task through Celery itself and compares the two field by
field, and every end-to-end test runs real Celery workers on these messages.

Protocol: https://docs.celeryq.dev/en/stable/internals/protocol.html (version 2); envelope: kombu's virtual
transport (``prepare_message`` + ``_inplace_augment_message``), delivered by kombu's Redis ``_put`` (LPUSH
onto the queue's list) and, for events, its fanout exchange (PUBLISH on ``/{db}.celeryev/<routing key>``)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from cloudai import keys
from cloudai.message import RunMessage
from cloudai.models import Task
from cloudai.redispy import redis
from cloudai.resp import redis_db

#: Celery's default ``argsrepr_maxsize``: longer argument reprs are cut (Flower shows the repr)
ARGSREPR_MAXSIZE = 1024
#: kombu's separator in a binding's members, and Celery's event exchange
_SEP = "\x06\x16"
EVENT_EXCHANGE = "celeryev"


def origin() -> str:
    """Celery's name for a process that is not a worker (``gen<pid>@<host>``), the message's ``origin``."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def utcoffset() -> float:
    """This host's offset to UTC in hours, as Celery's events carry it (``celery.utils.time.utcoffset``)."""
    return (time.altzone if time.localtime().tm_isdst else time.timezone) / 3600


def argsrepr(args: list[Any]) -> str:
    """What Flower shows as a task's arguments: their repr, cut to Celery's limit."""
    shown = repr(args)
    return shown if len(shown) <= ARGSREPR_MAXSIZE else shown[: ARGSREPR_MAXSIZE - 3] + "..."


def _envelope(body: Any, headers: dict[str, Any], properties: dict[str, Any], exchange: str,
              routing_key: str) -> str:
    """kombu's Redis envelope: the JSON body base64-encoded, delivery info and a unique delivery tag (the key
    under which the consuming worker keeps the message unacked)."""
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    properties = {**properties, "delivery_info": {"exchange": exchange, "routing_key": routing_key},
                  "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}
    return json.dumps({"body": encoded, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": headers, "properties": properties})


def task_message(name: str, task_id: str, args: list[Any], queue: str, sender: str, shown: str) -> str:
    """A task-protocol-2 message for ``name(*args)`` with id ``task_id``, as ``app.send_task`` with
    ``queue=queue`` writes it (no eta, expiry, retries, group or callbacks: CloudAI sends none)."""
    headers: dict[str, Any] = {
        "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": shown, "kwargsrepr": "{}", "origin": sender, "ignore_result": None,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    properties = {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2}
    return _envelope(body, headers, properties, "", queue)


def task_sent_event(name: str, task_id: str, queue: str, sender: str, shown: str, clock: int) -> str:
    """The ``task-sent`` event Celery publishes with a message (``task_send_sent_event``): Flower lists a task
    from it while the task still waits on its queue. ``clock``: the sender's Lamport clock (Celery's
    ``clock.forward()``)."""
    event = {
        "hostname": sender, "utcoffset": utcoffset(), "pid": os.getpid(), "clock": clock,
        "uuid": task_id, "root_id": task_id, "parent_id": None, "name": name, "args": shown, "kwargs": "{}",
        "retries": 0, "eta": None, "expires": None, "queue": queue, "exchange": "", "routing_key": queue,
        "timestamp": time.time(), "type": "task-sent",
    }
    return _envelope(event, {"hostname": sender}, {"delivery_mode": 1}, EVENT_EXCHANGE, "task.sent")


class Dispatcher:
    """Puts a queued task's message on its worker's own queue (never ``worker_direct``: a message to a worker
    that never started would be dropped), with its ``task-sent`` event, in one pipelined round trip.

    Uses the caller's Redis client (redis-py's or the CLI's :class:`cloudai.resp.RespClient`, both of which
    retry once on a dropped connection); a message that lands twice after such a retry is harmless, as for
    beat's re-send: the worker claims the attempt with a compare-and-set, queued -> running. Thread-safe: both
    clients are, and each call has its own pipeline."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._db = redis_db(client)
        self._declared: set[str] = set()
        self._lock = threading.Lock()
        self._sender = origin()
        self._clock = itertools.count(1)  # the Lamport clock of the events this dispatcher sends

    @classmethod
    def from_url(cls, redis_url: str) -> Dispatcher:
        """A dispatcher with a client of its own (for callers without one)."""
        return cls(redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=5,
                                        health_check_interval=15))

    def __call__(self, task: Task) -> None:
        assert task.worker_id, "dispatch needs a placed task"
        queue = keys.worker_queue(task.worker_id)
        task_id = f"{task.task_id}.{task.attempt}"
        args = [RunMessage.from_task(task).to_wire()]
        shown = argsrepr(args)
        pipe = self.client.pipeline(transaction=False)
        with self._lock:
            declare = queue not in self._declared
        if declare:
            # what kombu's queue declaration records (the worker declares its own queue too when it starts):
            # the binding of the queue to its own direct exchange, which `celery purge` and routing read
            binding = f"{queue}{_SEP}{_SEP}{queue}"
            pipe.sadd(f"_kombu.binding.{queue}", binding)
            pipe.sadd(f"_kombu.binding_permanent.{queue}", binding)
        pipe.lpush(queue, task_message(keys.RUN_CONTAINER_TASK, task_id, args, queue, self._sender, shown))
        pipe.publish(f"/{self._db}.{EVENT_EXCHANGE}/task.sent",
                     task_sent_event(keys.RUN_CONTAINER_TASK, task_id, queue, self._sender, shown,
                                     next(self._clock)))
        pipe.execute()
        if declare:
            with self._lock:
                self._declared.add(queue)
