"""Runs one attempt of a task on this worker: claim it (queued -> running, fenced by its execution id), start its
container, stream its output to the log bus and the archive, enforce timeout and cancel until the container is
gone, record the outcome, then archive and clean up. Every write is conditional on the attempt still being the
task's current one (docs/architecture.md, "Attempts and fencing"): a stale attempt's write is refused, logged
here, and its container stopped. Also re-attaches to a container that outlived a worker restart. Knows nothing
of Celery."""

from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from cloudai import keys
from cloudai.archive import CHUNK_LINES, Archiver, archive_stream
from cloudai.artifacts import ArtifactStore, open_artifacts
from cloudai.errors import (
    AttemptFenced,
    ImageError,
    ImageNotAllowed,
    RedisUnavailable,
    RuntimeFailure,
    StoreUnavailable,
    WorkerRefused,
)
from cloudai.fencing import Fence
from cloudai.gpus import GpuLeases, holder, parse_holder
from cloudai.imagepolicy import refusal as registry_refusal
from cloudai.limits import capabilities, image_allowed, reserved_label_prefix
from cloudai.lines import split_frames
from cloudai.logbudget import LogBudget, Replay, size_text
from cloudai.logevents import ATTEMPT_MARKER, LogLine
from cloudai.logs import LogBus, LogWriter
from cloudai.memory import release_memory
from cloudai.message import MessageError, RunMessage
from cloudai.models import LIVE, Task, TaskError, TaskStatus, utcnow
from cloudai.pidbudget import worker_pids_limit
from cloudai.reservations import Reservations
from cloudai.runoptions import Ulimit, bounds_refuse, numeric_owner
from cloudai.runtime import ENGINE_RESTARTED, ContainerSpec, DockerRuntime, ExitState, ImageMissing, oom_reason
from cloudai.settings import Settings
from cloudai.store import TaskStore
from cloudai.supervision import BATCH_WAIT, backlogged, drain, enforce_stop, quietly, start_reader, wait_exit
from cloudai.taskfiles import collect_outputs, place_upload
from cloudai.volumes import parse_mount, parse_volumes, resolve

if TYPE_CHECKING:
    from cloudai.diskguard import DiskGuard

log = logging.getLogger(__name__)

S = TaskStatus
T = TypeVar("T")
STORE_RETRY_S = 600.0  # how long a finished task's outcome waits for a store that is down
READER_QUEUE = 8  # lists of lines (one read each, <= 64 KiB of output) between the reader and the pump
CHECK_EVERY_S = 0.25  # how often cancel, timeout and the fence are checked while a container runs
RELEASE_AFTER_LINES = 100_000  # after an attempt with this many lines of output...
RELEASE_AFTER_BYTES = 64 * 1024 * 1024  # ...or this many bytes, the worker hands freed memory back


def attempt_ttl_s(settings: Settings) -> float:
    """TTL of an attempt's Redis registry entry and GPU leases; the heartbeat refreshes them."""
    return max(60.0, 10 * settings.heartbeat_timeout_s)


@dataclass(frozen=True)
class Outcome:
    status: TaskStatus
    exit_code: int | None
    reason: str | None
    oom_killed: bool = False
    error_type: str | None = None


class Executor:
    """One per worker process; thread-safe (the Celery pool runs tasks on threads)."""

    def __init__(
        self,
        settings: Settings,
        store: TaskStore,
        bus: LogBus,
        runtime: DockerRuntime,
        redis_client: redis.Redis,
        after_finish: Callable[[Task], None] | None = None,
        fence: Fence | None = None,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.store = store
        self.bus = bus
        self.runtime = runtime
        self.redis = redis_client
        self.gpus = GpuLeases(redis_client, self.worker_id, attempt_ttl_s(settings))
        self.reservations = Reservations(redis_client, settings.fairshare_halflife_s)
        self.after_finish = after_finish
        self.fence = fence
        self.volumes = parse_volumes([settings.worker_volumes])  # this host's; their paths never leave it
        self._artifacts = artifacts  # opened on first use: only tasks with outputs or an upload need it
        self._active: dict[str, Task] = {}
        self.self_fenced: dict[str, str] = {}  # task id -> execution id whose container this worker stopped
        self._revoked: set[str] = set()  # execution ids the store says are no longer current
        self._lock = threading.Lock()
        self._detach = threading.Event()
        # each task's share of the host's PIDs (cloudai.pidbudget), and the disk policy (the worker process sets
        # one; without it a task's --storage goes to Docker as is)
        self.pids_limit = worker_pids_limit(settings.pids_limit, settings.pids_reserve, settings.worker_concurrency)
        self.disk: DiskGuard | None = None

    def disk_budgets(self) -> dict[str, int]:
        """Each supervised attempt's disk budget (bytes, by execution id): its ``--storage``, else the default."""
        default = self.settings.task_disk
        budgets = {t.execution_id: t.storage_bytes or default for t in self.active_attempts() if t.execution_id}
        return {execution: budget for execution, budget in budgets.items() if budget}

    def detach_all(self) -> None:
        """The worker is shutting down: stop supervising (containers keep running, their tasks stay
        ``running``) so the process can exit now; a restart re-attaches to them. Messages not started yet are
        left alone: beat sends them again (:meth:`Maintenance.redispatch_lost_messages`)."""
        self._detach.set()

    # -- entry points -----------------------------------------------------------------------------------
    def active(self) -> set[str]:
        """Task ids this process is running or attached to right now."""
        with self._lock:
            return set(self._active)

    def active_attempts(self) -> list[Task]:
        """The attempts this process supervises (the heartbeat refreshes their registry entries and leases)."""
        with self._lock:
            return list(self._active.values())

    def revoke_stale(self) -> list[str]:
        """Ask the store which attempts this process supervises are no longer current (the worker was away and
        the task moved on); their supervision stops and removes their containers. Returns their task ids."""
        stale = [t for t in self.active_attempts()
                 if t.status == S.RUNNING and not self._is_current(t.task_id, t.execution_id)]
        with self._lock:
            self._revoked.update(t.execution_id for t in stale)
        return [t.task_id for t in stale]

    def _claim_local(self, task: Task) -> bool:
        with self._lock:
            if task.task_id in self._active:
                return False
            self._active[task.task_id] = task
            return True

    def _unclaim_local(self, task_id: str) -> None:
        with self._lock:
            self._active.pop(task_id, None)

    def run(self, wire: Any) -> str:
        """Handle one queue message (a :class:`RunMessage` on the wire). A message for an attempt that is not
        the task's current one, or for a task that is not ``queued`` on this worker, does nothing. Returns the
        final status (or what happened instead)."""
        try:
            message = RunMessage.from_wire(wire)
        except MessageError as exc:
            log.error("queue message rejected: %s", exc)
            return "rejected"
        if message.worker_id != self.worker_id or self._detach.is_set():
            return "skipped"
        if self.fence is not None and not self.fence.wait_healthy(3 * self.settings.heartbeat_timeout_s):
            # new work only once this worker is known alive and has cleaned up after a gap
            log.warning("message for task %s deferred: this worker has not heartbeaten for %.0fs",
                        message.task_id, self.fence.silent_for())
            return "deferred"
        placeholder = Task(task_id=message.task_id, user_id=message.user, docker_image=message.image,
                           execution_id=message.execution_id, gpu_ids=list(message.gpu_ids))
        if not self._claim_local(placeholder):
            return "skipped"
        try:
            return self._run(message)
        finally:
            self._unclaim_local(message.task_id)

    def attach(self, task: Task, container_id: str) -> str:
        """Resume supervising a container this worker started before it restarted. Redis or the store being
        briefly away is waited out: a blip must not kill a healthy container."""
        if not self._claim_local(task):
            return "skipped"
        try:
            archiver = Archiver(self.store, task.task_id, task.execution_id)
            writer = _retry(lambda: self._writer(task, archiver), f"re-attach of {task.task_id}", 60.0,
                            (StoreUnavailable, RedisUnavailable))
            log.info("re-attaching to task %s (container %s, %d lines already streamed)",
                     task.task_id, container_id[:12], writer.published)
            # what the worker had not archived before it restarted is still in the stream (which is trimmed only
            # up to what the archive holds): archive it from there, then go on from the stream's end
            _retry(lambda: archive_stream(self.store, self.bus, task.task_id, task.execution_id, writer.published),
                   f"re-attach of {task.task_id}", 60.0, (StoreUnavailable, RedisUnavailable))
            archiver.start()
            budget = self._budget()
            last = self.bus.last_entry(task.task_id)[1]
            budget.resume(writer.published - task.log_base, last if isinstance(last, LogLine) else None)
            return self._supervise(task, container_id, writer, archiver, None, budget)
        except (StoreUnavailable, RedisUnavailable) as exc:
            log.warning("re-attach of %s postponed (%s); the container keeps running", task.task_id, exc)
            return "detached"
        except Exception as exc:  # never leave a task stuck in running
            log.exception("re-attach of %s failed", task.task_id)
            return self._finish(task, container_id, Outcome(S.FAILED, None, f"worker error: {exc}", False,
                                                            "WorkerError"), None)
        finally:
            self._unclaim_local(task.task_id)

    # -- the run ----------------------------------------------------------------------------------------
    def _is_current(self, task_id: str, execution: str) -> bool:
        """The store (the truth) says this attempt is the task's current, running one on this worker."""
        try:
            task = _retry(lambda: self.store.get_task(task_id), f"check of {task_id}", 5.0)
        except StoreUnavailable:
            return False
        return bool(task and task.status == S.RUNNING and task.execution_id == execution
                    and task.worker_id == self.worker_id)

    def _writer(self, task: Task, archiver: Archiver) -> LogWriter:
        """The attempt's stream writer: its window in Redis is bounded by lines and bytes, never trimmed past
        what ``archiver`` wrote to the store."""
        execution = task.execution_id
        return self.bus.writer(task.task_id, execution=execution,
                               revalidate=lambda: self._is_current(task.task_id, execution),
                               window_bytes=self.settings.log_redis_bytes, trim_floor=archiver.floor)

    def _budget(self) -> LogBudget:
        return LogBudget(self.settings.log_max_bytes, stop=self.settings.log_over_budget == "stop")

    def _run(self, message: RunMessage) -> str:
        task_id, execution = message.task_id, message.execution_id
        task = _retry(lambda: self.store.get_task(task_id), f"task {task_id}")
        if task is None:
            log.warning("message for unknown task %s ignored", task_id)
            return "unknown"
        if task.execution_id != execution:
            log.warning("message for attempt %s of task %s refused: the current attempt is %s", execution,
                        task_id, task.execution_id)
            return "skipped"
        if task.status != S.QUEUED or task.worker_id != self.worker_id:
            log.info("message for task %s ignored: it is %s on %s", task_id, task.status.value, task.worker_id)
            return "skipped"
        with self._lock:
            self._active[task_id] = task
        owner = holder(task_id, execution)
        held = self.gpus.acquire(owner, task.gpu_ids, self._holder_is_live)
        if held:
            if self.store.transition(task_id, S.QUEUED, S.FAILED, execution=execution, completed_at=utcnow(),
                                     error=TaskError("GpuBusy", held)):
                quietly(self.bus.end, task_id, S.FAILED.value, None, held)
                quietly(self.reservations.release, task_id, task.attempt, self.worker_id)
            return S.FAILED.value
        if not _retry(lambda: self.store.transition(task_id, S.QUEUED, S.RUNNING, execution=execution,
                                                    worker_id=self.worker_id), f"claim of {task_id}"):
            self.gpus.release(owner, task.gpu_ids)
            return "skipped"
        task.status = S.RUNNING
        try:
            if self.bus.attempt(task_id, execution, attempt_ttl_s(self.settings)) < 0:
                log.warning("task %s: attempt %s was replaced by a newer one before it started", task_id, execution)
                self.gpus.release(owner, task.gpu_ids)
                return "stale"
        except RedisUnavailable as exc:  # the writer registers it once Redis answers (the store vouches)
            log.warning("task %s: attempt not registered yet (%s)", task_id, exc)
        container_id: str | None = None
        archiver = Archiver(self.store, task_id, execution).start()
        try:
            writer = self._writer(task, archiver)
            if task.attempt > 1:  # a retry starts a new section of the log
                archiver.add(writer.next_seq, self._marker(task), "")
                writer.add(self._marker(task))
                writer.flush()
            if writer.published != task.log_base:  # a first attempt's log is empty: nothing to record
                task.log_base = writer.published
                if not self.store.update_task(task_id, S.RUNNING, execution=execution, log_base=task.log_base):
                    raise AttemptFenced(task_id, execution, "the start")
            self._check_image_allowed(task)
            container_id = self._create(task)
            if not self.store.update_task(task_id, S.RUNNING, execution=execution, container_id=container_id):
                raise AttemptFenced(task_id, execution, "the container id")
            if task.upload is not None:
                self._place_upload(task, container_id)
            if self.redis.exists(keys.cancel_flag(task_id)):
                return self._finish(task, container_id, Outcome(S.CANCELLED, None, "cancelled before start"),
                                    archiver).value
            live = self._attach(container_id)
            self.runtime.start(container_id)
            self.store.update_task(task_id, S.RUNNING, execution=execution, started_at=utcnow())
        except AttemptFenced as exc:
            archiver.close()
            return self._stale(task, container_id, str(exc))
        except (ImageError, RuntimeFailure) as exc:
            outcome = Outcome(S.FAILED, None, str(exc), False, type(exc).__name__)
            return self._finish(task, container_id, outcome, archiver).value
        except Exception as exc:
            log.exception("task %s could not start", task_id)
            outcome = Outcome(S.FAILED, None, f"worker error: {exc}", False, "WorkerError")
            return self._finish(task, container_id, outcome, archiver).value
        return self._supervise(task, container_id, writer, archiver, live, self._budget())

    def _create(self, task: Task) -> str:
        """The container, its image pulled by the task's policy. An image that is here is not inspected first
        (``docker run`` creates and pulls only on "no such image"); ``always`` pulls before."""
        spec = self._container_spec(task)
        if task.pull_policy not in ("missing", "never"):
            self.runtime.ensure_image(task.docker_image, task.pull_policy)
            return self.runtime.create(spec)
        try:
            return self.runtime.create(spec)
        except ImageMissing:
            self.runtime.ensure_image(task.docker_image, task.pull_policy)  # pulls it, or says why it can't
            return self.runtime.create(spec)

    def _attach(self, container_id: str) -> Iterator[list[bytes]] | None:
        """The container's output stream, opened before its start (None: supervision reads Docker's log)."""
        try:
            return self.runtime.attach_chunks(container_id)
        except Exception as exc:
            log.warning("container %s: attach failed (%s); reading its output from Docker's log",
                        container_id[:12], exc)
            return None

    def _check_image_allowed(self, task: Task) -> None:
        """This worker's own allow-list wins over whatever the submitting side allowed."""
        patterns = self.settings.allowed_images
        if not image_allowed(task.docker_image, patterns):
            raise ImageNotAllowed(f"image {task.docker_image!r} is not allowed on worker {self.worker_id}; "
                                  f"allowed images (CLOUDAI_ALLOWED_IMAGES): {', '.join(patterns)}")
        why = registry_refusal(task.docker_image, self.settings.allowed_registries)
        if why is not None:
            raise ImageNotAllowed(f"image {task.docker_image!r} is not allowed on worker {self.worker_id}: {why}")

    def _marker(self, task: Task) -> str:
        return (ATTEMPT_MARKER.format(attempt=task.attempt)
                + f" on worker {self.worker_id} (execution {task.execution_id})")

    def _holder_is_live(self, lease: str) -> bool:
        """Whether the attempt holding a GPU lease may still use the GPU: it is a live task's current attempt,
        or its container still exists on this worker (a lost attempt not stopped yet)."""
        task_id, execution = parse_holder(lease)
        other = self.store.get_task(task_id)
        if other and other.status in LIVE and other.worker_id == self.worker_id and other.execution_id == execution:
            return True
        return any(c["Labels"].get(keys.LABEL_EXECUTION_ID) in (execution, None)
                   for c in self.runtime.find(worker_id=self.worker_id, task_id=task_id))

    def _labels(self, task: Task) -> dict[str, str]:
        """The task's labels less any in a namespace this worker reserves (tools on the host act on those; a
        task recorded before the master checked them, or under another list, loses them here)."""
        kept = {}
        for key, value in task.labels.items():
            if reserved_label_prefix(key, self.settings.reserved_label_prefixes) is None:
                kept[key] = value
            else:
                log.warning("task %s: label %r dropped (reserved prefix)", task.task_id, key)
        return {**kept, keys.LABEL_EXECUTION_ID: task.execution_id}

    def _storage(self, task: Task) -> int | None:
        """``storage_opt size``: the task's disk budget where the storage driver bounds a writable layer; None
        where the disk guard measures instead."""
        if self.disk is None:
            return task.resources.storage
        if not self.disk.quota_supported:
            return None
        return task.storage_bytes or self.settings.task_disk or None

    def _container_spec(self, task: Task) -> ContainerSpec:
        """The container as the task asked for it, within this worker's own bounds (raises
        :class:`WorkerRefused` / :class:`cloudai.volumes.MountRefused`: the task fails with that reason). Volume
        mounts are resolved here, on the host whose paths they are."""
        refused = bounds_refuse(task.ulimits, task.ipc, dict(self.settings.ulimits), self.settings.allow_host_ipc)
        if refused:
            raise WorkerRefused(f"worker {self.worker_id} refuses it: {refused[2]}")
        owner = numeric_owner(task.container_user)
        binds = [resolve(self.volumes, parse_mount(spec), task.user_id, owner) for spec in task.mounts]
        return ContainerSpec(
            image=task.docker_image,
            command=list(task.args) or None,
            entrypoint=None if task.entrypoint is None else [task.entrypoint],
            binds=binds,
            shm_size=task.shm_size,
            user=task.container_user,
            ipc_mode=task.ipc,
            ulimits=[Ulimit.parse(u) for u in task.ulimits],
            cpus=task.req_cpu,
            memory=task.memory_bytes,
            task_id=task.task_id,
            worker_id=self.worker_id,
            gpu_ids=list(task.gpu_ids),
            env=dict(task.env),
            workdir=task.workdir,
            labels=self._labels(task),
            storage=self._storage(task),
            pids_limit=self.pids_limit,
            network=self.settings.docker_network,
            log_max_size=self.settings.docker_log_max_size,
            log_max_file=self.settings.docker_log_max_file,
            name=f"cloudai-{task.task_id}-{task.attempt}",
            capabilities=capabilities(self.settings.cap_drop, self.settings.cap_add),
            read_only=task.read_only,
        )

    def _supervise(self, task: Task, container_id: str, writer: LogWriter, archiver: Archiver,
                   live: Iterator[list[bytes]] | None, budget: LogBudget) -> str:
        """Pump log lines until the container ends, enforcing timeout and cancel whatever fails (a broken log
        reader is restarted, a failed stop is retried, then killed); then finish. Returns the final status, or
        ``detached`` (shutdown), ``fenced`` (this worker stopped it on its own) or ``stale``. The memory a
        long log's strings held goes back to the system afterwards (:func:`release_memory`)."""
        archiver.budget_start = copy.copy(budget)
        try:
            return self._pump(task, container_id, writer, archiver, live, budget)
        finally:
            archiver.close()
            if budget.seen >= RELEASE_AFTER_LINES or budget.used + budget.dropped_bytes >= RELEASE_AFTER_BYTES:
                release_memory()

    def _pump(self, task: Task, container_id: str, writer: LogWriter, archiver: Archiver,
              live: Iterator[list[bytes]] | None, budget: LogBudget) -> str:
        lines: queue.Queue[Any] = queue.Queue(maxsize=READER_QUEUE)
        max_line = self.settings.log_max_line
        # the attach stream carries all output when it ends (not breaks) with the container; then Docker's
        # log is never read. Any other way (a re-attach, a broken stream) catches up from Docker's log at exit
        attached_whole = threading.Event() if live is not None else None
        reader = start_reader(self.runtime, task.task_id, container_id, budget.seen, lines, live, attached_whole,
                              max_line)
        started = task.started_at or utcnow()
        deadline = started.timestamp() + task.timeout_s if task.timeout_s else None
        stop_reason: Outcome | None = None
        next_check = 0.0
        retry_at = 0.0  # while Redis is unreachable: lines wait in the writer (bounded), the container runs on
        engine_trouble = False
        reader_done = False
        exited: ExitState | None = None
        while True:
            if self._detach.is_set() and stop_reason is None:
                quietly(writer.flush, 3)
                log.info("task %s: detached from container %s for shutdown", task.task_id, container_id[:12])
                return "detached"
            if self.fence is not None and self.fence.expired():
                return self._self_fence(task, container_id)
            if not backlogged(writer) and not reader_done:
                first, moved, reader_done = drain(lines, writer, budget)
                archiver.add_lines(first, moved)
            else:
                time.sleep(BATCH_WAIT)  # back-pressure: the reader blocks, Docker keeps the output
            now = time.monotonic()
            try:
                if now >= retry_at:
                    writer.flush_if_due(attempts=1)
                if archiver.fenced:
                    raise AttemptFenced(task.task_id, task.execution_id, "the log archive")
            except RedisUnavailable as exc:
                log.warning("task %s: log lines wait for Redis (%s)", task.task_id, exc)
                retry_at = now + 1.0
            except AttemptFenced as exc:
                return self._stale(task, container_id, str(exc))
            if now >= next_check:
                next_check = now + CHECK_EVERY_S
                if task.execution_id in self._revoked:
                    return self._stale(task, container_id, f"attempt {task.execution_id} is no longer current")
                if stop_reason is None:
                    stop_reason = self._should_stop(task, deadline, budget)
                    if stop_reason is not None:  # output keeps flowing while the container gets its grace
                        grace = self.settings.stop_grace_s
                        threading.Thread(target=enforce_stop, args=(self.runtime, container_id, grace),
                                         daemon=True, name=f"stop-{task.task_id}").start()
            if reader_done:
                state, exited = self.runtime.poll(container_id)
                if state == "running":  # the log stream broke, not the container: read on from where it broke
                    attached_whole = None
                    reader_done = False
                    time.sleep(0.2)
                    reader = start_reader(self.runtime, task.task_id, container_id, budget.seen, lines,
                                          max_line=max_line)
                elif state == "unknown":
                    attached_whole = None
                    engine_trouble = True
                    reader_done = False
                    time.sleep(1.0)
                    reader = start_reader(self.runtime, task.task_id, container_id, budget.seen, lines,
                                          max_line=max_line)
                else:
                    break
        del reader
        try:
            writer.flush()
        except RedisUnavailable:
            log.warning("task %s: Redis unreachable at the end; the archive keeps the whole log", task.task_id)
        except AttemptFenced as exc:
            return self._stale(task, container_id, str(exc))
        exit_code: int | None
        if exited is not None:  # the inspect that saw it stopped has its exit: no wait, no second inspect
            exit_code, oom = exited.exit_code, exited.oom_killed
        else:  # gone (someone removed it) or the engine was away: wait_exit says which
            exit_code, engine_restarted = wait_exit(self.runtime, container_id)
            engine_trouble = engine_trouble or engine_restarted
            oom = self.runtime.exit_state(container_id).oom_killed if exit_code is not None else False
        # a follow stream can miss the last lines at exit: publish and archive what Docker's complete log has
        # beyond them, streamed (memory flat in the log's length)
        try:
            if attached_whole is None or not attached_whole.is_set():
                budget = self._catch_up(task, container_id, budget, writer, archiver)
            summary = budget.summary()
            if summary is not None:  # the log's last line says what the budget did not keep
                archiver.add(writer.next_seq, summary, "")
                writer.add(summary)
                writer.flush()
        except AttemptFenced as exc:
            return self._stale(task, container_id, str(exc))
        except Exception:
            log.exception("task %s: could not read the rest of Docker's log", task.task_id)
        if exit_code is None or (engine_trouble and stop_reason is None and exit_code != 0):
            code = "" if exit_code is None else f" (exit code {exit_code})"
            outcome = Outcome(S.FAILED, exit_code, ENGINE_RESTARTED + code, False, "EngineRestarted")
        else:
            outcome = self._outcome(task, exit_code, oom, stop_reason)
        if task.outputs:
            outcome = self._collect_outputs(task, container_id, writer, archiver, outcome)
        return self._finish(task, container_id, outcome, archiver, stopped=True).value

    @property
    def artifact_store(self) -> ArtifactStore:
        if self._artifacts is None:
            self._artifacts = open_artifacts(self.settings)
        return self._artifacts

    def _place_upload(self, task: Task, container_id: str) -> None:
        place_upload(self.runtime, self.artifact_store, task, container_id, self.worker_id,
                     self.settings.upload_max_bytes)

    def _collect_outputs(self, task: Task, container_id: str, writer: LogWriter, archiver: Archiver,
                         outcome: Outcome) -> Outcome:
        """The outputs, copied out of the stopped container before it is removed, only while this attempt is
        current (they are stored under its execution id, and dropped if its outcome is refused); what was not
        stored joins the task's reason."""
        if not self._is_current(task.task_id, task.execution_id):
            return outcome
        lines, note = collect_outputs(self.runtime, container_id, task, self.artifact_store, self.settings)
        try:
            for line in lines:
                archiver.add(writer.next_seq, line, "")
                writer.add(line)
            writer.flush()
        except (AttemptFenced, RedisUnavailable) as exc:
            log.warning("task %s: the outputs' log lines were not written (%s)", task.task_id, exc)
        if not note:
            return outcome
        return dataclasses.replace(outcome, reason=f"{outcome.reason}; {note}" if outcome.reason else note,
                                   error_type=outcome.error_type or "Outputs")

    def _catch_up(self, task: Task, container_id: str, budget: LogBudget, writer: LogWriter,
                  archiver: Archiver) -> LogBudget:
        """Publish and archive what Docker's log has beyond the lines read (and fill the archive's gap, if it
        has one); returns the budget's state after all of the output."""
        gap = archiver.gap_from
        if gap is not None:
            archiver.gap_from = None
        replay = Replay(archiver.budget_start or self._budget(), task.log_base)
        caught = 0
        frames = self.runtime.stream_frames(container_id, follow=False)
        for n, seq, text, ts in replay.lines(split_frames(frames, self.settings.log_max_line)):
            if n > budget.seen:
                writer.add(text, ts)
                caught += 1
                if writer.backlog >= 500:
                    writer.flush()
            if n > budget.seen or (gap is not None and seq >= gap):
                archiver.add(seq, text, ts)
        if caught:
            log.info("task %s: %d lines caught up from Docker's log after exit", task.task_id, caught)
        writer.flush()
        return replay.budget if replay.budget.seen >= budget.seen else budget

    def _self_fence(self, task: Task, container_id: str) -> str:
        """This worker has not heartbeaten for longer than it may hold containers: the cluster may have started
        the task elsewhere. Stop the container without reporting anything; when the worker is back it hands the
        attempt to beat's rules (lost / retried) if it is still current, and removes the container."""
        log.warning("task %s: no heartbeat for %.1fs; stopping container %s (self-fencing)", task.task_id,
                    self.fence.silent_for() if self.fence else 0.0, container_id[:12])
        with self._lock:
            self.self_fenced[task.task_id] = task.execution_id
        enforce_stop(self.runtime, container_id, 0)
        return "fenced"

    def _stale(self, task: Task, container_id: str | None, why: str) -> str:
        """A write of this attempt was refused: another attempt is current (or the task ended). Stop and remove
        its container, then give its GPUs back; report nothing."""
        log.warning("task %s: %s; stopping its container", task.task_id, why)
        if container_id:
            enforce_stop(self.runtime, container_id, 0)
            quietly(self.runtime.remove, container_id)
        quietly(self.gpus.release, holder(task.task_id, task.execution_id), task.gpu_ids)
        return "stale"

    def _should_stop(self, task: Task, deadline: float | None, budget: LogBudget | None = None) -> Outcome | None:
        try:
            who = self.redis.get(keys.cancel_flag(task.task_id))
        except redis.RedisError:
            who = None  # Redis down: a cancel waits for it; the timeout below needs no Redis
        if who is not None:
            return Outcome(S.CANCELLED, None, f"cancelled by {_text(who) or 'a user'}", False, "Cancelled")
        over_disk = self.disk.over(task.execution_id) if self.disk is not None else None
        if over_disk is not None:
            return Outcome(S.FAILED, None, over_disk, False, "DiskLimit")
        if budget is not None and budget.exceeded and budget.stop:
            return Outcome(S.FAILED, None, f"stopped: its log passed the log budget of {size_text(budget.max_bytes)} "
                           "(CLOUDAI_LOG_MAX_BYTES)", False, "LogBudget")
        if deadline is not None and time.time() >= deadline:
            return Outcome(S.TIMEOUT, None, f"timed out after {task.timeout_s:g}s and was stopped", False, "Timeout")
        return None

    @staticmethod
    def _outcome(task: Task, exit_code: int, oom: bool, stopped: Outcome | None) -> Outcome:
        if stopped is not None:
            return Outcome(stopped.status, exit_code, stopped.reason, oom, stopped.error_type)
        if oom:
            return Outcome(S.FAILED, exit_code, oom_reason(task.memory_bytes), True, "OutOfMemory")
        if exit_code == 0:
            return Outcome(S.COMPLETED, 0, None)
        return Outcome(S.FAILED, exit_code, f"exited with code {exit_code}", False, "NonZeroExit")

    def _finish(self, task: Task, container_id: str | None, outcome: Outcome,
                archiver: Archiver | None, stopped: bool = False) -> TaskStatus:
        """Record the outcome first (compare-and-set from running, for this attempt only), then close the log,
        archive and clean up. The store is retried for a while if it is down; if the outcome still can't be
        recorded the container stays (with its exit code and log) for the next reconcile to finish.

        ``stopped``: the container is known to have ended (Docker said so). Then its GPUs, its reservation and
        the next placement don't wait for its removal, which comes last (an ended container holds no CPU,
        memory or GPU; the user waited only for the exit, as with ``docker run``'s exit code); a container
        that may still run is removed before anything it holds is handed on."""
        task_id, execution = task.task_id, task.execution_id
        error = TaskError(outcome.error_type or outcome.status.value, outcome.reason) if outcome.reason else None
        try:
            won = _retry(lambda: self.store.transition(
                task_id, S.RUNNING, outcome.status, execution=execution, exit_code=outcome.exit_code,
                oom_killed=outcome.oom_killed, completed_at=utcnow(), error=error,
            ), f"outcome of {task_id}")
        except StoreUnavailable:
            if archiver is not None:
                archiver.close()
            log.error("task %s: outcome %s could not be recorded; container %s kept for the next reconcile",
                      task_id, outcome.status.value, (container_id or "-")[:12])
            return S.RUNNING
        if not won:
            if archiver is not None:
                archiver.close()
            current = _retry(lambda: self.store.get_task(task_id), f"task {task_id}")
            log.warning("task %s: outcome %s of attempt %s refused: the task is %s (attempt %s)", task_id,
                        outcome.status.value, execution, current.status.value if current else "gone",
                        current.execution_id if current else "-")
            self._stale(task, container_id, "its outcome was refused")
            if task.outputs:  # stored under this attempt, which is not the task's: never listed, so removed now
                quietly(self.artifact_store.delete, task_id, execution, "output")
            return current.status if current else outcome.status
        released = False
        try:
            try:
                self.bus.end(task_id, outcome.status.value, outcome.exit_code, outcome.reason, execution,
                             lambda: True)  # the store just recorded this attempt's outcome: it is current
            except (AttemptFenced, RedisUnavailable) as exc:
                log.warning("task %s: end marker not written (%s)", task_id, exc)
            if archiver is not None:
                self._archive(task, container_id, archiver)
            if stopped:
                released = True
                self._release(task)
            quietly(self.bus.expire, task_id, self.settings.log_retention_s)
            return outcome.status
        finally:
            if container_id:
                quietly(self.runtime.remove, container_id)
            if not released:
                self._release(task)

    def _release(self, task: Task) -> None:
        """Hand on what an ended attempt held: its GPU leases, its cancel flag, its reservation; then place
        what waits for it."""
        quietly(self.gpus.release, holder(task.task_id, task.execution_id), task.gpu_ids)
        quietly(self.redis.delete, keys.cancel_flag(task.task_id))
        # this attempt's reservation only (a newer attempt keeps its own), after its GPU lease is gone: the
        # placement hook (Reservations.fenced_gpu_ids) holds back GPU ids that are still leased
        quietly(self.reservations.release, task.task_id, task.attempt, self.worker_id)
        if self.after_finish is not None:
            quietly(self.after_finish, task)

    def _archive(self, task: Task, container_id: str | None, archiver: Archiver) -> None:
        """The rest of the archive (a gap the store's outage left is filled from Docker's log, in chunks, then
        from the stream)."""
        archiver.close()
        try:
            if archiver.gap_from is not None and container_id:
                gap = archiver.gap_from
                archiver.gap_from = None
                frames = self.runtime.stream_frames(container_id, follow=False)
                replay = Replay(archiver.budget_start or self._budget(), task.log_base)
                for n, seq, text, ts in replay.lines(split_frames(frames, self.settings.log_max_line)):
                    if seq >= gap:
                        archiver.add(seq, text, ts)
                        if n % CHUNK_LINES == 0:
                            _retry(archiver.flush, f"archive of {task.task_id}")
            _retry(archiver.flush, f"archive of {task.task_id}")
            if archiver.gapped:  # lines of CloudAI's own after the gap (the budget's summary) are in the stream
                _retry(lambda: archive_stream(self.store, self.bus, task.task_id, task.execution_id),
                       f"archive of {task.task_id}")
        except AttemptFenced as exc:
            log.warning("task %s: %s", task.task_id, exc)
        except Exception:
            log.exception("task %s: the log could not be archived", task.task_id)


def _retry(fn: Callable[[], T], what: str, for_s: float | None = None,
           errors: tuple[type[Exception], ...] = (StoreUnavailable,)) -> T:
    """Call ``fn``, retrying while the store (or what ``errors`` names) is unreachable, for up to ``for_s``
    (default :data:`STORE_RETRY_S`)."""
    deadline = time.monotonic() + (STORE_RETRY_S if for_s is None else for_s)
    delay = 0.5
    while True:
        try:
            return fn()
        except errors as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s waits: %s", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

