"""The worker host agent: registers the worker, heartbeats, and reconciles Docker with the store (re-attach
to containers that outlived a restart, remove orphans, fail tasks whose container vanished)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from cloudai import keys
from cloudai.clock import redis_now, stamp_ms
from cloudai.diskguard import DiskGuard
from cloudai.errors import ConfigError
from cloudai.executor import Executor, attempt_ttl_s
from cloudai.fencing import Fence, fence_after, redis_timeout
from cloudai.gpus import holder, parse_holder
from cloudai.logs import LogBus
from cloudai.models import Task, TaskStatus, WorkerInfo, WorkerState, utcnow
from cloudai.redisconn import connect
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
    volumes: dict[str, str] = field(default_factory=dict)  # name -> mode (cloudai.volumes.offer)


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
        fence: Fence | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.executor = executor
        self.worker_id = executor.worker_id
        self.capacity = capacity
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reconcile_interval_s = reconcile_interval_s
        self.on_lost = on_lost
        self.fence = fence or executor.fence or Fence(fence_after(executor.settings.heartbeat_timeout_s,
                                                                  heartbeat_interval_s))
        self.redis = executor.redis
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
            volumes=dict(self.capacity.volumes),
            pids_limit=self.executor.pids_limit,
            disk_quota=self.executor.disk.quota_supported if self.executor.disk is not None else None,
            pressure=self.executor.disk.pressure() if self.executor.disk is not None else None,
        )
        with contextlib.suppress(redis.RedisError):
            info.last_heartbeat = redis_now(self.redis)  # one clock: Redis TIME (beat judges with it)
        self.store.upsert_worker(info)
        log.info("worker %s registered: %g CPUs, %d bytes, GPUs %s, volumes %s", self.worker_id, info.cpus,
                 info.memory, info.gpu_ids or "none", info.volumes or "none")
        return info

    def set_pressure(self, reason: str | None) -> None:
        """Say in this worker's record why it takes no new task (None: it does again); placement reads it."""
        info = self.store.get_worker(self.worker_id)
        if info is not None and info.pressure != reason:
            info.pressure = reason
            self.store.upsert_worker(info)  # a new workers version: placement reads the record again

    def start(self) -> None:
        """Register, reconcile once (containers of attempts lost meanwhile go before any new work runs), then
        heartbeat and reconcile in the background."""
        disk = self.executor.disk
        if disk is not None:
            log.info("%s", disk.describe())
            disk.check()  # the record says from the start whether this worker is short of disk
        self.register()
        self.reconcile()
        self.fence.heartbeat_ok()
        self.fence.cleaned()
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._store_heartbeat_loop, "store-heartbeat"),
                             (self._reconcile_loop, "reconcile")):
            thread = threading.Thread(target=target, name=f"cloudai-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if disk is not None:
            disk.start()

    def stop(self) -> None:
        """Stop heartbeating. The worker is marked offline only when it holds no running task: a worker that
        restarts within the heartbeat timeout re-attaches to its containers instead of losing them."""
        self._stop.set()
        if self.executor.disk is not None:
            self.executor.disk.stop()
        for thread in self._threads:  # a heartbeat in flight must not bring the worker back after this
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        running = self.store.list_tasks(status=S.RUNNING, worker_id=self.worker_id, limit=1)
        if not running:
            self.store.set_worker_state(self.worker_id, WorkerState.OFFLINE)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat()
            except Exception:
                log.exception("heartbeat of %s failed", self.worker_id)

    def _store_heartbeat_loop(self) -> None:
        # on its own thread: a store that hangs (a lock, a failover) must not stop the Redis heartbeat that
        # keeps this worker's containers alive
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                self.store_heartbeat()
            except Exception as exc:
                log.warning("heartbeat of %s into the store failed: %s", self.worker_id, exc)

    def heartbeat(self) -> bool:
        """Stamp this worker alive in Redis with Redis TIME (the one clock beat judges with) and refresh the
        TTLs of its attempts and GPU leases. After a gap past the fence limit (a resume after SIGSTOP, a healed
        partition), containers of attempts this worker no longer owns are stopped and removed before it takes
        new work."""
        try:
            now = redis_now(self.redis)
            self.redis.set(keys.heartbeat(self.worker_id), stamp_ms(now),
                           px=int(attempt_ttl_s(self.executor.settings) * 1000))
        except redis.RedisError as exc:
            log.warning("heartbeat of %s: Redis unreachable (%s); silent for %.1fs", self.worker_id, exc,
                        self.fence.silent_for())
            return False
        if self.fence.heartbeat_ok():
            log.warning("worker %s is back after a heartbeat gap: cleaning up before taking new work", self.worker_id)
        self._refresh_attempts()
        if not self.fence.healthy():
            try:
                self._settle_active()
                self.reconcile()
                self.fence.cleaned()
            except Exception:
                log.exception("clean-up after a heartbeat gap failed; new work waits")
        return True

    def store_heartbeat(self) -> None:
        """The same stamp in the store (what `cloudai workers` shows, and what beat falls back on when Redis
        lost its keys); a worker the reaper declared offline comes back as active once it is clean."""
        now = redis_now(self.redis)
        if not self.store.heartbeat(self.worker_id, now):
            self.register()  # removed while we ran: come back
            return
        info = self.store.get_worker(self.worker_id)
        if info is not None and info.state == WorkerState.OFFLINE and self.fence.healthy():
            self.store.set_worker_state(self.worker_id, WorkerState.ACTIVE, WorkerState.OFFLINE)

    def _settle_active(self, wait_s: float = 10.0) -> None:
        """After a gap: attempts this process still supervises that are no longer current stop now (their
        containers removed); self-fenced ones finish stopping. Waits (bounded) for both, so that reconcile sees
        their containers as not active and removes what is left."""
        revoked = set(self.executor.revoke_stale())
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            busy = self.executor.active() & (revoked | set(self.executor.self_fenced))
            if not busy:
                return
            time.sleep(0.05)

    def _refresh_attempts(self) -> None:
        ttl = attempt_ttl_s(self.executor.settings)
        for task in self.executor.active_attempts():
            try:
                self.executor.bus.attempt(task.task_id, task.execution_id, ttl, "refresh")
                self.executor.gpus.refresh(holder(task.task_id, task.execution_id), task.gpu_ids)
            except Exception as exc:
                log.warning("attempt %s of %s not refreshed: %s", task.execution_id, task.task_id, exc)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.reconcile_interval_s):
            try:
                self.executor.revoke_stale()  # a quiet task's stale attempt writes nothing to be refused
                self.reconcile()
            except Exception:
                log.exception("reconcile of %s failed", self.worker_id)

    def reconcile(self) -> dict[str, list[str]]:
        """Match this worker's containers with the store. Returns what it did, by action: ``attached`` (the
        attempt is current: supervise it again), ``removed`` (its attempt is not current: stop and remove it,
        then free its GPUs), ``fenced`` (this worker stopped it while it could not heartbeat: the attempt goes
        to beat's rules, lost or retried), ``lost`` (running by the store, but no container)."""
        done: dict[str, list[str]] = {"attached": [], "removed": [], "fenced": [], "lost": []}
        active = self.executor.active()
        seen: set[str] = set()
        for container in self.runtime.find(worker_id=self.worker_id):
            labels = container.get("Labels") or {}
            task_id = labels.get(keys.LABEL_TASK_ID, "")
            execution = labels.get(keys.LABEL_EXECUTION_ID)
            container_id = container["Id"]
            seen.add(task_id)
            if task_id in active:
                continue
            task = self.store.get_task(task_id)
            current = bool(task and task.status == S.RUNNING and task.worker_id == self.worker_id
                           and execution in (None, task.execution_id) and task.container_id in (None, container_id))
            if current and task is not None and self.executor.self_fenced.get(task_id) == task.execution_id:
                if not self.fence.healthy():
                    continue  # still cut off: beat decides (and Redis must hear the verdict), or we do once back
                reason = (f"worker {self.worker_id} could not heartbeat for longer than "
                          f"{self.fence.limit_s:g}s and stopped the container itself")
                self._lose(task, reason)
                self._remove(task_id, execution, container_id)
                self.executor.self_fenced.pop(task_id, None)
                done["fenced"].append(task_id)
            elif current and task is not None:
                if task.container_id is None:
                    self.store.update_task(task_id, S.RUNNING, execution=task.execution_id, container_id=container_id)
                if container.get("State") == "created":  # we died between creating and starting it
                    self.runtime.start(container_id)
                    self.store.update_task(task_id, S.RUNNING, execution=task.execution_id, started_at=utcnow())
                thread = threading.Thread(target=self.executor.attach, args=(task, container_id),
                                          name=f"attach-{task_id}", daemon=True)
                thread.start()
                done["attached"].append(task_id)
            else:
                log.warning("removing container %s of task %s: its attempt %s is not current (task %s)",
                            container_id[:12], task_id, execution or "?", task.status.value if task else "unknown")
                self._remove(task_id, execution, container_id)
                done["removed"].append(task_id)
        for task in self.store.list_tasks(status=S.RUNNING, worker_id=self.worker_id, limit=None):
            if task.task_id in seen or task.task_id in active or task.task_id in self.executor.active():
                continue
            # running here by the store, but no container and nobody working on it: the worker died between
            # claiming the task and creating its container, or someone removed the container
            self._lose(task, f"container of task {task.task_id} vanished from worker {self.worker_id}")
            done["lost"].append(task.task_id)
        return done

    def _lose(self, task: Task, reason: str) -> None:
        if self.on_lost is not None:
            self.on_lost(task, reason)
        else:
            from cloudai.maintenance import lose_task

            lose_task(self.store, self.executor.bus, task, reason)

    def _remove(self, task_id: str, execution: str | None, container_id: str) -> None:
        """Stop and remove a container (force: SIGKILL), then free its attempt's GPU leases: only now is the
        container known gone."""
        self.runtime.remove(container_id)
        if execution:
            self.executor.gpus.release(holder(task_id, execution), list(self.capacity.gpu_ids))
        for entry in self.executor.gpus.held(list(self.capacity.gpu_ids)).values():
            if parse_holder(entry)[0] == task_id and not self.runtime.find(worker_id=self.worker_id, task_id=task_id):
                self.executor.gpus.release(entry, list(self.capacity.gpu_ids))
        if self.capacity.gpu_ids:  # GPU ids held back while that container lived are offered again now
            info = self.store.get_worker(self.worker_id)
            if info is not None:
                with contextlib.suppress(redis.RedisError):
                    self.executor.reservations.rebuild(info)


def host_capacity(cpus: str, memory: str, gpus: str, labels: str, slots: int = 16, volumes: str = "") -> Capacity:
    """This host's offer from ``cloudai worker start`` flags / CLOUDAI_WORKER_* (empty: the whole host). Each
    volume's directory must exist here (:meth:`cloudai.volumes.Volume.check_host`)."""
    from cloudai.gpus import detect_gpus
    from cloudai.models import parse_cpus, parse_size
    from cloudai.volumes import offer, parse_volumes

    declared = parse_volumes([volumes])
    for volume in declared.values():
        volume.check_host()

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
        volumes=offer(declared),
    )


@dataclass
class WorkerProcess:
    """What one worker process holds: the executor that runs messages and the agent around it."""

    settings: Settings
    store: TaskStore
    bus: LogBus
    executor: Executor
    agent: WorkerAgent


def build_worker(settings: Settings, dispatch: Dispatch | None = None) -> WorkerProcess:
    """Wire a worker process: store, log bus, Docker, executor, agent. After each task ends (its reservation is
    free then) the agent only signals: the master's placer (or beat's tick) places what waits."""
    from cloudai.maintenance import lose_task

    store = open_store(settings.store_url)
    # every Redis call of the worker is bounded so that a partition can't hold its self-fencing up (fencing.py)
    timeout = redis_timeout(settings.heartbeat_timeout_s, settings.heartbeat_interval_s)
    client = connect(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    bus = LogBus(client, settings.log_stream_maxlen, settings.redis_url)
    runtime = DockerRuntime()
    scheduler = Scheduler(settings, store, bus.redis, dispatch)

    def after_finish(_task: Task) -> None:
        scheduler.signal()  # its reservation is free now

    fence = Fence(fence_after(settings.heartbeat_timeout_s, settings.heartbeat_interval_s))
    fence.begin_cleanup()  # no message runs before the first reconcile has removed stale containers
    executor = Executor(settings, store, bus, runtime, bus.redis, after_finish=after_finish, fence=fence)
    driver, data_root = runtime.storage()
    executor.disk = DiskGuard(settings, executor.disk_budgets, lambda: runtime.writable_sizes(settings.worker_id),
                              driver, data_root)
    capacity = host_capacity(settings.worker_cpus, settings.worker_memory, settings.worker_gpus,
                             settings.worker_labels, settings.worker_concurrency, settings.worker_volumes)

    def on_lost(task: Task, reason: str) -> None:
        if lose_task(store, bus, task, reason, settings.log_retention_s, scheduler.reservations) is not None:
            scheduler.signal()

    agent = WorkerAgent(store, runtime, executor, capacity, settings.heartbeat_interval_s,
                        reconcile_interval_s=min(30.0, max(2.0, settings.heartbeat_timeout_s)), on_lost=on_lost,
                        fence=fence)

    def on_pressure(reason: str | None) -> None:
        agent.set_pressure(reason)
        if reason is None:
            scheduler.signal()  # room again: what waited for this worker may start

    executor.disk.on_pressure = on_pressure
    return WorkerProcess(settings, store, bus, executor, agent)
