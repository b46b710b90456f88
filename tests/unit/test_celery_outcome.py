"""Celery's state mirrors the CloudAI outcome (issue 11, "Flower tells the truth"): completed is SUCCESS; failed,
timeout, lost and cancelled raise TaskFailed (FAILURE) with the reason, and the outcome rides beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from celery.exceptions import Ignore

from cloudai.errors import TaskFailed
from cloudai.models import Task, TaskError, TaskStatus
from cloudai.store.sqlite import SQLiteStore
from cloudai.workers.tasks import celery_result

S = TaskStatus


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(str(tmp_path / "s.db"))


def _task(store: SQLiteStore, status: TaskStatus, **fields: object) -> dict[str, object]:
    task = Task(task_id=f"t-{status.value}", user_id="alice", docker_image="busybox", status=status,
                worker_id="w1", **fields)  # type: ignore[arg-type]
    store.create_task(task)
    return {"task_id": task.task_id, "attempt": 1}


def _failure(store: SQLiteStore, spec: dict[str, object], status: str) -> TaskFailed:
    with pytest.raises(TaskFailed) as raised:
        celery_result(store, spec, status)
    return raised.value


def test_completed_is_success_with_the_outcome(store: SQLiteStore) -> None:
    spec = _task(store, S.COMPLETED, exit_code=0)
    result = celery_result(store, spec, "completed")
    assert result["status"] == "completed" and result["exit_code"] == 0 and result["reason"] is None
    json.dumps(result)


@pytest.mark.parametrize(
    ("status", "fields", "reason"),
    [
        (S.FAILED, {"exit_code": 2, "error": TaskError("NonZeroExit", "exited with code 2")}, "exit 2"),
        (S.FAILED, {"exit_code": 137, "oom_killed": True,
                    "error": TaskError("OutOfMemory", "killed: out of memory, limit 64 MiB")},
         "killed: out of memory, limit 64 MiB"),
        (S.FAILED, {"error": TaskError("ImageError", "image 'x' could not be pulled: no route")},
         "image 'x' could not be pulled: no route"),
        (S.TIMEOUT, {"exit_code": 143, "error": TaskError("Timeout", "timed out after 2s and was stopped")},
         "timed out after 2s and was stopped"),
        (S.CANCELLED, {"error": TaskError("Cancelled", "cancelled by alice")}, "cancelled by alice"),
        (S.LOST, {"error": TaskError("WorkerLost", "worker w1 stopped heartbeating")},
         "lost: worker w1 stopped heartbeating"),
    ],
)
def test_other_ends_are_failures_with_the_reason(store: SQLiteStore, status: TaskStatus,
                                                 fields: dict[str, object], reason: str) -> None:
    spec = _task(store, status, **fields)
    exc = _failure(store, spec, status.value)
    assert str(exc) == reason and repr(exc) == f"TaskFailed({reason!r})"
    assert exc.outcome["status"] == status.value and exc.outcome["reason"] == reason
    rebuilt = TaskFailed(*json.loads(json.dumps(exc.args)))  # what the JSON result backend does
    assert str(rebuilt) == reason and rebuilt.outcome == exc.outcome


def test_not_ended_here_records_nothing(store: SQLiteStore) -> None:
    spec = _task(store, S.RUNNING)
    with pytest.raises(Ignore):
        celery_result(store, spec, "detached")
    done = _task(store, S.COMPLETED, attempt=2)
    with pytest.raises(Ignore):  # a stale message of attempt 1
        celery_result(store, {**done, "attempt": 1}, "skipped")
