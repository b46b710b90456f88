"""The worker agent's reconcile on real Docker: re-attach, start a container created just before a crash,
remove orphans, lose tasks whose container vanished."""

from __future__ import annotations

import pytest

from cloudai.agent import Capacity, WorkerAgent
from cloudai.api import CloudAI
from cloudai.logs import LogEnd, LogLine
from cloudai.models import GiB, TaskStatus
from cloudai.runtime import ContainerSpec, DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import executor, queued_task, wait_ended, wait_for
from tests.services import TEST_IMAGE

S = TaskStatus
pytestmark = pytest.mark.usefixtures("docker_ready")


def _agent(settings: Settings, store: SQLiteStore) -> WorkerAgent:
    ex = executor(settings, store)
    return WorkerAgent(store, ex.runtime, ex, Capacity(4, 8 * GiB), heartbeat_interval_s=0.5)


def _container(settings: Settings, task_id: str, command: str) -> str:
    spec = ContainerSpec(image=TEST_IMAGE, command=["sh", "-c", command], cpus=1, memory=GiB // 4, task_id=task_id,
                         worker_id=settings.worker_id, name=f"cloudai-{task_id}-1")
    return DockerRuntime().create(spec)


def test_reconcile_starts_attaches_removes_and_loses(settings: Settings, store: SQLiteStore) -> None:
    agent = _agent(settings, store)
    agent.register()
    runtime = DockerRuntime()
    # 1. claimed and created, then the worker died before starting it
    created = queued_task(store, settings.worker_id, "echo started late; exit 4", status=S.RUNNING)
    created_cid = _container(settings, created.task_id, "echo started late; exit 4")
    # 2. a container whose task already ended (an orphan)
    orphan = queued_task(store, settings.worker_id, "sleep 60", status=S.RUNNING)
    store.transition(orphan.task_id, S.RUNNING, S.CANCELLED)
    orphan_cid = _container(settings, orphan.task_id, "sleep 60")
    runtime.start(orphan_cid)
    # 3. running by the store, but its container is gone
    vanished = queued_task(store, settings.worker_id, "true", status=S.RUNNING)

    done = agent.reconcile()
    assert done == {"attached": [created.task_id], "removed": [orphan.task_id], "fenced": [],
                    "lost": [vanished.task_id]}
    finished = wait_ended(store, created.task_id, 60)
    assert (finished.status, finished.exit_code, finished.container_id) == (S.FAILED, 4, created_cid)
    events = list(CloudAI(settings).follow(created.task_id))
    assert [e.text for e in events if isinstance(e, LogLine)] == ["started late"]
    assert isinstance(events[-1], LogEnd) and events[-1].exit_code == 4
    assert runtime.inspect(orphan_cid) is None
    wait_for(lambda: runtime.inspect(created_cid) is None, 10, what="removal after the outcome and archive")
    lost = store.get_task(vanished.task_id)
    assert lost is not None and lost.status == S.LOST and "vanished" in (lost.error.message if lost.error else "")


def test_reconcile_leaves_tasks_this_process_is_running_alone(settings: Settings, store: SQLiteStore) -> None:
    agent = _agent(settings, store)
    agent.register()
    task = queued_task(store, settings.worker_id, "sleep 2")
    from tests.helpers import message, run_in_thread

    thread, result = run_in_thread(agent.executor.run, message(task))
    wait_for(lambda: store.get_task(task.task_id).status == S.RUNNING, 30)  # type: ignore[union-attr]
    assert agent.reconcile() == {"attached": [], "removed": [], "fenced": [], "lost": []}
    thread.join(60)
    assert result == ["completed"]
