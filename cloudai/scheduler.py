"""Placement: pick a worker whose free capacity fits a task and reserve it atomically.

Free capacity = a worker's capacity minus what its queued and running tasks reserve (the store is the truth;
nothing is counted twice). Every placement runs under one Redis lock, so concurrent submitters never
over-commit a worker. GPU ids are chosen here, stored with the task, and used exactly by the worker."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis

from cloudai import keys
from cloudai.errors import CloudAIError, PlacementError, ServiceUnavailable, WorkerNotFound
from cloudai.gpus import fenced_gpu_ids
from cloudai.models import LIVE, Task, TaskStatus, WorkerInfo, WorkerState, format_bytes, utcnow
from cloudai.settings import Settings
from cloudai.store import TaskStore

log = logging.getLogger(__name__)
S = TaskStatus
Dispatch = Callable[[Task], None]
EPS = 1e-9


@dataclass
class Free:
    worker: WorkerInfo
    cpus: float
    memory: int
    gpu_ids: list[str] = field(default_factory=list)

    def take(self, task: Task, gpu_ids: list[str]) -> None:
        self.cpus -= task.req_cpu
        self.memory -= task.memory_bytes
        self.gpu_ids = [g for g in self.gpu_ids if g not in gpu_ids]


def free_capacity(workers: Iterable[WorkerInfo], live: Iterable[Task],
                  client: redis.Redis | None = None) -> dict[str, Free]:
    """What each worker has left after the reservations of its live tasks (and, given Redis, without the GPU
    ids a lost attempt's container may still use: issue 12, :func:`cloudai.gpus.fenced_gpu_ids`)."""
    live = list(live)
    free = {w.worker_id: Free(w, w.cpus, w.memory, list(w.gpu_ids)) for w in workers}
    if client is not None:  # issue 12: fenced GPU ids are not free
        for held in free.values():
            fenced = fenced_gpu_ids(client, held.worker.worker_id, held.gpu_ids, live)
            held.gpu_ids = [g for g in held.gpu_ids if g not in fenced]
    for task in live:
        slot = free.get(task.worker_id or "")
        if slot is not None and task.status in LIVE:
            slot.take(task, task.gpu_ids)
    return free


def fits(task: Task, cpus: float, memory: int, gpus: int, labels: dict[str, str]) -> bool:
    return (
        task.req_cpu <= cpus + EPS
        and task.memory_bytes <= memory
        and task.req_gpu <= gpus
        and all(labels.get(k) == v for k, v in task.constraints.items())
    )


class Scheduler:
    """Places tasks on workers; ``dispatch`` puts a queued task's message on its worker's queue."""

    def __init__(self, settings: Settings, store: TaskStore, client: redis.Redis, dispatch: Dispatch) -> None:
        self.settings = settings
        self.store = store
        self.redis = client
        self.dispatch = dispatch

    def _lock(self) -> redis.lock.Lock:
        return self.redis.lock(keys.lock("placement"), timeout=60, blocking_timeout=60)

    def _candidates(self, task: Task, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        now = utcnow()
        alive = [w for w in workers if w.state == WorkerState.ACTIVE
                 and w.alive(now, self.settings.heartbeat_timeout_s)]
        if task.pinned_worker:
            return [w for w in alive if w.worker_id == task.pinned_worker]
        return alive

    def _choose(self, task: Task, candidates: list[WorkerInfo], free: dict[str, Free]) -> Free | None:
        options = [free[w.worker_id] for w in candidates if w.worker_id in free]
        options = [f for f in options if fits(task, f.cpus, f.memory, len(f.gpu_ids), f.worker.labels)]
        if not options:
            return None

        def load_after(f: Free) -> float:  # the larger used share of CPU and memory once the task is placed
            cpu = 1 - (f.cpus - task.req_cpu) / f.worker.cpus if f.worker.cpus else 1.0
            mem = 1 - (f.memory - task.memory_bytes) / f.worker.memory if f.worker.memory else 1.0
            return max(cpu, mem)

        if self.settings.placement_policy == "pack":
            return min(options, key=lambda f: (-load_after(f), f.worker.worker_id))
        return min(options, key=lambda f: (load_after(f), f.worker.worker_id))

    def _pending_reason(self, task: Task, candidates: list[WorkerInfo], free: dict[str, Free]) -> str:
        if not candidates:
            if task.pinned_worker:
                return f"worker {task.pinned_worker} is not active"
            return "no active worker (none with a fresh heartbeat that is not draining)"
        slots = [free[w.worker_id] for w in candidates if w.worker_id in free]
        matching = [f for f in slots if all(f.worker.labels.get(k) == v for k, v in task.constraints.items())]
        if not matching:
            wanted = ",".join(f"{k}={v}" for k, v in task.constraints.items())
            return f"no active worker has the labels {wanted}"
        most_gpus = max(len(f.gpu_ids) for f in matching)
        if task.req_gpu > most_gpus:
            plural = "s" if task.req_gpu > 1 else ""
            return f"needs {task.req_gpu} GPU{plural}; the most free on any worker is {most_gpus}"
        most_cpus = max(f.cpus for f in matching)
        if task.req_cpu > most_cpus + EPS:
            return f"needs {task.req_cpu:g} CPUs; the most free on any worker is {max(most_cpus, 0):g}"
        most_mem = max(f.memory for f in matching)
        if task.memory_bytes > most_mem:
            return (f"needs {format_bytes(task.memory_bytes)} memory; the most free on any worker is "
                    f"{format_bytes(max(most_mem, 0))}")
        return "no worker has all of the CPUs, memory and GPUs free at once"

    def _check_possible(self, task: Task, workers: list[WorkerInfo]) -> None:
        """Refuse a task that no registered worker could ever run, even empty."""
        if task.pinned_worker:
            pinned = next((w for w in workers if w.worker_id == task.pinned_worker), None)
            if pinned is None:
                raise WorkerNotFound(task.pinned_worker)
            if pinned.state == WorkerState.DRAINING:
                raise PlacementError(f"worker {pinned.worker_id} is draining and takes no new tasks")
            workers = [pinned]
        if not workers:
            raise PlacementError("no workers are registered; start one with `cloudai worker start`")
        if any(fits(task, w.cpus, w.memory, len(w.gpu_ids), w.labels) for w in workers):
            return
        where = f"worker {task.pinned_worker}" if task.pinned_worker else "any registered worker"
        biggest = max(workers, key=lambda w: (len(w.gpu_ids), w.cpus, w.memory))
        raise PlacementError(
            f"task needs {task.resources.describe()}"
            + (f" with labels {task.constraints}" if task.constraints else "")
            + f", more than {where} has (largest: {biggest.worker_id} with {biggest.cpus:g} CPUs, "
            f"{format_bytes(biggest.memory)}, {len(biggest.gpu_ids)} GPUs); lower the request or add a worker"
        )

    def preview(self, task: Task) -> str:
        """Where ``task`` would go now (``--dry-run``); records nothing. Raises like :meth:`submit`."""
        workers = self.store.list_workers()
        self._check_possible(task, workers)
        free = free_capacity(workers, self.store.list_tasks(status=LIVE, limit=None), self.redis)
        candidates = self._candidates(task, workers)
        slot = self._choose(task, candidates, free)
        if slot is None:
            return "pending: " + self._pending_reason(task, candidates, free)
        return f"queued on worker {slot.worker.worker_id}"

    def submit(self, task: Task) -> Task:
        """Record ``task`` as queued on a worker that fits (and enqueue it), or as pending with a reason.
        On an enqueue failure nothing stays recorded."""
        try:
            with self._lock():
                workers = self.store.list_workers()
                self._check_possible(task, workers)
                free = free_capacity(workers, self.store.list_tasks(status=LIVE, limit=None), self.redis)
                candidates = self._candidates(task, workers)
                older_pending = self.store.list_tasks(status=S.PENDING, limit=1)
                # first come, first served: a new task does not overtake pending ones
                slot = None if older_pending else self._choose(task, candidates, free)
                if slot is None:
                    task.status = S.PENDING
                    task.pending_reason = (
                        "waiting behind earlier pending tasks" if older_pending and candidates
                        else self._pending_reason(task, candidates, free)
                    )
                    self.store.create_task(task)
                    if older_pending:
                        self._place_pending_locked()
                        return self.store.get_task(task.task_id) or task
                    return task
                self._queue_on(task, slot, create=True)
                return task
        except redis.exceptions.LockError as exc:
            raise ServiceUnavailable(f"placement lock not acquired: {exc}") from exc
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis error during placement: {exc}") from exc

    def _queue_on(self, task: Task, slot: Free, create: bool) -> bool:
        """Record ``task`` queued on ``slot`` (a new record, or pending → queued) and send its message."""
        gpu_ids = sorted(slot.gpu_ids, key=_gpu_order)[: task.req_gpu]
        worker_id = slot.worker.worker_id
        if create:
            task.worker_id, task.gpu_ids, task.pending_reason, task.status = worker_id, gpu_ids, None, S.QUEUED
            self.store.create_task(task)
        elif not self.store.transition(task.task_id, S.PENDING, S.QUEUED, worker_id=worker_id, gpu_ids=gpu_ids,
                                       pending_reason=None):
            return False
        else:
            task.worker_id, task.gpu_ids, task.pending_reason, task.status = worker_id, gpu_ids, None, S.QUEUED
        self.store.create_assignment(task.task_id, slot.worker.worker_id)
        try:
            self.dispatch(task)
        except Exception as exc:
            if create:
                self.store.delete_task(task.task_id)
            else:
                self.store.transition(task.task_id, S.QUEUED, S.PENDING, worker_id=None, gpu_ids=[],
                                      pending_reason=f"enqueue failed: {exc}")
                self.store.delete_assignment(task.task_id)
            raise ServiceUnavailable(f"could not enqueue task {task.task_id} on {slot.worker.queue}: {exc}") from exc
        slot.take(task, gpu_ids)
        return True

    def place_pending(self) -> list[Task]:
        """Queue pending tasks that fit now, in order (higher ``priority`` first, then submit time)."""
        try:
            with self._lock():
                return self._place_pending_locked()
        except redis.exceptions.LockError:
            log.warning("placement lock busy; pending tasks wait for the next tick")
            return []

    def _place_pending_locked(self) -> list[Task]:
        pending = self.store.list_tasks(status=S.PENDING, limit=None)
        if not pending:
            return []
        pending.sort(key=lambda t: (-t.priority, t.created_at, t.task_id))
        workers = self.store.list_workers()
        free = free_capacity(workers, self.store.list_tasks(status=LIVE, limit=None), self.redis)
        placed: list[Task] = []
        blocked_all = False  # an unpinned task that doesn't fit holds back later unpinned ones
        blocked: set[str] = set()  # workers whose pinned head task doesn't fit
        for task in pending:
            if task.pinned_worker:
                if task.pinned_worker in blocked:
                    continue
            elif blocked_all:
                continue
            candidates = self._candidates(task, workers)
            slot = self._choose(task, candidates, free)
            if slot is None:
                reason = self._pending_reason(task, candidates, free)
                if reason != task.pending_reason:
                    self.store.update_task(task.task_id, S.PENDING, pending_reason=reason)
                if task.pinned_worker:
                    blocked.add(task.pinned_worker)
                else:
                    blocked_all = True
                continue
            try:
                if self._queue_on(task, slot, create=False):
                    placed.append(task)
            except CloudAIError:
                log.exception("placing pending task %s failed", task.task_id)
                break
        return placed


def _gpu_order(gpu_id: str) -> tuple[int, str]:
    return (int(gpu_id), gpu_id) if gpu_id.isdigit() else (1 << 30, gpu_id)
