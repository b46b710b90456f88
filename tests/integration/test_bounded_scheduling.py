"""Scheduling as one bounded loop, on real Redis and the SQLite store: workers and requests only signal; a
placer's step examines at most CLOUDAI_SCHED_DEPTH waiting tasks for at most CLOUDAI_SCHED_BUDGET and the next
step resumes where it stopped; beat's full backfill resumes across ticks; the master's placer wakes on a signal
sent by another process. Budgets are made tiny so that every step runs out of time after one task: the tests
follow what the steps did, never how long they took."""

from __future__ import annotations

from datetime import timedelta

import redis
from prometheus_client import REGISTRY

from cloudai import keys
from cloudai.api import CloudAI, SubmitRequest
from cloudai.models import Resources, Task, TaskStatus, utcnow
from cloudai.scheduler import Scheduler
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import register, wait_for

S = TaskStatus
TINY = 1e-9  # a budget every step exceeds after its first task


def _waiting(api: CloudAI, n: int) -> list[Task]:
    """``n`` one-CPU tasks that wait, in submit order (worker ``w``, if registered, has a stale heartbeat)."""
    if not api.store.list_workers():
        register(api.store, "w", cpus=8)
    api.store.heartbeat("w", utcnow() - timedelta(seconds=api.settings.heartbeat_timeout_s + 5))
    tasks = [api.submit(SubmitRequest(image="busybox", command="true", resources=Resources.parse(1, "64m")))
             for _ in range(n)]
    assert all(t.status == S.PENDING for t in tasks)
    return tasks


def test_an_event_step_examines_at_most_the_depth(settings: Settings, store: SQLiteStore) -> None:
    sent: list[Task] = []
    api = CloudAI(settings.replace(sched_depth=2), dispatch=sent.append)
    tasks = _waiting(api, 5)
    store.heartbeat("w")  # back: the tasks fit now
    api.scheduler.signal()
    step = api.scheduler.step()
    assert step is not None and step.done and step.examined == 2
    assert [t.task_id for t in step.placed] == [t.task_id for t in tasks[:2]]  # the head of the queue first
    again = api.scheduler.step()  # nothing signalled since: nothing examined
    assert again is not None and again.done and again.examined == 0
    assert [t.task_id for t in api.scheduler.place_pending()] == [t.task_id for t in tasks[2:]]  # full backfill


def test_a_step_out_of_time_resumes_where_it_stopped(settings: Settings, store: SQLiteStore,
                                                     redis_client: redis.Redis) -> None:
    sent: list[Task] = []
    api = CloudAI(settings.replace(sched_budget_s=TINY), dispatch=sent.append)
    tasks = _waiting(api, 3)
    store.heartbeat("w")  # back: the tasks fit now
    api.scheduler.signal()
    order: list[str] = []
    while True:
        step = api.scheduler.step()
        assert step is not None and step.examined == 1  # each step stops after one task: out of time
        order += [t.task_id for t in step.placed]
        if step.done:
            break
        assert redis_client.hget(keys.SCHED_CURSOR, "event")  # where the next one resumes
    assert order == [t.task_id for t in tasks]
    assert not redis_client.hexists(keys.SCHED_CURSOR, "event")


def test_a_new_signal_starts_again_from_the_head(settings: Settings, store: SQLiteStore) -> None:
    sent: list[Task] = []
    api = CloudAI(settings.replace(sched_budget_s=TINY), dispatch=sent.append)
    register(store, "w", cpus=1, slots=1)
    running = api.submit(SubmitRequest(image="busybox", command="true", resources=Resources.parse(1, "64m")))
    assert running.status == S.QUEUED
    tasks = _waiting(api, 3)
    store.heartbeat("w")
    api.scheduler.signal()
    first = api.scheduler.step()
    assert first is not None and not first.done and first.placed == []  # the head claims the busy worker
    # the running task ends: a signal, and the next step examines the head again (not the cursor's position)
    assert store.transition(running.task_id, S.QUEUED, S.RUNNING)
    assert store.transition(running.task_id, S.RUNNING, S.COMPLETED)
    api.scheduler.release(store.get_task(running.task_id))  # type: ignore[arg-type]
    api.scheduler.signal()
    step = api.scheduler.step()
    assert step is not None and [t.task_id for t in step.placed] == [tasks[0].task_id]


def test_beats_backfill_resumes_on_the_next_tick(settings: Settings, store: SQLiteStore,
                                                 redis_client: redis.Redis) -> None:
    sent: list[Task] = []
    api = CloudAI(settings.replace(sched_backfill_budget_s=TINY), dispatch=sent.append)
    tasks = _waiting(api, 3)
    store.heartbeat("w")  # back: the tasks fit now
    redis_client.delete(keys.SCHED_PASS_DIRTY)  # no event: only the periodic full pass places
    placed: list[str] = []
    for _ in tasks:
        placed += [t.task_id for t in api.scheduler.backfill(0)]  # a tick with no time: one step
    assert placed == [t.task_id for t in tasks]
    assert REGISTRY.get_sample_value("cloudai_sched_step_seconds_count", {"mode": "full"})


def test_a_signal_from_another_process_wakes_the_masters_placer(settings: Settings, store: SQLiteStore,
                                                              redis_client: redis.Redis) -> None:
    sent: list[Task] = []
    master = CloudAI(settings, dispatch=sent.append)
    tasks = _waiting(master, 2)
    store.heartbeat("w")  # back: the tasks fit now
    redis_client.delete(keys.SCHED_PASS_DIRTY)
    master.start_placer()
    try:
        # a worker's agent after a task ended: it only signals (its scheduler never places here)
        Scheduler(settings, store, redis_client, dispatch=lambda _t: None).signal()
        for task in tasks:
            wait_for(lambda t=task: store.get_task(t.task_id).status == S.QUEUED,  # type: ignore[union-attr]
                     what=f"task {task.task_id} queued by the master's placer")
        assert {t.task_id for t in sent} == {t.task_id for t in tasks}
    finally:
        master.stop_placer()


def test_signal_sets_the_flag_and_one_wake_up(settings: Settings, store: SQLiteStore,
                                              redis_client: redis.Redis) -> None:
    scheduler = Scheduler(settings, store, redis_client, dispatch=None)
    for _ in range(3):
        scheduler.signal()
    assert redis_client.exists(keys.SCHED_PASS_DIRTY) and redis_client.llen(keys.SCHED_WAKE) == 1
    assert scheduler.wait_signal(1) and redis_client.llen(keys.SCHED_WAKE) == 0


def test_a_placer_that_finds_the_lock_held_leaves_the_signal_for_its_holder(settings: Settings,
                                                                           store: SQLiteStore,
                                                                           redis_client: redis.Redis) -> None:
    sent: list[Task] = []
    api = CloudAI(settings, dispatch=sent.append)
    tasks = _waiting(api, 1)
    store.heartbeat("w")
    api.scheduler.LOCK_RETRIES = 2  # type: ignore[misc]  # a few tries, not a second's worth
    api.scheduler.signal()
    lock = redis_client.lock(keys.lock("placement"), timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert api.scheduler.run_events() == []
        assert redis_client.exists(keys.SCHED_PASS_DIRTY)  # still asked for: the holder (or beat) runs it
    finally:
        lock.release()
    assert [t.task_id for t in api.scheduler.run_events()] == [tasks[0].task_id]
