"""The Celery app (``celery -A cloudai worker|beat|flower``): queues, routes, beat schedule, and the dispatcher
that sends a placed task's message. The only module of ``cloudai`` that imports Celery."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from cloudai import keys
from cloudai.message import RunMessage
from cloudai.models import Task
from cloudai.redisurl import celery_broker
from cloudai.settings import Settings

settings = Settings.from_env()


def result_backend(s: Settings) -> str:
    """MongoDB when the store is MongoDB, else Redis (docs/architecture.md, "Queues and Celery")."""
    return s.store_url if s.store_url.startswith(("mongodb://", "mongodb+srv://")) else celery_broker(s.redis_url)[0]


def queue(name: str) -> Queue:
    """A queue bound to its own direct exchange under its own name, so a message for one worker can only
    ever reach that worker's queue."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_app(s: Settings) -> Celery:
    # CLOUDAI_REDIS_URL as kombu writes it (a Sentinel deployment: one URL per sentinel and the master's name)
    broker, transport_options = celery_broker(s.redis_url)
    backend = result_backend(s)
    celery_app = Celery("cloudai", broker=broker, backend=backend,
                        include=["cloudai.workers.tasks", "cloudai.beat.tasks"])
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
        broker_transport_options=transport_options,
        result_backend_transport_options=transport_options if backend == broker else {},
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


def dispatcher(celery_app: Celery) -> Callable[[Task], None]:
    """What the scheduler calls to send a placed task to its worker: Celery's ``send_task`` onto the worker's
    own queue (declared on first use, so a message for a worker that has not started yet waits for it; never
    ``worker_direct``, whose messages to an absent worker are dropped). The Celery task id is
    ``<task id>.<attempt>``: beat's re-send of a lost message finds it by that id. ``ignore_result``: nothing
    waits on a result, so the sender subscribes to no result channel. Only the long-lived processes that place
    tasks (master, beat, worker agents) make one."""

    def send(task: Task) -> None:
        assert task.worker_id, "dispatch needs a placed task"
        celery_app.send_task(keys.RUN_CONTAINER_TASK, args=[RunMessage.from_task(task).to_wire()],
                             task_id=f"{task.task_id}.{task.attempt}", queue=keys.worker_queue(task.worker_id),
                             ignore_result=True)

    return send


def run_worker(argv: list[str]) -> Any:
    """``celery worker`` in this process (``cloudai worker start`` and ``cloudai beat``)."""
    return app.worker_main(["worker", *argv])


def run_celery(argv: list[str]) -> Any:
    """Any celery subcommand (``flower``) in this process."""
    return app.start(argv)
