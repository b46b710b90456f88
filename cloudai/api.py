"""What the CLI (and later a REST API) calls: submit, get, list, cancel, follow logs, workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import redis

from cloudai import keys
from cloudai.clock import redis_now, with_redis_heartbeats
from cloudai.errors import (
    CloudAIError,
    RedisUnavailable,
    TaskNotFound,
    ValidationError,
    WorkerNotFound,
)
from cloudai.logs import LogBus, LogEnd, LogEvent, LogLine, attempt_section, follow_batches
from cloudai.models import (
    LIVE,
    GiB,
    Resources,
    Task,
    TaskError,
    TaskStatus,
    WorkerInfo,
    WorkerState,
    new_task_id,
    utcnow,
)
from cloudai.runtime import PULL_POLICIES
from cloudai.scheduler import Dispatch, Scheduler, free_capacity
from cloudai.settings import Settings
from cloudai.store import TaskStore, open_store

S = TaskStatus
_ENV_KEY_FORMS = "use KEY=VALUE with KEY made of letters, digits and _ (not starting with a digit)"


@dataclass
class SubmitRequest:
    """A task as a user asks for it (already parsed from strings)."""

    image: str
    command: str | None = None
    resources: Resources = field(default_factory=Resources)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    retries: int = 0
    name: str | None = None
    user: str | None = None
    worker: str | None = None
    constraints: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    pull_policy: str = "missing"

    def validate(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ValidationError("image", self.image, "name an image such as busybox or ghcr.io/org/app:1.2")
        if self.retries < 0 or self.retries > 100:
            raise ValidationError("retries", self.retries, "use a whole number from 0 to 100")
        if self.pull_policy not in PULL_POLICIES:
            raise ValidationError("pull policy", self.pull_policy, f"use one of {', '.join(PULL_POLICIES)}")
        for key in self.env:
            if not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
                raise ValidationError("env", key, _ENV_KEY_FORMS)
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ValidationError("workdir", self.workdir, "use an absolute path inside the container, such as /work")


def parse_key_values(items: list[str] | tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs (``--env``, ``--label``, ``--constraint``) into a dict; the last one wins."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValidationError(what, item, "use KEY=VALUE")
        out[key.strip()] = value
    return out


def read_env_file(path: str) -> dict[str, str]:
    """A ``docker run --env-file`` file: ``KEY=VALUE`` lines, ``#`` comments and blank lines ignored."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except OSError as exc:
        raise ValidationError("env-file", path, f"could not be read ({exc.strerror})") from None
    return parse_key_values([ln for ln in lines if ln and not ln.startswith("#")], "env-file line")


@dataclass
class WorkerView:
    """A worker with what its live tasks reserve, for ``cloudai workers``."""

    info: WorkerInfo
    alive: bool
    heartbeat_age_s: float
    used_cpus: float
    used_memory: int
    used_gpu_ids: list[str]
    tasks: int


class CloudAI:
    """The operations of the CLI, on one cluster. Connections open lazily, on first use."""

    def __init__(self, settings: Settings, dispatch: Dispatch | None = None) -> None:
        self.settings = settings
        self._dispatch = dispatch

    @cached_property
    def store(self) -> TaskStore:
        return open_store(self.settings.store_url)

    @cached_property
    def redis(self) -> redis.Redis:
        return self.bus.redis

    @cached_property
    def bus(self) -> LogBus:
        return LogBus.from_url(self.settings.redis_url, self.settings.log_stream_maxlen)

    @cached_property
    def scheduler(self) -> Scheduler:
        dispatch = self._dispatch
        if dispatch is None:
            from cloudai.celery_app import Dispatcher

            dispatch = Dispatcher(self.settings.redis_url)
        return Scheduler(self.settings, self.store, self.redis, dispatch)

    def ping_redis(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(self.settings.redis_url, exc) from exc

    # -- tasks ------------------------------------------------------------------------------------------
    def build_task(self, request: SubmitRequest) -> Task:
        request.validate()
        res = request.resources
        return Task(
            task_id=new_task_id(),
            user_id=request.user or self.settings.user,
            docker_image=request.image,
            command=request.command,
            req_cpu=res.cpus,
            req_memory=res.memory / GiB,
            req_storage=None if res.storage is None else res.storage / GiB,
            req_gpu=res.gpus,
            timeout_s=request.timeout_s,
            retries=request.retries,
            env=dict(request.env),
            labels=dict(request.labels),
            workdir=request.workdir,
            name=request.name,
            pinned_worker=request.worker,
            constraints=dict(request.constraints),
            priority=request.priority,
            pull_policy=request.pull_policy,
        )

    def submit(self, request: SubmitRequest) -> Task:
        """Validate, record and place a task (queued on a worker, or pending with a reason)."""
        task = self.build_task(request)
        self.store.ping()
        self.ping_redis()
        return self.scheduler.submit(task)

    def dry_run(self, request: SubmitRequest) -> str:
        """Where the task would go now, without recording anything."""
        return self.scheduler.preview(self.build_task(request))

    def get(self, task_id: str) -> Task:
        task = self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def list_tasks(self, user: str | None = None, status: list[TaskStatus] | None = None, worker: str | None = None,
             limit: int = 50) -> list[Task]:
        return self.store.list_tasks(user_id=user, status=status or None, worker_id=worker, limit=limit)

    def cancel(self, task_id: str, by: str | None = None, wait_s: float | None = None) -> Task:
        """Cancel a task. Pending/queued: cancelled at once (its queue message then does nothing). Running: the
        worker holding it stops the container (SIGTERM, grace period, SIGKILL) and records ``cancelled``;
        this waits up to ``wait_s`` (default: the grace period plus 15 s) for that."""
        who = by or self.settings.user
        task = self.get(task_id)
        if task.status in (S.PENDING, S.QUEUED):
            if self.store.transition(task_id, [S.PENDING, S.QUEUED], S.CANCELLED, completed_at=utcnow(),
                                     error=TaskError("Cancelled", f"cancelled by {who}")):
                self.bus.end(task_id, S.CANCELLED.value, None, f"cancelled by {who}")
                self.bus.expire(task_id, self.settings.log_retention_s)
                if task.status == S.QUEUED:
                    self.scheduler.place_pending()  # its reservation is free now
                return self.get(task_id)
            task = self.get(task_id)
        if task.status != S.RUNNING:
            return task
        self.redis.set(keys.cancel_flag(task_id), who, ex=7 * 86400)
        worker = self.store.get_worker(task.worker_id or "")
        if worker is not None:
            with_redis_heartbeats(self.redis, [worker])
        if worker is None or not worker.alive(redis_now(self.redis), self.settings.heartbeat_timeout_s):
            # nobody will act on the flag; the container is removed when its worker returns (no attempt is
            # current any more: execution_id "" fences out whatever that worker still writes)
            if self.store.transition(task_id, S.RUNNING, S.CANCELLED, execution=task.execution_id, execution_id="",
                                     completed_at=utcnow(),
                                     error=TaskError("Cancelled", f"cancelled by {who} (worker not responding)")):
                self.bus.end(task_id, S.CANCELLED.value, None, f"cancelled by {who}")
            return self.get(task_id)
        deadline = time.monotonic() + (wait_s if wait_s is not None else self.settings.stop_grace_s + 15)
        while time.monotonic() < deadline:
            task = self.get(task_id)
            if task.status.terminal:
                return task
            time.sleep(0.2)
        return self.get(task_id)

    # -- logs -------------------------------------------------------------------------------------------
    def follow(self, task_id: str, after_seq: int = 0, follow: bool = True,
               on_reconnect: Callable[[Exception], None] | None = None,
               reconnect_for_s: float = 60.0) -> Iterator[LogEvent]:
        """The task's log from line ``after_seq + 1``, event by event (see :meth:`follow_batches`)."""
        for batch in self.follow_batches(task_id, after_seq, follow, on_reconnect, reconnect_for_s):
            yield from batch

    def follow_batches(self, task_id: str, after_seq: int = 0, follow: bool = True,
                       on_reconnect: Callable[[Exception], None] | None = None,
                       reconnect_for_s: float = 60.0) -> Iterator[list[LogEvent]]:
        """The task's log from line ``after_seq + 1`` in batches (see :func:`cloudai.logs.follow_batches`)."""
        self.get(task_id)  # an unknown task is an error before anything is read
        return follow_batches(self.bus, task_id, lambda: self.end_of(task_id), lambda: self.store.read_log(task_id),
                              after_seq, follow, on_reconnect, reconnect_for_s)

    def end_of(self, task_id: str) -> LogEnd | None:
        """The end marker a finished task's log would close with; None while it is not finished."""
        task = self.get(task_id)
        return _end_of(task) if task.status.terminal else None

    def logs(self, task_id: str) -> Iterator[LogEvent]:
        """The log so far (no waiting): from the live stream, or the archive once the stream expired."""
        return self.follow(task_id, follow=False)

    def attempt_log(self, task_id: str, attempt: int) -> list[LogLine]:
        """The lines of one attempt of the task (1 = the first), from its marker to the next attempt's."""
        task = self.get(task_id)
        if not 1 <= attempt <= task.attempt:
            raise ValidationError("attempt", attempt, f"task {task_id} has attempts 1 to {task.attempt}")
        return attempt_section(self.logs(task_id), attempt)

    # -- workers ----------------------------------------------------------------------------------------
    def workers(self) -> list[WorkerView]:
        now = utcnow()
        workers = self.store.list_workers()
        live = self.store.list_tasks(status=LIVE, limit=None)
        free = free_capacity(workers, live)
        views = []
        for w in workers:
            slot = free[w.worker_id]
            views.append(WorkerView(
                info=w,
                alive=w.alive(now, self.settings.heartbeat_timeout_s),
                heartbeat_age_s=(now - w.last_heartbeat).total_seconds(),
                used_cpus=w.cpus - slot.cpus,
                used_memory=w.memory - slot.memory,
                used_gpu_ids=[g for g in w.gpu_ids if g not in slot.gpu_ids],
                tasks=sum(1 for t in live if t.worker_id == w.worker_id),
            ))
        return views

    def set_worker_state(self, worker_id: str, state: WorkerState) -> WorkerInfo:
        if not self.store.set_worker_state(worker_id, state):
            raise WorkerNotFound(worker_id)
        if state == WorkerState.ACTIVE:
            self.scheduler.place_pending()
        info = self.store.get_worker(worker_id)
        assert info is not None
        return info

    def remove_worker(self, worker_id: str, force: bool = False) -> None:
        """Forget a worker. One with live tasks is refused unless ``force`` (the reaper then loses them)."""
        if self.store.get_worker(worker_id) is None:
            raise WorkerNotFound(worker_id)
        live = self.store.list_tasks(status=LIVE, worker_id=worker_id, limit=None)
        if live and not force:
            raise CloudAIError(
                f"worker {worker_id} still holds {len(live)} live task(s); drain it and wait, or use --force"
            )
        self.store.delete_worker(worker_id)


def _end_of(task: Task) -> LogEnd:
    return LogEnd(task.status.value, task.exit_code, task.error.message if task.error else None)
