"""GPU ids of a lost attempt stay reserved until its container is known gone (real Docker and Redis; CI has no
GPU, so the lost attempt's container is a plain one labelled as that attempt and holding its lease)."""

from __future__ import annotations

import pytest

from cloudai import keys
from cloudai.agent import Capacity, WorkerAgent
from cloudai.gpus import GpuLeases, fenced_gpu_ids, holder
from cloudai.maintenance import lose_task
from cloudai.models import GiB, TaskStatus
from cloudai.reservations import Reservations
from cloudai.runtime import ContainerSpec, DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import executor, message, queued_task, register
from tests.services import TEST_IMAGE

S = TaskStatus
pytestmark = pytest.mark.usefixtures("docker_ready")


def test_a_lost_attempts_gpus_are_not_handed_out_while_its_container_lives(
    settings: Settings, store: SQLiteStore, redis_client: object
) -> None:
    register(store, settings.worker_id, gpu_ids=["0", "1"])
    ex = executor(settings, store)
    agent = WorkerAgent(store, ex.runtime, ex, Capacity(4, 8 * GiB, ["0", "1"]), heartbeat_interval_s=0.5)
    runtime = DockerRuntime()
    # attempt 1 of a task holds GPU 0 and runs; then its worker is declared dead (no retries: lost)
    lost = queued_task(store, settings.worker_id, "sleep 60", status=S.RUNNING, req_gpu=1, gpu_ids=["0"])
    spec = ContainerSpec(image=TEST_IMAGE, command=["sleep", "60"], cpus=1, memory=GiB // 4, task_id=lost.task_id,
                         worker_id=settings.worker_id, labels={keys.LABEL_EXECUTION_ID: lost.execution_id})
    cid = runtime.create(spec)
    runtime.start(cid)
    leases = GpuLeases(ex.redis, settings.worker_id)
    assert leases.acquire(holder(lost.task_id, lost.execution_id), ["0"], lambda _: True) is None
    assert lose_task(store, ex.bus, lost, "worker stopped heartbeating") == S.LOST
    assert ex.redis.ttl(keys.gpu_lease(settings.worker_id, "0")) > 0  # leases have TTLs

    # placement (the Redis reservations) does not offer GPU 0 while the lost attempt's container may use it
    live = store.list_tasks(status=[S.QUEUED, S.RUNNING], limit=None)
    reservations = Reservations(ex.redis)
    assert reservations.free(store.list_workers())[settings.worker_id].gpu_ids == ["1"]
    assert fenced_gpu_ids(ex.redis, settings.worker_id, live=live) == {"0"}
    assert reservations.fenced_gpu_ids(settings.worker_id, ["0", "1"]) == {"0"}  # the placement hook
    # and the worker refuses it even if placement had chosen it
    intruder = queued_task(store, settings.worker_id, "true", req_gpu=1, gpu_ids=["0"])
    assert ex.run(message(intruder)) == "failed"
    got = store.get_task(intruder.task_id)
    assert got is not None and got.error is not None and got.error.type == "GpuBusy"

    # the worker (back) removes the container of the attempt it no longer owns: only then is GPU 0 free
    done = agent.reconcile()
    assert done["removed"] == [lost.task_id] and runtime.inspect(cid) is None
    assert reservations.free(store.list_workers())[settings.worker_id].gpu_ids == ["0", "1"]
    assert leases.acquire("next/0001-x", ["0"], lambda _: False) is None
