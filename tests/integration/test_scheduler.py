"""Placement on real Redis (the lock) with the SQLite store."""

from __future__ import annotations

import multiprocessing
import os
from datetime import timedelta

import pytest
import redis

from cloudai.api import CloudAI, SubmitRequest
from cloudai.errors import PlacementError, RedisUnavailable, ServiceUnavailable, WorkerNotFound
from cloudai.models import LIVE, GiB, Resources, Task, TaskStatus, WorkerState, utcnow
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import register

S = TaskStatus


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Task] = []

    def __call__(self, task: Task) -> None:
        self.sent.append(task)


@pytest.fixture
def sent() -> Recorder:
    return Recorder()


@pytest.fixture
def api(settings: Settings, sent: Recorder) -> CloudAI:
    return CloudAI(settings, dispatch=sent)


def _finish(store: SQLiteStore, task_id: str, api: CloudAI | None = None) -> None:
    """What the executor does when a task ends: record the outcome, release the reservation."""
    assert store.transition(task_id, S.QUEUED, S.RUNNING)
    assert store.transition(task_id, S.RUNNING, S.COMPLETED)
    if api is not None:
        api.scheduler.release(store.get_task(task_id))  # type: ignore[arg-type]


def _req(cpus: float = 1, memory: str = "1g", gpus: int = 0, **kw: object) -> SubmitRequest:
    return SubmitRequest(image="busybox", command="true", resources=Resources.parse(cpus, memory, gpus), **kw)  # type: ignore[arg-type]


def test_spread_places_on_the_least_loaded_worker(api: CloudAI, store: SQLiteStore, sent: Recorder) -> None:
    register(store, "a", cpus=4, memory=8 * GiB)
    register(store, "b", cpus=4, memory=8 * GiB)
    placed = [api.submit(_req(cpus=1)).worker_id for _ in range(4)]
    assert sorted(placed) == ["a", "a", "b", "b"]
    assert [t.worker_id for t in sent.sent] == placed
    assert store.worker_for_task(sent.sent[0].task_id) == placed[0]


def test_pack_fills_one_worker_first(settings: Settings, store: SQLiteStore, sent: Recorder) -> None:
    api = CloudAI(settings.replace(placement_policy="pack"), dispatch=sent)
    register(store, "a", cpus=4)
    register(store, "b", cpus=4)
    assert [api.submit(_req(cpus=1)).worker_id for _ in range(5)] == ["a", "a", "a", "a", "b"]


def test_gpus_are_reserved_by_exact_id_and_never_twice(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "g", cpus=16, memory=64 * GiB, gpu_ids=["0", "1", "2"])
    first = api.submit(_req(gpus=2))
    second = api.submit(_req(gpus=1))
    third = api.submit(_req(gpus=1))
    assert first.gpu_ids == ["0", "1"] and second.gpu_ids == ["2"]
    assert third.status == S.PENDING
    assert third.pending_reason == "needs 1 GPU; the most free on any worker is 0"
    live = store.list_tasks(status=LIVE, limit=None)
    ids = [g for t in live for g in t.gpu_ids]
    assert len(ids) == len(set(ids)) == 3
    # the end of the first frees GPUs 0 and 1: the pending task gets one of them
    _finish(store, first.task_id, api)
    placed = api.scheduler.place_pending()
    assert [t.task_id for t in placed] == [third.task_id]
    assert store.get_task(third.task_id).gpu_ids == ["0"]  # type: ignore[union-attr]


def test_task_no_worker_could_ever_fit_is_refused(api: CloudAI, store: SQLiteStore) -> None:
    with pytest.raises(PlacementError, match="no workers are registered"):
        api.submit(_req())
    register(store, "small", cpus=2, memory=4 * GiB, gpu_ids=["0"])
    with pytest.raises(PlacementError, match="lower the request or add a worker"):
        api.submit(_req(gpus=2))
    with pytest.raises(PlacementError):
        api.submit(_req(memory="64g"))
    assert store.list_tasks(limit=None) == []  # nothing recorded


def test_pinned_worker_must_exist_and_be_active(api: CloudAI, store: SQLiteStore) -> None:
    with pytest.raises(WorkerNotFound, match="ghost"):
        register(store, "other") and api.submit(_req(worker="ghost"))
    register(store, "w", cpus=2)
    store.set_worker_state("w", WorkerState.DRAINING)
    with pytest.raises(PlacementError, match="draining"):
        api.submit(_req(worker="w"))
    store.set_worker_state("w", WorkerState.ACTIVE)
    assert api.submit(_req(worker="w", cpus=2)).status == S.QUEUED
    waiting = api.submit(_req(worker="w", cpus=1))  # no room now: waits for that worker
    assert waiting.status == S.PENDING and "the most free on any worker is 0" in (waiting.pending_reason or "")


def test_stale_worker_gets_nothing(api: CloudAI, store: SQLiteStore, settings: Settings) -> None:
    register(store, "old")
    store.heartbeat("old", utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 5))
    task = api.submit(_req())
    assert task.status == S.PENDING and "no active worker" in (task.pending_reason or "")


def test_pending_tasks_start_in_order_priority_first(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=1)
    running = api.submit(_req(cpus=1))
    low = api.submit(_req(cpus=1))
    mid = api.submit(_req(cpus=1))
    high = api.submit(_req(cpus=1, priority=5))
    assert {low.status, mid.status, high.status} == {S.PENDING}
    order = []
    current = running
    for _ in range(3):
        _finish(store, current.task_id, api)
        placed = api.scheduler.place_pending()
        assert len(placed) == 1
        order.append(placed[0].task_id)
        current = store.get_task(placed[0].task_id)  # type: ignore[assignment]
    assert order == [high.task_id, low.task_id, mid.task_id]


def test_a_new_task_does_not_overtake_pending_ones(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=2)
    api.submit(_req(cpus=1))
    big = api.submit(_req(cpus=2))  # waits for the whole worker
    small = api.submit(_req(cpus=1))  # would fit, but big came first
    assert big.status == S.PENDING and small.status == S.PENDING


def test_enqueue_failure_leaves_nothing_recorded(settings: Settings, store: SQLiteStore) -> None:
    def broken(task: Task) -> None:
        raise ConnectionError("broker down")

    register(store, "w")
    with pytest.raises(ServiceUnavailable, match="could not enqueue"):
        CloudAI(settings, dispatch=broken).submit(_req())
    assert store.list_tasks(limit=None) == []
    assert store.list_assignments("w") == []


def test_redis_gone_after_a_recent_check_is_still_a_clear_error(settings: Settings, store: SQLiteStore) -> None:
    """A submit skips its Redis check when Redis answered within the last second; if Redis went away in
    that second, placement says so as the check would have, and nothing is recorded."""
    import time

    register(store, "w")
    api = CloudAI(settings.replace(redis_url="redis://127.0.0.1:9/0"), dispatch=Recorder())
    api._redis_ok_at = time.monotonic()  # as if the last submit's check had just passed
    with pytest.raises(RedisUnavailable, match="Redis at redis://127.0.0.1:9/0 can't be reached"):
        api.submit(_req())
    assert store.list_tasks(limit=None) == []


def test_constraints_match_worker_labels(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "cpu-box", cpus=8)
    register(store, "gpu-box", cpus=8, gpu_ids=["0"], labels={"gpu": "a100"})
    assert api.submit(_req(constraints={"gpu": "a100"})).worker_id == "gpu-box"
    with pytest.raises(PlacementError, match="labels"):
        api.submit(_req(constraints={"gpu": "h100"}))


# -- the race: 8 processes x 100 submits against room for 50 -----------------------------------------------

def _submitter(env: dict[str, str], barrier: object, out: object) -> None:
    os.environ.update(env)
    from tests.helpers import placing  # real Celery dispatch onto the worker queues

    api = placing(Settings.from_env())
    barrier.wait()  # type: ignore[attr-defined]
    statuses = [api.submit(_req(cpus=1, memory="512m")).status.value for _ in range(100)]
    out.put(statuses)  # type: ignore[attr-defined]


def test_concurrent_submitters_never_overcommit(settings: Settings, store: SQLiteStore,
                                                redis_client: redis.Redis) -> None:
    register(store, "r1", cpus=20, memory=64 * GiB)
    register(store, "r2", cpus=30, memory=64 * GiB)
    env = {"CLOUDAI_REDIS_URL": settings.redis_url, "CLOUDAI_STORE_URL": settings.store_url,
           "CLOUDAI_WORKER_ID": "submitter", "CLOUDAI_USER": "racer"}
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_submitter, args=(env, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [s for _ in procs for s in out.get(timeout=240)]
    for p in procs:
        p.join(30)
    assert len(results) == 800
    assert results.count("queued") == 50 and results.count("pending") == 750
    tasks = store.list_tasks(limit=None)
    assert sum(t.status == S.QUEUED for t in tasks) == 50
    for worker, cpus in (("r1", 20), ("r2", 30)):
        mine = [t for t in tasks if t.worker_id == worker and t.status == S.QUEUED]
        assert len(mine) == cpus  # full, never over
        assert redis_client.llen(f"cloudai.worker.{worker}") == cpus  # one message per queued task


def test_drained_worker_gets_no_new_tasks_and_undrain_places_waiting_ones(api: CloudAI, store: SQLiteStore) -> None:
    register(store, "w", cpus=4)
    first = api.submit(_req())
    api.set_worker_state("w", WorkerState.DRAINING)
    waiting = api.submit(_req())
    assert waiting.status == S.PENDING and store.get_task(first.task_id).status == S.QUEUED  # type: ignore[union-attr]
    api.set_worker_state("w", WorkerState.ACTIVE)
    assert store.get_task(waiting.task_id).status == S.QUEUED  # type: ignore[union-attr]
    with pytest.raises(WorkerNotFound):
        api.set_worker_state("ghost", WorkerState.DRAINING)


def test_dry_run_says_where_and_records_nothing(api: CloudAI, store: SQLiteStore, sent: Recorder) -> None:
    register(store, "w", cpus=2, gpu_ids=["0"])
    assert api.dry_run(_req(cpus=1)) == "queued on worker w"
    assert api.dry_run(_req(cpus=1, gpus=1, worker="w")) == "queued on worker w"
    api.submit(_req(cpus=2))
    assert api.dry_run(_req(cpus=1)) == "pending: needs 1 CPUs; the most free on any worker is 0"
    with pytest.raises(PlacementError):
        api.dry_run(_req(gpus=4))
    assert len(store.list_tasks(limit=None)) == 1 and len(sent.sent) == 1


def test_remove_worker_refuses_while_it_holds_live_tasks(api: CloudAI, store: SQLiteStore) -> None:
    from cloudai.errors import CloudAIError

    register(store, "w")
    api.submit(_req())
    with pytest.raises(CloudAIError, match="still holds 1 live task"):
        api.remove_worker("w")
    api.remove_worker("w", force=True)
    assert store.get_worker("w") is None
    with pytest.raises(WorkerNotFound):
        api.remove_worker("w")


def test_worker_changes_made_elsewhere_reach_the_next_submit(api: CloudAI, store: SQLiteStore) -> None:
    """A submit lists the workers only when the store's workers version moved: whatever another process
    (here another store connection) registers, resizes, heartbeats or removes is seen by the next submit."""
    register(store, "a", cpus=1)
    assert api.submit(_req(cpus=1)).worker_id == "a"
    assert api.submit(_req(cpus=1)).status == S.PENDING  # a is full
    register(store, "b", cpus=1)
    assert api.submit(_req(cpus=1)).worker_id == "b"
    register(store, "b", cpus=4)  # re-registered bigger: its free counters are rebuilt for the new capacity
    assert api.submit(_req(cpus=2)).worker_id == "b"
    store.heartbeat("b", utcnow() - timedelta(seconds=600))
    stale = api.submit(_req(cpus=0.5))
    assert stale.status == S.PENDING and stale.worker_id is None
    store.heartbeat("b")
    assert api.submit(_req(cpus=0.5)).worker_id == "b"
    assert store.delete_worker("b")
    with pytest.raises(PlacementError, match="more than any registered worker"):
        api.submit(_req(cpus=3))


def test_heartbeats_are_judged_by_the_redis_clock_not_the_submitters(api: CloudAI, store: SQLiteStore,
                                                                    settings: Settings,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Heartbeats are stamped with Redis TIME; a submitter whose own clock is behind must still see a worker
    that stopped heartbeating as stale. (The real Redis clock can't be moved, so TIME is faked here.)"""
    register(store, "w")
    real_time = api.scheduler.redis.time
    ahead = int(settings.heartbeat_timeout_s) + 60  # Redis's clock is this far ahead of this host's

    def redis_time() -> tuple[int, int]:
        sec, usec = real_time()
        return sec + ahead, usec

    monkeypatch.setattr(api.scheduler.redis, "time", redis_time)
    task = api.submit(_req())
    assert task.status == S.PENDING and "no active worker" in (task.pending_reason or "")
    monkeypatch.setattr(api.scheduler.redis, "time", real_time)
    api.scheduler.CLOCK_CHECK_S = 0.0  # measure the offset again now
    assert api.submit(_req()).status == S.QUEUED


def test_placement_survives_a_script_flush_and_a_dropped_connection(api: CloudAI, store: SQLiteStore) -> None:
    """The placement script runs on a pooled connection directly (see Reservations._evalsha): a script Redis
    forgot is loaded again, and a connection Redis closed is opened again, without failing the submit."""
    register(store, "w")
    assert api.submit(_req()).status == S.QUEUED
    api.redis.script_flush()
    assert api.submit(_req()).status == S.QUEUED
    other = redis.Redis.from_url(api.settings.redis_url)
    assert other.client_kill_filter(_type="normal", skipme=True) >= 1  # every connection of the api's pool
    assert api.submit(_req()).status == S.QUEUED
    assert len(store.list_tasks(status=S.QUEUED)) == 3


def test_a_worker_going_stale_between_two_submits_gets_nothing(api: CloudAI, store: SQLiteStore,
                                                               settings: Settings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates are kept between submits while no worker record changes: a worker whose heartbeat grows
    stale meanwhile (no record changes) must drop out all the same."""
    register(store, "w")
    store.heartbeat("w", utcnow() - timedelta(seconds=settings.heartbeat_timeout_s - 2))
    assert api.submit(_req()).status == S.QUEUED  # still fresh by 2 s
    real_time = api.scheduler.redis.time
    monkeypatch.setattr(api.scheduler.redis, "time", lambda: (real_time()[0] + 3, real_time()[1]))  # 3 s later
    api.scheduler.CLOCK_CHECK_S = 0.0
    late = api.submit(_req())
    assert late.status == S.PENDING and "no active worker" in (late.pending_reason or "")
