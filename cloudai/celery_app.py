"""The Celery app (``celery -A cloudai worker|beat|flower``): queues, routes, beat schedule, dispatch.
The only module of ``cloudai`` that imports Celery."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.transport import redis as kombu_redis

from cloudai import keys
from cloudai.message import RunMessage
from cloudai.models import Task
from cloudai.settings import Settings

settings = Settings.from_env()


def result_backend(s: Settings) -> str:
    """MongoDB when the store is MongoDB, else Redis (DESIGN.md)."""
    return s.store_url if s.store_url.startswith(("mongodb://", "mongodb+srv://")) else s.redis_url


def queue(name: str) -> Queue:
    """A queue bound to its own direct exchange under its own name, so a message for one worker can only
    ever reach that worker's queue."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_app(s: Settings) -> Celery:
    celery_app = Celery("cloudai", broker=s.redis_url, backend=result_backend(s),
                        include=["workers.tasks", "beat.tasks"])
    tick = max(1.0, s.beat_interval_s)
    maintenance = {"queue": keys.MAINTENANCE_QUEUE, "routing_key": keys.MAINTENANCE_QUEUE,
                   "exchange": keys.MAINTENANCE_QUEUE, "expires": tick * 2}
    celery_app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # the store owns the task lifecycle: ack on receipt, one message at a time (celery#5935)
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_track_started=True,
        result_expires=7 * 86400,
        result_extended=True,
        timezone="UTC",
        enable_utc=True,
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5,
                                   "interval_max": 2},
        task_create_missing_queues=True,
        task_queues=(queue(keys.worker_queue(s.worker_id)), queue(keys.MAINTENANCE_QUEUE)),
        task_default_queue=keys.MAINTENANCE_QUEUE,
        worker_hijack_root_logger=False,
        # threads, not prefork: the executor, the GPU leases and the re-attach bookkeeping of a worker live in
        # one process (tasks wait on containers; the GIL is no bottleneck)
        worker_pool="threads",
        worker_concurrency=s.worker_concurrency,
        beat_schedule={
            "reap-dead-workers": {"task": "cloudai.maintenance.reap", "schedule": tick, "options": maintenance},
            "place-pending": {"task": "cloudai.maintenance.place_pending", "schedule": tick,
                              "options": maintenance},
            "reconcile-reservations": {"task": "cloudai.maintenance.reconcile", "schedule": 30.0,
                                       "options": {**maintenance, "expires": 30.0}},
            "redispatch-lost-messages": {"task": "cloudai.maintenance.redispatch", "schedule": 60.0,
                                         "options": {**maintenance, "expires": 60.0}},
            "expire-logs": {"task": "cloudai.maintenance.expire_logs", "schedule": 300.0,
                            "options": {**maintenance, "expires": 300.0}},
        },
    )
    return celery_app


app = make_app(settings)


class _PublishChannel(kombu_redis.Channel):
    """kombu's Redis channel, keeping one Redis client for what it sends outside its event loop: kombu makes a
    new client for each such command, and redis-py's constructor costs ~0.1 ms (the Dispatcher holds a lock
    around every use, and a redis-py client is thread-safe besides)."""

    _publish_client: Any = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is None:
            if self._publish_client is None:
                self._publish_client = self._create_client()
            client = self._publish_client
        yield client


class _PublishTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = _PublishChannel


class Dispatcher:
    """Puts a queued task's message on its worker's own queue (never worker_direct: a message to a worker
    that never started would be dropped), on the broker at ``redis_url`` (which a CLI flag may have set,
    unlike the module-level app's).

    A submit waits for this, so it is kept cheap (bench/scheduler.py): one producer and channel for the
    process, each worker's queue declared once, and the message and its ``task-sent`` event (which is what
    lets Flower show a task while it still waits on the queue; ``task-received`` comes only when the worker
    takes it) written in one pipelined round trip to Redis instead of two connections and two round trips."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._lock = threading.Lock()
        self._connection: Any = None
        self._producer: Any = None
        self._queues: dict[str, Queue] = {}

    def __call__(self, task: Task) -> None:
        assert task.worker_id, "dispatch needs a placed task"
        name = keys.worker_queue(task.worker_id)
        args = [RunMessage.from_task(task).to_wire()]
        shown = repr(args)  # what Flower shows; Celery's saferepr costs more than the rest of a send
        policy = app.conf.task_publish_retry_policy
        with self._lock:  # a kombu connection is not for concurrent publishers
            for attempt in range(int(policy.get("max_retries", 3)) + 1):
                producer = self._get_producer()
                try:
                    target = self._queues.get(name)
                    if target is None:  # bound to the channel once (kombu binds a copy on every publish else)
                        target = self._queues[name] = queue(name)(producer.channel)
                    with producer.batch() if hasattr(producer, "batch") else contextlib.nullcontext():
                        app.send_task(
                            keys.RUN_CONTAINER_TASK,
                            args=args,
                            queue=target,  # declared once per channel (kombu's maybe_declare)
                            task_id=f"{task.task_id}.{task.attempt}",
                            producer=producer,
                            argsrepr=shown if len(shown) <= app.amqp.argsrepr_maxsize else None,
                            retry=False,  # the batch is written on leaving the block: retried here, whole
                        )
                    return
                except Exception as exc:
                    if not self._transient(exc) or attempt >= int(policy.get("max_retries", 3)):
                        raise
                    # a new connection for the next try; a message that did land twice is harmless (the worker
                    # claims the attempt with a compare-and-set, queued -> running, as for beat's re-send)
                    self._reset()
                    time.sleep(min(float(policy.get("interval_start", 0))
                                   + attempt * float(policy.get("interval_step", 0.5)),
                                   float(policy.get("interval_max", 2))))

    def _get_producer(self) -> Any:
        if self._producer is None:
            plain_redis = self.redis_url.split("://", 1)[0] in ("redis", "rediss")
            self._connection = app.connection_for_write(self.redis_url,
                                                        transport=_PublishTransport if plain_redis else None)
            self._producer = app.amqp.Producer(self._connection, auto_declare=False)
        return self._producer

    def _transient(self, exc: BaseException) -> bool:
        """A lost or refused connection (also behind kombu's "delivery is uncertain" batch error)."""
        errors = tuple(self._connection.connection_errors) if self._connection is not None else ()
        return isinstance(exc, errors) or isinstance(exc.__cause__, errors)

    def _reset(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        self._queues.clear()
        if connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass


dispatch = Dispatcher(settings.redis_url)


def run_worker(argv: list[str]) -> Any:
    """``celery worker`` in this process (``cloudai worker start`` and ``cloudai beat``)."""
    return app.worker_main(["worker", *argv])


def run_celery(argv: list[str]) -> Any:
    """Any celery subcommand (``flower``) in this process."""
    return app.start(argv)
