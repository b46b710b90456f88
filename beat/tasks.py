"""Maintenance tasks beat schedules on the ``cloudai.maintenance`` queue."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable

from celery import Celery

from cloudai.celery_app import app, dispatcher, settings
from cloudai.errors import TaskFailed
from cloudai.logs import LogBus
from cloudai.maintenance import Maintenance
from cloudai.models import TaskStatus
from cloudai.scheduler import Scheduler
from cloudai.store import TaskStore, open_store

log = logging.getLogger(__name__)
_lock = threading.Lock()
_maintenance: Maintenance | None = None


def maintenance() -> Maintenance:
    global _maintenance
    with _lock:
        if _maintenance is None:
            store = open_store(settings.store_url)
            bus = LogBus.from_url(settings.redis_url, settings.log_stream_maxlen)
            _maintenance = Maintenance(settings, store, bus, Scheduler(settings, store, bus.redis, dispatcher(app)))
        return _maintenance


@app.task(name="cloudai.maintenance.reap", ignore_result=True)
def reap() -> dict[str, list[str]]:
    """Dead workers go offline; their tasks become lost or are retried."""
    done = maintenance().reap()
    report_lost(app, maintenance().store, done["lost"] + done["retried"])
    return done


def report_lost(celery_app: Celery, store: TaskStore, task_ids: Iterable[str]) -> list[str]:
    """A dead worker can't tell Celery that its attempt ended: send ``task-failed`` ("lost: ...") for that
    attempt so that Flower shows it (as the worker's own events show every other end; no result is stored:
    messages are sent with ``ignore_result``, and the store has the outcome). Returns the Celery ids reported;
    a failure here is logged, never a reason for the reaper to fail."""
    reported: list[str] = []
    try:
        with celery_app.events.default_dispatcher(hostname=f"beat@{socket.gethostname()}") as events:
            for task_id in task_ids:
                task = store.get_task(task_id)
                if task is None or task.error is None:
                    continue
                # retried: the lost attempt is the one before the new pending one
                attempt = task.attempt if task.status == TaskStatus.LOST else task.attempt - 1
                celery_id = f"{task_id}.{attempt}"
                reason = f"lost: {task.error.message}"
                exc = TaskFailed(reason, {**task.outcome(), "attempt": attempt, "status": TaskStatus.LOST.value,
                                          "reason": reason})
                events.send("task-failed", uuid=celery_id, exception=repr(exc), traceback=None)
                reported.append(celery_id)
    except Exception:
        log.warning("could not report lost tasks to Celery (Flower)", exc_info=True)
    return reported


@app.task(name="cloudai.maintenance.place_pending", ignore_result=True)
def place_pending() -> list[str]:
    """Queue pending tasks that fit now."""
    return maintenance().place_pending()


@app.task(name="cloudai.maintenance.reconcile", ignore_result=True)
def reconcile() -> dict[str, int]:
    """Rebuild the scheduler's reservations in Redis from the store."""
    return maintenance().reconcile_reservations()


@app.task(name="cloudai.maintenance.redispatch", ignore_result=True)
def redispatch() -> list[str]:
    """Send again the messages of queued tasks that their worker's queue lost."""
    return maintenance().redispatch_lost_messages()


@app.task(name="cloudai.maintenance.expire_logs", ignore_result=True)
def expire_logs() -> list[str]:
    """Expire finished tasks' log streams after the retention period, their archives after theirs, and their
    stored files (outputs, uploads) after theirs."""
    return maintenance().expire_logs() + maintenance().expire_archives() + maintenance().expire_artifacts()
