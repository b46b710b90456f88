"""Scheduling policy on real Redis (the Lua reservations) with the SQLite store: backfill, quotas, fair share,
dependencies, slots, offline workers, reconciliation. A task "ends" here as the executor ends it: the store
records the outcome, then the reservation is released, then a placement pass runs."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from click.testing import CliRunner

from cloudai import keys
from cloudai.api import CloudAI, SubmitRequest
from cloudai.cli.main import cli
from cloudai.errors import ExitCode, PlacementError, ValidationError
from cloudai.maintenance import Maintenance
from cloudai.models import GiB, Quota, Resources, Task, TaskStatus, WorkerState, utcnow
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ServerProc, executor, message, register
from tests.services import TEST_IMAGE

S = TaskStatus


@pytest.fixture
def sent() -> list[Task]:
    return []


@pytest.fixture
def api(settings: Settings, sent: list[Task]) -> CloudAI:
    return CloudAI(settings, dispatch=sent.append)


def _req(cpus: float = 1, memory: str = "1g", gpus: int = 0, **kw: object) -> SubmitRequest:
    return SubmitRequest(image="busybox", command="true", resources=Resources.parse(cpus, memory, gpus), **kw)  # type: ignore[arg-type]


def _end(api: CloudAI, task: Task, status: S = S.COMPLETED) -> list[Task]:
    """End ``task`` as the executor would; returns what the following placement pass queued."""
    store = api.store
    assert store.transition(task.task_id, S.QUEUED, S.RUNNING)
    assert store.transition(task.task_id, S.RUNNING, status, completed_at=utcnow())
    assert api.scheduler.release(store.get_task(task.task_id))  # type: ignore[arg-type]
    return api.scheduler.place_pending()


def _status(api: CloudAI, task: Task) -> Task:
    got = api.store.get_task(task.task_id)
    assert got is not None
    return got


# -- backfill ---------------------------------------------------------------------------------------------

def test_gpu_task_waiting_for_a_gpu_never_delays_cpu_tasks(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "gpu-box", cpus=4, gpu_ids=["0"])
    register(store, "cpu-box", cpus=4)
    first = api.submit(_req(gpus=1))
    waiting = api.submit(_req(gpus=1))
    assert first.worker_id == "gpu-box" and waiting.status == S.PENDING
    assert "GPU" in (waiting.pending_reason or "")
    cpu_tasks = [api.submit(_req(cpus=1)) for _ in range(6)]
    # all of cpu-box, and gpu-box's CPUs beyond what the waiting GPU task will need (4 - 1 running - 1 claimed)
    assert [t.status for t in cpu_tasks] == [S.QUEUED] * 6
    assert sorted(t.worker_id for t in cpu_tasks).count("gpu-box") == 2  # type: ignore[arg-type]
    seventh = api.submit(_req(cpus=1))
    assert seventh.status == S.PENDING  # the claim holds gpu-box's last CPU for the GPU task
    placed = _end(api, first)  # frees a GPU and a CPU: the GPU task first, then the CPU task in what is left
    assert [t.task_id for t in placed] == [waiting.task_id, seventh.task_id] and placed[0].gpu_ids == ["0"]


def test_task_waiting_for_its_pool_never_delays_tasks_that_do_not_need_it(api: CloudAI,
                                                                         store: SQLiteStore) -> None:
    register(store, "pool-x", cpus=2, labels={"pool": "x"})
    register(store, "general", cpus=2)
    busy = api.submit(_req(cpus=2, constraints={"pool": "x"}))
    head = api.submit(_req(cpus=2, constraints={"pool": "x"}))
    assert busy.worker_id == "pool-x" and head.status == S.PENDING
    later = [api.submit(_req(cpus=1)) for _ in range(2)]
    assert [(t.status, t.worker_id) for t in later] == [(S.QUEUED, "general")] * 2
    assert api.workers()[1].claimed_by == head.task_id  # views sorted by id: general, pool-x
    assert [t.task_id for t in _end(api, busy)] == [head.task_id]


def test_waiting_head_starts_as_soon_as_its_resources_free_not_behind_later_tasks(api: CloudAI,
                                                                                 store: SQLiteStore) -> None:
    register(store, "w", cpus=4)
    running = api.submit(_req(cpus=3))
    head = api.submit(_req(cpus=4))
    later = [api.submit(_req(cpus=1)) for _ in range(2)]  # would fit in the free CPU, but compete with head
    assert head.status == S.PENDING and [t.status for t in later] == [S.PENDING, S.PENDING]
    # the head is not named: it may be another user's task
    assert (later[0].pending_reason or "").startswith("waiting behind an earlier task")
    assert [t.task_id for t in _end(api, running)] == [head.task_id]
    assert [t.task_id for t in _end(api, _status(api, head))] == [t.task_id for t in later]


def test_a_lock_held_by_someone_else_never_fails_a_submit(api: CloudAI, store: SQLiteStore,
                                                         redis_client: redis.Redis) -> None:
    register(store, "w", cpus=2)
    lock = redis_client.lock(keys.lock("placement"), timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert api.submit(_req()).status == S.QUEUED  # the reservation is atomic: no lock needed
        assert api.scheduler.place_pending() == []  # a pass while another runs: that one reruns
        assert redis_client.exists(keys.SCHED_PASS_DIRTY)
    finally:
        lock.release()


# -- slots and offline workers ----------------------------------------------------------------------------

def test_slots_are_capacity(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "a", cpus=8, slots=2)
    register(store, "b", cpus=8, slots=1)
    placed = [api.submit(_req(cpus=0.5)) for _ in range(4)]
    assert sorted(t.worker_id or "-" for t in placed) == ["-", "a", "a", "b"]
    assert placed[-1].pending_reason == "every worker that fits it runs as many tasks as it has slots"


def test_task_only_an_offline_worker_fits_waits_with_that_reason(api: CloudAI, store: SQLiteStore,
                                                                settings: Settings) -> None:
    register(store, "big", cpus=16)
    store.heartbeat("big", utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 5))
    register(store, "small", cpus=2)
    task = api.submit(_req(cpus=8))
    assert task.status == S.PENDING
    assert task.pending_reason == ("no active worker can run it: only offline worker big could; "
                                   "it waits for one to return")
    store.heartbeat("big")
    assert [t.task_id for t in api.scheduler.place_pending()] == [task.task_id]


# -- quotas -----------------------------------------------------------------------------------------------

def test_quota_makes_tasks_wait_and_refuses_what_could_never_fit(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "g", cpus=16, memory=64 * GiB, gpu_ids=["0", "1", "2", "3"])
    api.set_quota("alice", gpus=2, tasks=5)
    with pytest.raises(PlacementError, match="needs 3 GPUs but the quota of alice allows 2") as err:
        api.submit(_req(gpus=3, user="alice"))
    assert err.value.exit_code == ExitCode.USAGE
    first, second = (api.submit(_req(gpus=1, user="alice")) for _ in range(2))
    third = api.submit(_req(gpus=1, user="alice"))
    assert (first.status, second.status, third.status) == (S.QUEUED, S.QUEUED, S.PENDING)
    assert third.pending_reason == "quota: alice uses 2 of 2 GPUs"
    assert api.submit(_req(gpus=1, user="bob")).status == S.QUEUED  # others are not held back
    quota, used = api.quota_usage("alice")
    assert quota is not None and quota.gpus == 2 and used["gpus"] == 2 and used["tasks"] == 2
    assert [t.task_id for t in _end(api, first)] == [third.task_id]
    api.clear_quota("alice")
    assert api.quotas() == []


def test_quota_cli(settings: Settings, store: SQLiteStore, api_server: ServerProc) -> None:
    """An operator sets quotas directly (`cloudai admin`); the user submits and looks through the master."""
    register(store, "w", cpus=4)
    env = {"CLOUDAI_REDIS_URL": settings.redis_url, "CLOUDAI_STORE_URL": settings.store_url,
           "CLOUDAI_USER": "carol", "CLOUDAI_API_URL": api_server.url, "CLOUDAI_TOKEN": api_server.token("carol")}
    runner = CliRunner()
    ok = runner.invoke(cli, ["admin", "quota", "set", "carol", "--cpus", "2", "--memory", "4g"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "CPUs 2, memory 4 GiB, GPUs -, tasks -" in ok.output
    listed = runner.invoke(cli, ["admin", "quota", "list"], env=env)
    assert "carol" in listed.output and "4 GiB" in listed.output
    too_big = runner.invoke(cli, ["submit", "--cpus", "3", "busybox", "true"], env=env)
    assert too_big.exit_code == 2 and "quota of carol allows 2" in too_big.output
    assert runner.invoke(cli, ["submit", "--cpus", "2", "busybox", "true"], env=env).exit_code == 0
    view = runner.invoke(cli, ["quota", "--json"], env=env)
    assert '"cpus": 2.0' in view.output and '"tasks": 1' in view.output
    assert runner.invoke(cli, ["admin", "quota", "set", "carol"], env=env).exit_code == 2
    assert runner.invoke(cli, ["admin", "quota", "clear", "carol"], env=env).exit_code == 0
    assert runner.invoke(cli, ["admin", "quota", "clear", "carol"], env=env).exit_code == 1


# -- fair share -------------------------------------------------------------------------------------------

def test_fair_share_puts_the_lighter_user_first(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=2)
    a_tasks = [api.submit(_req(cpus=1, user="A")) for _ in range(20)]
    b_tasks = [api.submit(_req(cpus=1, user="B")) for _ in range(2)]
    assert [t.status for t in a_tasks[:2]] == [S.QUEUED] * 2
    assert all(t.status == S.PENDING for t in a_tasks[2:] + b_tasks)
    placed = _end(api, a_tasks[0])
    assert [t.task_id for t in placed] == [b_tasks[0].task_id]
    placed = _end(api, a_tasks[1])
    assert [t.task_id for t in placed] == [b_tasks[1].task_id]
    placed = _end(api, _status(api, b_tasks[0]))
    assert placed[0].user_id == "A" and placed[0].task_id == a_tasks[2].task_id  # then A, in submit order


def test_priority_orders_tasks_within_a_user(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=1)
    running = api.submit(_req(user="A"))
    low, high = api.submit(_req(user="A")), api.submit(_req(user="A", priority=5))
    assert [t.task_id for t in _end(api, running)] == [high.task_id]
    assert [t.task_id for t in _end(api, _status(api, high))] == [low.task_id]


# -- dependencies -----------------------------------------------------------------------------------------

def test_dependencies_wait_start_and_cascade_cancel(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=4)
    first = api.submit(_req())
    second = api.submit(_req(after=[first.task_id]))
    third = api.submit(_req(after=[second.task_id]))
    assert second.status == S.PENDING and second.pending_reason == f"waiting for {first.task_id} to complete"
    assert [t.task_id for t in _end(api, first)] == [second.task_id]
    assert _status(api, third).status == S.PENDING
    _end(api, _status(api, second), S.FAILED)
    got = _status(api, third)
    assert got.status == S.CANCELLED and got.error is not None
    assert got.error.message == f"dependency {second.task_id} ended failed"
    # a dependency that already failed: cancelled at once; and the cancel cascades one more level
    fourth = api.submit(_req(after=[third.task_id]))
    assert fourth.status == S.CANCELLED and third.task_id in (fourth.error.message if fourth.error else "")


def test_dependency_on_unknown_or_other_users_task_is_a_usage_error(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=4)
    mine = api.submit(_req(user="ana"))
    theirs = api.submit(_req(user="bob"))
    for bad in ("nosuchtask", theirs.task_id):
        with pytest.raises(ValidationError, match="no task with this id belongs to ana") as err:
            api.submit(_req(user="ana", after=[mine.task_id, bad]))
        assert err.value.exit_code == ExitCode.USAGE
    assert len(store.list_tasks(limit=None)) == 2


# -- reconciliation ---------------------------------------------------------------------------------------

def test_lost_redis_state_is_rebuilt_from_the_store(api: CloudAI, store: SQLiteStore,
                                                    redis_client: redis.Redis) -> None:
    register(store, "w", cpus=2)
    api.submit(_req())
    api.submit(_req())
    redis_client.flushdb()  # a Redis restart without persistence
    assert api.submit(_req()).status == S.PENDING  # the two live tasks were adopted again: no over-commit


def test_beat_reconciles_a_reservation_whose_release_was_lost(api: CloudAI, store: SQLiteStore,
                                                              settings: Settings) -> None:
    register(store, "w", cpus=1)
    task = api.submit(_req())
    waiting = api.submit(_req())
    assert store.transition(task.task_id, S.QUEUED, S.CANCELLED)  # ended, but the release never ran
    maintenance = Maintenance(settings, store, api.bus, api.scheduler)
    assert maintenance.reconcile_reservations(grace_s=0.0)["released"] == 1
    assert _status(api, waiting).status == S.QUEUED
    assert store.get_quota("nobody") is None and Quota("x").exceeded_alone(Resources()) is None


def test_reaper_releases_what_a_dead_workers_tasks_held(api: CloudAI, store: SQLiteStore, settings: Settings) -> None:
    register(store, "dead", cpus=2, gpu_ids=["0"])
    task = api.submit(_req(cpus=2, gpus=1, user="dora"))
    assert api.quota_usage("dora")[1]["gpus"] == 1
    store.heartbeat("dead", utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 5))
    maintenance = Maintenance(settings, store, api.bus, api.scheduler)
    assert maintenance.reap()["lost"] == [task.task_id]
    assert api.quota_usage("dora")[1] == {"cpus": 0, "memory": 0, "gpus": 0, "tasks": 0, "waiting": 0}
    store.heartbeat("dead")
    store.set_worker_state("dead", WorkerState.ACTIVE)
    assert api.submit(_req(cpus=2, gpus=1)).gpu_ids == ["0"]  # its GPU and CPUs are free again


def test_cli_submit_after_status_and_list_show_the_dependency(settings: Settings, store: SQLiteStore,
                                                              api_server: ServerProc) -> None:
    register(store, "w", cpus=4)
    env = {"CLOUDAI_API_URL": api_server.url, "CLOUDAI_TOKEN": api_server.token("erin")}
    runner = CliRunner()
    first = runner.invoke(cli, ["submit", "-q", "busybox", "true"], env=env).output.strip()
    second = runner.invoke(cli, ["submit", "-q", "--after", first, "busybox", "true"], env=env)
    assert second.exit_code == 0, second.output
    status = runner.invoke(cli, ["status", second.output.strip()], env=env).output
    assert f"after: {first}" in status and f"waiting: waiting for {first} to complete" in status
    listed = runner.invoke(cli, ["list"], env=env).output
    assert f"waiting for {first} to complete" in listed
    bad = runner.invoke(cli, ["submit", "--after", f"{first},nosuch", "busybox", "true"], env=env)
    assert bad.exit_code == 2 and "invalid after 'nosuch'" in bad.output


@pytest.mark.usefixtures("docker_ready")
def test_a_task_ending_on_a_real_worker_frees_its_reservation(settings: Settings, store: SQLiteStore) -> None:
    register(store, settings.worker_id, cpus=1)
    sent: list[Task] = []
    api = CloudAI(settings, dispatch=sent.append)
    request = SubmitRequest(image=TEST_IMAGE, command="echo hi", resources=Resources.parse(1, "64m"))
    first, waiting = api.submit(request), api.submit(request)
    assert first.status == S.QUEUED and waiting.status == S.PENDING
    run = executor(settings, store)
    run.after_finish = lambda _task: api.scheduler.place_pending()  # as a worker process wires it
    assert run.run(message(sent[0])) == "completed"
    assert _status(api, waiting).status == S.QUEUED and sent[-1].task_id == waiting.task_id


def test_a_task_is_never_reserved_twice(api: CloudAI, store: SQLiteStore) -> None:
    from cloudai.reservations import Held, Placed

    workers = [register(store, "w", cpus=4)]
    task = api.build_task(_req())
    assert isinstance(api.scheduler.reservations.place(task, workers, None), Placed)
    assert isinstance(api.scheduler.reservations.place(task, workers, None), Held)  # a second pass: no-op
    assert api.scheduler.reservations.free(workers)["w"].cpus == 3
