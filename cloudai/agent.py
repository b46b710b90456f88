"""The worker host agent: registers the worker, heartbeats, and reconciles Docker with the store (re-attach
to containers that outlived a restart, remove orphans, fail tasks whose container vanished)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cloudai import keys
from cloudai.errors import ConfigError
from cloudai.executor import Executor
from cloudai.logs import LogBus
from cloudai.models import Task, TaskError, TaskStatus, WorkerInfo, WorkerState, utcnow
from cloudai.runtime import DockerRuntime
from cloudai.scheduler import Dispatch, Scheduler
from cloudai.settings import Settings
from cloudai.store import TaskStore, open_store

log = logging.getLogger(__name__)
S = TaskStatus


@dataclass(frozen=True)
class Capacity:
    cpus: float
    memory: int
    gpu_ids: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    slots: int = 16  # tasks run at once (the Celery concurrency)


class WorkerAgent:
    """Everything a worker host does besides running queue messages."""

    def __init__(
        self,
        store: TaskStore,
        runtime: DockerRuntime,
        executor: Executor,
        capacity: Capacity,
        heartbeat_interval_s: float,
        reconcile_interval_s: float = 30.0,
        on_lost: Callable[[Task, str], None] | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.executor = executor
        self.worker_id = executor.worker_id
        self.capacity = capacity
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reconcile_interval_s = reconcile_interval_s
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def register(self) -> WorkerInfo:
        """Upsert this worker's record; a worker that was draining stays draining across restarts."""
        previous = self.store.get_worker(self.worker_id)
        state = WorkerState.DRAINING if previous and previous.state == WorkerState.DRAINING else WorkerState.ACTIVE
        info = WorkerInfo(
            worker_id=self.worker_id,
            hostname=socket.gethostname(),
            queue=keys.worker_queue(self.worker_id),
            cpus=self.capacity.cpus,
            memory=self.capacity.memory,
            gpu_ids=list(self.capacity.gpu_ids),
            labels=dict(self.capacity.labels),
            state=state,
            slots=self.capacity.slots,
        )
        self.store.upsert_worker(info)
        log.info("worker %s registered: %g CPUs, %d bytes, GPUs %s", self.worker_id, info.cpus, info.memory,
                 info.gpu_ids or "none")
        return info

    def start(self) -> None:
        """Register, reconcile once, then heartbeat and reconcile in the background."""
        self.register()
        self.reconcile()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._reconcile_loop, "reconcile")):
            thread = threading.Thread(target=target, name=f"cloudai-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop heartbeating. The worker is marked offline only when it holds no running task: a worker that
        restarts within the heartbeat timeout re-attaches to its containers instead of losing them."""
        self._stop.set()
        running = self.store.list_tasks(status=S.RUNNING, worker_id=self.worker_id, limit=1)
        if not running:
            self.store.set_worker_state(self.worker_id, WorkerState.OFFLINE)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                if not self.store.heartbeat(self.worker_id):
                    self.register()  # removed while we ran: come back
                else:
                    info = self.store.get_worker(self.worker_id)
                    if info is not None and info.state == WorkerState.OFFLINE:
                        # declared dead by the reaper while we were only slow: come back as active
                        self.store.set_worker_state(self.worker_id, WorkerState.ACTIVE, WorkerState.OFFLINE)
            except Exception:
                log.exception("heartbeat of %s failed", self.worker_id)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.reconcile_interval_s):
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile of %s failed", self.worker_id)

    def reconcile(self) -> dict[str, list[str]]:
        """Match this worker's containers with the store. Returns what it did, by action."""
        done: dict[str, list[str]] = {"attached": [], "removed": [], "lost": []}
        active = self.executor.active()
        seen: set[str] = set()
        for container in self.runtime.find(worker_id=self.worker_id):
            task_id = container["Labels"].get(keys.LABEL_TASK_ID, "")
            container_id = container["Id"]
            seen.add(task_id)
            if task_id in active:
                continue
            task = self.store.get_task(task_id)
            if task and task.status == S.RUNNING and task.worker_id == self.worker_id and (
                task.container_id in (None, container_id)
            ):
                if task.container_id is None:
                    self.store.update_task(task_id, S.RUNNING, container_id=container_id)
                if container.get("State") == "created":  # we died between creating and starting it
                    self.runtime.start(container_id)
                    self.store.update_task(task_id, S.RUNNING, started_at=utcnow())
                thread = threading.Thread(target=self.executor.attach, args=(task, container_id),
                                          name=f"attach-{task_id}", daemon=True)
                thread.start()
                done["attached"].append(task_id)
            elif task is None or task.status.terminal or task.worker_id != self.worker_id:
                log.info("removing orphan container %s of task %s", container_id[:12], task_id)
                self.runtime.remove(container_id)
                done["removed"].append(task_id)
        for task in self.store.list_tasks(status=S.RUNNING, worker_id=self.worker_id, limit=None):
            if task.task_id in seen or task.task_id in active or task.task_id in self.executor.active():
                continue
            # running here by the store, but no container and nobody working on it: the worker died between
            # claiming the task and creating its container, or someone removed the container
            reason = f"container of task {task.task_id} vanished from worker {self.worker_id}"
            if self.on_lost is not None:
                self.on_lost(task, reason)
            elif self.store.transition(task.task_id, S.RUNNING, S.LOST, completed_at=utcnow(),
                                       error=TaskError("Lost", reason)):
                self.executor.bus.end(task.task_id, S.LOST.value, None, reason)
            done["lost"].append(task.task_id)
        return done


def host_capacity(cpus: str, memory: str, gpus: str, labels: str, slots: int = 16) -> Capacity:
    """This host's offer from ``cloudai worker start`` flags / CLOUDAI_WORKER_* (empty: the whole host)."""
    from cloudai.gpus import detect_gpus
    from cloudai.models import parse_cpus, parse_size

    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    label_map: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in labels.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"worker label {item!r}: use key=value, such as gpu=a100")
        label_map[key] = value
    return Capacity(
        cpus=parse_cpus(cpus) if cpus else float(os.cpu_count() or 1),
        memory=parse_size(memory) if memory else total_memory,
        gpu_ids=detect_gpus(gpus),
        labels=label_map,
        slots=max(1, slots),
    )


@dataclass
class WorkerProcess:
    """What one worker process holds: the executor that runs messages and the agent around it."""

    settings: Settings
    store: TaskStore
    bus: LogBus
    executor: Executor
    agent: WorkerAgent


def build_worker(settings: Settings, dispatch: Dispatch) -> WorkerProcess:
    """Wire a worker process: store, log bus, Docker, executor, agent. Placement of pending tasks runs after
    each task ends (its reservation is free then)."""
    from cloudai.maintenance import lose_task

    store = open_store(settings.store_url)
    bus = LogBus.from_url(settings.redis_url, settings.log_stream_maxlen)
    runtime = DockerRuntime()
    scheduler = Scheduler(settings, store, bus.redis, dispatch)

    def after_finish(_task: Task) -> None:
        scheduler.place_pending()  # its reservation is free now

    executor = Executor(settings, store, bus, runtime, bus.redis, after_finish=after_finish)
    capacity = host_capacity(settings.worker_cpus, settings.worker_memory, settings.worker_gpus,
                             settings.worker_labels, settings.worker_concurrency)

    def on_lost(task: Task, reason: str) -> None:
        if lose_task(store, bus, task, reason, scheduler.reservations) is not None:
            scheduler.place_pending()

    agent = WorkerAgent(store, runtime, executor, capacity, settings.heartbeat_interval_s, on_lost=on_lost)
    return WorkerProcess(settings, store, bus, executor, agent)
