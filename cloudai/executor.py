"""Runs one task on this worker: claim it (queued -> running), start its container, stream its output to the
log bus, enforce timeout and cancel, record the outcome, archive the log, clean up. Also re-attaches to a
container that outlived a worker restart. Knows nothing of Celery."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from cloudai import keys
from cloudai.errors import ImageError, ImageNotAllowed, RedisUnavailable, RuntimeFailure, StoreUnavailable
from cloudai.gpus import GpuLeases
from cloudai.limits import capabilities, image_allowed
from cloudai.logs import LogBus, LogWriter, archive_line, split_frames
from cloudai.models import LIVE, Task, TaskError, TaskStatus, utcnow
from cloudai.reservations import Reservations
from cloudai.runtime import ContainerSpec, DockerRuntime, oom_reason
from cloudai.settings import Settings
from cloudai.store import TaskStore

log = logging.getLogger(__name__)

S = TaskStatus
T = TypeVar("T")
_DONE = object()
STORE_RETRY_S = 600.0  # how long a finished task's outcome waits for a store that is down
CHECK_EVERY_S = 0.25  # how often cancel and timeout are checked while a container runs


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
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.store = store
        self.bus = bus
        self.runtime = runtime
        self.redis = redis_client
        self.gpus = GpuLeases(redis_client, self.worker_id)
        self.reservations = Reservations(redis_client, settings.fairshare_halflife_s)
        self.after_finish = after_finish
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._detach = threading.Event()

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

    def _claim_local(self, task_id: str) -> bool:
        with self._lock:
            if task_id in self._active:
                return False
            self._active.add(task_id)
            return True

    def _unclaim_local(self, task_id: str) -> None:
        with self._lock:
            self._active.discard(task_id)

    def run(self, message: dict[str, Any]) -> str:
        """Handle one queue message. A message for a task that is not ``queued`` on this worker (a duplicate
        delivery, a cancelled task, a task placed elsewhere since) does nothing. Returns the final status."""
        task_id = str(message["task_id"])
        if self._detach.is_set() or not self._claim_local(task_id):
            return "skipped"
        try:
            return self._run(task_id)
        finally:
            self._unclaim_local(task_id)

    def attach(self, task: Task, container_id: str) -> str:
        """Resume supervising a container this worker started before it restarted."""
        if not self._claim_local(task.task_id):
            return "skipped"
        try:
            writer = self.bus.writer(task.task_id)
            log.info("re-attaching to task %s (container %s, %d lines already streamed)",
                     task.task_id, container_id[:12], writer.published)
            return self._supervise(task, container_id, writer)
        except Exception as exc:  # never leave a task stuck in running
            log.exception("re-attach of %s failed", task.task_id)
            return self._finish(task, container_id, Outcome(S.FAILED, None, f"worker error: {exc}", False,
                                                            "WorkerError")).value
        finally:
            self._unclaim_local(task.task_id)

    # -- the run ----------------------------------------------------------------------------------------
    def _run(self, task_id: str) -> str:
        task = _retry(lambda: self.store.get_task(task_id), f"task {task_id}")
        if task is None:
            log.warning("message for unknown task %s ignored", task_id)
            return "unknown"
        if task.status != S.QUEUED or task.worker_id != self.worker_id:
            log.info("message for task %s ignored: it is %s on %s", task_id, task.status.value, task.worker_id)
            return "skipped"
        held = self.gpus.acquire(task_id, task.gpu_ids, self._holder_is_live)
        if held:
            if self.store.transition(task_id, S.QUEUED, S.FAILED, completed_at=utcnow(),
                                     error=TaskError("GpuBusy", held)):
                self.bus.end(task_id, S.FAILED.value, None, held)
                _quietly(self.reservations.release, task_id, task.attempt, self.worker_id)
            return S.FAILED.value
        if not _retry(lambda: self.store.transition(task_id, S.QUEUED, S.RUNNING, worker_id=self.worker_id),
                      f"claim of {task_id}"):
            self.gpus.release(task_id, task.gpu_ids)
            return "skipped"
        task.status = S.RUNNING
        container_id: str | None = None
        try:
            writer = self.bus.writer(task_id)
            task.log_base = writer.published  # lines of earlier attempts, if this is a retry
            self.store.update_task(task_id, S.RUNNING, log_base=task.log_base)
            self._check_image_allowed(task)
            self.runtime.ensure_image(task.docker_image, task.pull_policy)
            container_id = self.runtime.create(self._container_spec(task))
            self.store.update_task(task_id, S.RUNNING, container_id=container_id)
            if self.redis.exists(keys.cancel_flag(task_id)):
                return self._finish(task, container_id, Outcome(S.CANCELLED, None, "cancelled before start")).value
            self.runtime.start(container_id)
            self.store.update_task(task_id, S.RUNNING, started_at=utcnow())
        except (ImageError, RuntimeFailure) as exc:
            outcome = Outcome(S.FAILED, None, str(exc), False, type(exc).__name__)
            return self._finish(task, container_id, outcome).value
        except Exception as exc:
            log.exception("task %s could not start", task_id)
            outcome = Outcome(S.FAILED, None, f"worker error: {exc}", False, "WorkerError")
            return self._finish(task, container_id, outcome).value
        try:
            return self._supervise(task, container_id, writer)
        except Exception as exc:
            log.exception("supervising task %s failed", task_id)
            outcome = Outcome(S.FAILED, None, f"worker error: {exc}", False, "WorkerError")
            return self._finish(task, container_id, outcome).value

    def _check_image_allowed(self, task: Task) -> None:
        """This worker's own allow-list wins over whatever the submitting side allowed."""
        patterns = self.settings.allowed_images
        if not image_allowed(task.docker_image, patterns):
            raise ImageNotAllowed(f"image {task.docker_image!r} is not allowed on worker {self.worker_id}; "
                                  f"allowed images (CLOUDAI_ALLOWED_IMAGES): {', '.join(patterns)}")

    def _holder_is_live(self, holder: str) -> bool:
        other = self.store.get_task(holder)
        return bool(other and other.status in LIVE and other.worker_id == self.worker_id)

    def _container_spec(self, task: Task) -> ContainerSpec:
        return ContainerSpec(
            image=task.docker_image,
            command=task.command,
            cpus=task.req_cpu,
            memory=task.memory_bytes,
            task_id=task.task_id,
            worker_id=self.worker_id,
            gpu_ids=list(task.gpu_ids),
            env=dict(task.env),
            workdir=task.workdir,
            labels=dict(task.labels),
            storage=task.resources.storage,
            pids_limit=self.settings.pids_limit,
            network=self.settings.docker_network,
            name=f"cloudai-{task.task_id}-{task.attempt}",
            capabilities=capabilities(self.settings.cap_drop, self.settings.cap_add),
            read_only=task.read_only,
        )

    def _supervise(self, task: Task, container_id: str, writer: LogWriter) -> str:
        """Pump log lines until the container ends, enforcing timeout and cancel; then finish. Returns the
        final status, or ``detached`` when the worker shuts down first."""
        lines: queue.Queue[Any] = queue.Queue(maxsize=20000)
        reader = threading.Thread(
            target=self._read_lines, args=(container_id, writer.published - task.log_base, lines), daemon=True,
            name=f"logs-{task.task_id}",
        )
        reader.start()
        started = task.started_at or utcnow()
        deadline = started.timestamp() + task.timeout_s if task.timeout_s else None
        stop_reason: Outcome | None = None
        next_check = 0.0
        retry_at = 0.0  # while Redis is unreachable: lines wait in the writer (bounded), the container runs on
        done = False
        while not done:
            if self._detach.is_set() and stop_reason is None:
                with contextlib.suppress(RedisUnavailable):
                    writer.flush(attempts=3)
                log.info("task %s: detached from container %s for shutdown", task.task_id, container_id[:12])
                return "detached"
            if writer.backlog < MAX_BACKLOG:
                done = _drain(lines, writer)
            else:
                time.sleep(BATCH_WAIT)  # back-pressure: the reader blocks, Docker keeps the output
            now = time.monotonic()
            if now >= retry_at:
                try:
                    writer.flush_if_due(attempts=1)
                except RedisUnavailable as exc:
                    log.warning("task %s: log lines wait for Redis (%s)", task.task_id, exc)
                    retry_at = now + 1.0
            if stop_reason is None and now >= next_check:
                next_check = now + CHECK_EVERY_S
                stop_reason = self._should_stop(task, deadline)
                if stop_reason is not None:
                    # stop in the background: output keeps flowing while the container gets its grace period
                    threading.Thread(target=self.runtime.stop, args=(container_id, self.settings.stop_grace_s),
                                     daemon=True).start()
        try:
            writer.flush()
        except RedisUnavailable:
            log.warning("task %s: Redis unreachable at the end; the archive keeps the whole log", task.task_id)
        exit_code = self.runtime.wait(container_id)
        state = self.runtime.exit_state(container_id)
        # Docker's complete log, read once the container has exited: a follow stream can miss the last lines
        # at exit, so publish what it missed, then archive the same lines
        complete = list(split_frames(self.runtime.stream_frames(container_id, follow=False)))
        missed = complete[writer.published - task.log_base:]
        if missed:
            log.info("task %s: %d lines caught up from Docker's log after exit", task.task_id, len(missed))
            for text, ts in missed:
                writer.add(text, ts)
            writer.flush()
        outcome = self._outcome(task, exit_code, state.oom_killed, stop_reason)
        return self._finish(task, container_id, outcome, complete).value

    def _read_lines(self, container_id: str, skip: int, out: queue.Queue[Any]) -> None:
        """Docker's log of the container, split into lines, from line ``skip + 1``. A broken stream is reopened
        (skipping what was read) while the container runs."""
        consumed = skip
        try:
            while True:
                for n, (text, ts) in enumerate(split_frames(self.runtime.stream_frames(container_id)), 1):
                    if n > consumed:
                        consumed = n
                        out.put((text, ts))
                if not self.runtime.is_running(container_id):
                    break
                time.sleep(0.2)
        except Exception:
            log.exception("log stream of %s broke", container_id[:12])
        finally:
            out.put(_DONE)

    def _should_stop(self, task: Task, deadline: float | None) -> Outcome | None:
        try:
            who = self.redis.get(keys.cancel_flag(task.task_id))
        except redis.RedisError:
            who = None  # Redis down: a cancel waits for it; the timeout below needs no Redis
        if who is not None:
            return Outcome(S.CANCELLED, None, f"cancelled by {_text(who) or 'a user'}", False, "Cancelled")
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
                lines: list[tuple[str, str]] | None = None) -> TaskStatus:
        """Archive the log, record the outcome (compare-and-set from running), close the log, clean up.
        The store is retried for a while if it is briefly down: the outcome must not be lost."""
        task_id = task.task_id
        status = outcome.status
        try:
            if container_id:
                _retry(lambda: self._archive(task, container_id, lines), f"archive of {task_id}")
            error = TaskError(outcome.error_type or outcome.status.value, outcome.reason) if outcome.reason else None
            won = _retry(lambda: self.store.transition(
                task_id, S.RUNNING, outcome.status, exit_code=outcome.exit_code, oom_killed=outcome.oom_killed,
                completed_at=utcnow(), error=error,
            ), f"outcome of {task_id}")
            final = self.store.get_task(task_id) if not won else None
            status = outcome.status if won or final is None else final.status
            reason = outcome.reason if won or final is None or final.error is None else final.error.message
            exit_code = outcome.exit_code if won or final is None else final.exit_code
            _quietly(self.bus.end, task_id, status.value, exit_code, reason)
            _quietly(self.bus.expire, task_id, self.settings.log_retention_s)
            return status
        finally:
            if container_id:
                _quietly(self.runtime.remove, container_id)
            _quietly(self.gpus.release, task_id, task.gpu_ids)
            _quietly(self.redis.delete, keys.cancel_flag(task_id))
            # this attempt's reservation only: a newer attempt of the same task keeps its own
            _quietly(self.reservations.release, task_id, task.attempt, self.worker_id)
            if self.after_finish is not None:
                _quietly(self.after_finish, task)

    def _archive(self, task: Task, container_id: str, lines: list[tuple[str, str]] | None) -> None:
        """Docker's own log of the container is the source of truth for the archive (after the lines of
        earlier attempts, which only the stream still has). Raises StoreUnavailable for a retry."""
        earlier: list[str] = []
        if task.log_base:
            try:
                earlier = [archive_line(ln.text, ln.ts) for ln in self.bus.history(task.task_id, task.log_base)]
            except RedisUnavailable:
                log.warning("task %s: earlier attempts' lines are not archived (Redis unreachable)", task.task_id)
        if lines is None:
            try:
                lines = list(split_frames(self.runtime.stream_frames(container_id, follow=False)))
            except Exception:
                log.exception("could not read the log of container %s", container_id[:12])
                lines = []
        self.store.save_log(task.task_id, earlier + [archive_line(t, ts) for t, ts in lines])


def _retry(fn: Callable[[], T], what: str, for_s: float = STORE_RETRY_S) -> T:
    """Call ``fn``, retrying while the store is unreachable (for up to ``for_s``)."""
    deadline = time.monotonic() + for_s
    delay = 0.5
    while True:
        try:
            return fn()
        except StoreUnavailable as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s waits for the store: %s", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Clean-up that must not stop the rest of the clean-up."""
    try:
        fn(*args)
    except Exception:
        log.exception("%s failed", getattr(fn, "__name__", fn))


BATCH_WAIT = 0.05
MAX_BACKLOG = 50_000  # lines held while Redis is unreachable before the reader is made to wait


def _drain(lines: queue.Queue[Any], writer: LogWriter) -> bool:
    """Move what the reader has into the writer, waiting at most one batch interval for the first line.
    Returns True once the reader is done."""
    try:
        item = lines.get(timeout=BATCH_WAIT)
    except queue.Empty:
        return False
    while item is not _DONE:
        writer.add(*item)
        if writer.backlog >= MAX_BACKLOG:
            return False
        try:
            item = lines.get_nowait()
        except queue.Empty:
            return False
    return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
