"""``cloudai.run_container``: the one task a worker runs. The spec travels in full in the message."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Ignore

from cloudai import keys
from cloudai.celery_app import app
from cloudai.errors import TaskFailed
from cloudai.models import TaskStatus
from cloudai.store import TaskStore
from cloudai.workers import bootstrap


@app.task(name=keys.RUN_CONTAINER_TASK, acks_late=False, throws=(TaskFailed,))
def run_container(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the task ``spec["task_id"]`` in a container on this worker. Celery's state mirrors the outcome, so
    Flower tells the truth: ``completed`` is SUCCESS; failed, timeout, lost and cancelled are FAILURE with the
    reason (:class:`TaskFailed`), in the worker's events. No result is stored (the message asks for none: the
    store holds the outcome)."""
    process = bootstrap.current()
    status = process.executor.run(spec)
    return celery_result(process.store, spec, status)


def celery_result(store: TaskStore, spec: dict[str, Any], status: str) -> dict[str, Any]:
    """The return value for a completed task; raises :class:`TaskFailed` for any other end, and ``Ignore``
    (Celery records nothing) when this message's attempt has not ended here: the worker detached for a
    shutdown (a restart re-attaches), or the message was stale (the task is another attempt now)."""
    try:
        task = store.get_task(str(spec["task_id"]))
    except Exception:  # the store is down: the outcome is recorded (the executor retried); report what we know
        task = None
    if task is None or task.attempt != spec.get("attempt", task.attempt) or not task.status.terminal:
        if status == TaskStatus.COMPLETED.value:
            return {"task_id": spec["task_id"], "status": status}
        if status in {s.value for s in TaskStatus if s.terminal}:
            raise TaskFailed(status, {"task_id": spec["task_id"], "status": status})
        raise Ignore()
    if task.status == TaskStatus.COMPLETED:
        return task.outcome()
    raise TaskFailed(task.reason or task.status.value, task.outcome())
