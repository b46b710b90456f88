"""What the CLI (and later a REST API) calls: submit, get, list, cancel, follow logs, workers."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, BinaryIO

import redis

from cloudai import keys, limits
from cloudai.artifacts import (
    INPUT_EXECUTION,
    UPLOAD_NAME,
    Artifact,
    ArtifactKey,
    ArtifactStore,
    open_artifacts,
    output_path,
)
from cloudai.artifacts.base import read_chunks
from cloudai.clock import redis_now, with_redis_heartbeats
from cloudai.errors import (
    ArtifactNotFound,
    CloudAIError,
    RedisUnavailable,
    TaskNotFound,
    ValidationError,
    WorkerNotFound,
)
from cloudai.logevents import LogEnd, LogEvent
from cloudai.models import (
    LIVE,
    Quota,
    Task,
    TaskError,
    TaskStatus,
    WorkerInfo,
    WorkerState,
    format_bytes,
    new_task_id,
    show_command,
    utcnow,
)
from cloudai.placer import Placer
from cloudai.redisconn import connect
from cloudai.runoptions import bounds_refuse
from cloudai.scheduler import Dispatch, Scheduler
from cloudai.settings import Settings
from cloudai.store import TaskStore, open_store
from cloudai.submission import SubmitRequest, parse_key_values, read_env_file
from cloudai.uploads import DEFAULT_TARGET, inspect_upload
from cloudai.workerview import WorkerView

if TYPE_CHECKING:
    from cloudai.logs import LogBus

log = logging.getLogger(__name__)

# SubmitRequest, parse_key_values, read_env_file and WorkerView live in light modules (the CLI imports them
# without Redis in API mode); they stay importable from here
__all__ = ["CloudAI", "SubmitRequest", "WorkerView", "parse_key_values", "read_env_file"]
S = TaskStatus


class CloudAI:
    """The operations of the CLI, on one cluster. Connections open lazily, on first use."""

    def __init__(self, settings: Settings, dispatch: Dispatch | None = None) -> None:
        """``dispatch`` sends a placed task's message to its worker (:func:`cloudai.celery_app.dispatcher`):
        the long-lived processes that place tasks (master, beat, worker agents) pass one. Without it this is
        the operator's read-only view of the cluster (direct mode): it never places, dispatches or changes
        a task (:class:`cloudai.errors.NotAPlacer`)."""
        self.settings = settings
        self._dispatch = dispatch
        self._redis_ok_at = float("-inf")
        self._placer: Placer | None = None

    @cached_property
    def store(self) -> TaskStore:
        return open_store(self.settings.store_url)

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(self.settings.redis_url)

    @cached_property
    def bus(self) -> LogBus:
        # the log modules load when a log is first read or closed: a submit's critical path doesn't need them
        from cloudai.logs import LogBus

        return LogBus(self.redis, self.settings.log_stream_maxlen, self.settings.redis_url)

    @cached_property
    def scheduler(self) -> Scheduler:
        return Scheduler(self.settings, self.store, self.redis, self._dispatch)

    # -- placement passes -------------------------------------------------------------------------------
    def start_placer(self) -> None:
        """Run placement passes on a background thread from now on (the master): a request that frees capacity
        only signals (:meth:`request_pass`); the pass never runs on a user's request. Without a dispatcher this
        process doesn't place, and nothing starts."""
        if self._dispatch is not None and self._placer is None:
            try:
                self.scheduler.publish_quota_defaults()  # the cluster's, for beat's and the workers' passes too
            except redis.RedisError as exc:  # published again by each pass once Redis answers
                log.warning("default quotas not published yet: %s", exc)
            self._placer = Placer(self.scheduler.place_pending).start()

    def stop_placer(self) -> None:
        if self._placer is not None:
            self._placer.stop()
            self._placer = None

    def request_pass(self) -> None:
        """Waiting tasks may fit now: a pass on the placer thread when one runs (the master), else here (a
        library caller; beat's tick where this process doesn't place)."""
        if self._placer is not None:
            self._placer.request()
        else:
            self.scheduler.place_pending()

    #: a submit checks Redis first (a clear error before anything is recorded) unless it answered this recently:
    #: on a busy master the check was a twentieth of a submit; placement's own errors still say what failed
    REDIS_CHECK_S = 1.0

    def ping_redis(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(self.settings.redis_url, exc) from exc
        self._redis_ok_at = time.monotonic()

    # -- tasks ------------------------------------------------------------------------------------------
    def build_task(self, request: SubmitRequest) -> Task:
        request.validate()
        user = limits.user_id(request.user or self.settings.user)
        patterns = self.settings.allowed_images
        if not limits.image_allowed(request.image, patterns):
            raise ValidationError("image", request.image, "is not allowed on this cluster; allowed images "
                                  f"(CLOUDAI_ALLOWED_IMAGES): {', '.join(patterns)}")
        refused = bounds_refuse(request.ulimits, request.ipc, dict(self.settings.ulimits),
                                self.settings.allow_host_ipc)
        if refused:
            raise ValidationError(*refused)
        self.check_shared_limits(request)
        res = request.resources
        args = request.run_args()
        return Task(
            task_id=new_task_id(),
            user_id=user,
            docker_image=request.image,
            command=show_command(args, request.entrypoint),
            args=args,
            entrypoint=request.entrypoint,
            mounts=list(request.mounts),
            shm_size=request.shm_size,
            container_user=request.container_user,
            ipc=request.ipc,
            ulimits=list(request.ulimits),
            gpu_devices=list(request.gpu_devices),
            req_cpu=res.cpus,
            memory_bytes=res.memory,
            storage_bytes=res.storage,
            req_gpu=res.gpus,
            timeout_s=request.timeout_s or self.settings.default_timeout_s or self.settings.max_timeout_s or None,
            retries=request.retries,
            env=dict(request.env),
            labels=dict(request.labels),
            workdir=request.workdir or request.upload,  # an upload is where the task works unless told otherwise
            name=request.name,
            pinned_worker=request.worker,
            constraints=dict(request.constraints),
            priority=request.priority,
            pull_policy=request.pull_policy,
            after=list(dict.fromkeys(request.after)),
            read_only=request.read_only,
            outputs=list(request.outputs),
            upload=request.upload,
        )

    def check_shared_limits(self, request: SubmitRequest) -> None:
        """The operator's policy on what one task may take of what everyone shares (README: "Limits and
        defaults"): its registry, its labels, its timeout and its disk. Raises :class:`ValidationError`
        (exit 2, nothing recorded) naming the limit and its setting."""
        from cloudai import imagepolicy

        imagepolicy.check(request.image, self.settings.allowed_registries)
        for key in request.labels:
            prefix = limits.reserved_label_prefix(key, self.settings.reserved_label_prefixes)
            if prefix is not None:
                raise ValidationError("label", key, f"keys starting with {prefix!r} are reserved on this cluster "
                                      "(tools on the worker hosts act on them; CLOUDAI_RESERVED_LABEL_PREFIXES); "
                                      "use a key of your own, such as team=ml")
        cap = self.settings.max_timeout_s
        if cap and request.timeout_s is not None and request.timeout_s > cap:
            raise ValidationError("timeout", f"{request.timeout_s:g}s",
                                  f"the longest a task may run on this cluster is {_duration(cap)} "
                                  "(CLOUDAI_MAX_TIMEOUT); ask for less")
        most = self.settings.max_task_disk
        storage = request.resources.storage
        if most and storage is not None and storage > most:
            raise ValidationError("storage", format_bytes(storage),
                                  f"a task may write at most {format_bytes(most)} on this cluster "
                                  "(CLOUDAI_MAX_TASK_DISK); ask for less")

    def check_dependencies(self, task: Task) -> None:
        """Every ``after`` id must be a task of the same user (another user's task reads as unknown)."""
        for dep_id in task.after:
            dep = self.store.get_task(dep_id)
            if dep is None or dep.user_id != task.user_id or dep_id == task.task_id:
                raise ValidationError("after", dep_id, f"no task with this id belongs to {task.user_id}; "
                                      "`cloudai list` shows your tasks")

    def submit(self, request: SubmitRequest, upload: BinaryIO | None = None) -> Task:
        """Validate, record and place a task (queued on a worker, or pending with a reason). ``upload``: a
        directory packed as a tar.gz (``submit --upload``, a seekable file), checked and stored as the task's
        input before the task is recorded; nothing is recorded when it is refused."""
        if upload is not None and request.upload is None:
            request.upload = DEFAULT_TARGET
        if request.upload is not None and upload is None:
            raise ValidationError("upload", request.upload, "the archive to place there is missing: send it as the "
                                  "multipart part 'upload' (`cloudai submit --upload DIR` does)")
        task = self.build_task(request)
        self.store.ping()
        if time.monotonic() - self._redis_ok_at > self.REDIS_CHECK_S:
            self.ping_redis()
        self.check_dependencies(task)
        if upload is None:
            return self.scheduler.submit(task)
        self.store_upload(task, upload)
        try:
            return self.scheduler.submit(task)
        except BaseException:
            self.artifact_store.delete(task.task_id, INPUT_EXECUTION, "input")
            raise

    def store_upload(self, task: Task, upload: BinaryIO) -> None:
        """Check an uploaded archive (size, entries: :func:`cloudai.uploads.inspect_upload`) and the user's
        artifact quota, then store it as ``task``'s input (raises :class:`ValidationError`: exit 2)."""
        limit = self.settings.upload_max_bytes
        upload.seek(0, os.SEEK_END)
        if limit and upload.tell() > limit:
            raise ValidationError("upload", f"{format_bytes(upload.tell())} archive",
                                  f"uploads are at most {format_bytes(limit)} (CLOUDAI_UPLOAD_MAX_BYTES)")
        inspect_upload(upload, limit)
        quota = self.settings.artifact_quota_bytes
        if quota:
            upload.seek(0, os.SEEK_END)
            size = upload.tell()
            used = self.artifact_store.usage(task.user_id)
            if used + size > quota:
                raise ValidationError("upload", f"{format_bytes(size)} archive", f"{task.user_id} stores "
                                      f"{format_bytes(used)} of an artifact quota of {format_bytes(quota)} "
                                      "(CLOUDAI_ARTIFACT_QUOTA_BYTES); `cloudai artifacts --delete TASK` frees "
                                      "what older tasks stored")
        upload.seek(0)
        key = ArtifactKey(task.task_id, INPUT_EXECUTION, "input", UPLOAD_NAME, task.user_id)
        self.artifact_store.put(key, read_chunks(upload), limit or None)

    def dry_run(self, request: SubmitRequest) -> str:
        """Where the task would go now, without recording anything."""
        task = self.build_task(request)
        self.check_dependencies(task)
        return self.scheduler.preview(task)

    def get(self, task_id: str) -> Task:
        try:
            limits.text("task id", task_id, max_chars=limits.MAX_ID_CHARS)
        except ValidationError:
            raise TaskNotFound(task_id) from None  # no task has such an id (and the store can't encode it)
        task = self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def list_tasks(self, user: str | None = None, status: list[TaskStatus] | None = None, worker: str | None = None,
             limit: int | None = 50) -> list[Task]:
        for field_name, value in (("user", user), ("worker", worker)):
            if value is not None:
                limits.text(field_name, value, max_chars=limits.MAX_ID_CHARS)
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
                self.scheduler.release(task)
                self.request_pass()  # its reservation or its claim is free now
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
                self.scheduler.release(task)
                self.request_pass()
            return self.get(task_id)
        deadline = time.monotonic() + (wait_s if wait_s is not None else self.settings.stop_grace_s + 15)
        while time.monotonic() < deadline:
            task = self.get(task_id)
            if task.status.terminal:
                return task
            time.sleep(0.2)
        return self.get(task_id)

    # -- artifacts --------------------------------------------------------------------------------------
    @cached_property
    def artifact_store(self) -> ArtifactStore:
        return open_artifacts(self.settings)

    def artifacts(self, task_id: str) -> list[Artifact]:
        """The outputs the task's current attempt stored (another attempt's, a stale one's, are never shown)."""
        task = self.get(task_id)
        if not task.outputs:
            return []
        return self.artifact_store.find(task.task_id, task.execution_id, "output")

    def artifact(self, task_id: str, path: str) -> Artifact:
        """One output of the task's current attempt by its path in the container (:class:`ArtifactNotFound`)."""
        wanted = output_path(path)
        found = next((a for a in self.artifacts(task_id) if a.path == wanted), None)
        if found is None:
            raise ArtifactNotFound(task_id, wanted)
        return found

    @contextmanager
    def open_artifact(self, task_id: str, path: str, offset: int = 0,
                      sha256: str | None = None) -> Iterator[tuple[Artifact, int, Iterator[bytes]]]:
        """One output's record, the offset its bytes start at, and the bytes in chunks (the file is closed on
        leaving): from ``offset`` when the stored file is still the one of digest ``sha256`` (a resumed
        download), else from the start."""
        found = self.artifact(task_id, path)
        start = offset if offset and (sha256 is None or sha256 == found.sha256) else 0
        try:
            stream = self.artifact_store.open(found)
        except FileNotFoundError:
            raise ArtifactNotFound(task_id, found.path) from None
        with stream:
            if start:
                stream.seek(start)
            yield found, start, read_chunks(stream)

    def delete_artifacts(self, task_id: str) -> int:
        """Remove a finished task's outputs and upload; the bytes freed (a live task's are refused)."""
        task = self.get(task_id)
        if not task.status.terminal:
            raise CloudAIError(f"task {task_id} is {task.status.value}: its files are removed once it has ended")
        return self.artifact_store.delete(task.task_id)

    # -- logs -------------------------------------------------------------------------------------------
    def follow(self, task_id: str, after_seq: int = 0, follow: bool = True,
               on_reconnect: Callable[[Exception], None] | None = None,
               reconnect_for_s: float = 60.0) -> Iterator[LogEvent]:
        """The task's log from line ``after_seq + 1``, event by event (see :meth:`follow_batches`)."""
        for batch in self.follow_batches(task_id, after_seq, follow, on_reconnect, reconnect_for_s):
            yield from batch

    def follow_batches(self, task_id: str, after_seq: int = 0, follow: bool = True,
                       on_reconnect: Callable[[Exception], None] | None = None,
                       reconnect_for_s: float = 60.0, timestamps: bool = True) -> Iterator[Sequence[LogEvent]]:
        """The task's log from line ``after_seq + 1`` in batches (see :func:`cloudai.logfollow.follow_batches`);
        the lines have their timestamps whatever ``timestamps`` says (the stream's entries hold both columns)."""
        from cloudai.archive import archive_batch
        from cloudai.logfollow import follow_batches

        self.get(task_id)  # an unknown task is an error before anything is read
        return follow_batches(self.bus, task_id, lambda: self.end_of(task_id),
                              lambda seq: archive_batch(self.store, task_id, seq), after_seq, follow, on_reconnect,
                              reconnect_for_s)

    def end_of(self, task_id: str) -> LogEnd | None:
        """The end marker a finished task's log would close with; None while it is not finished."""
        task = self.get(task_id)
        return LogEnd.of_task(task) if task.status.terminal else None

    def logs(self, task_id: str) -> Iterator[LogEvent]:
        """The log so far (no waiting): from the live stream, or the archive once the stream expired."""
        return self.follow(task_id, follow=False)

    # -- workers ----------------------------------------------------------------------------------------
    def workers(self) -> list[WorkerView]:
        now = utcnow()
        workers = self.store.list_workers()
        free = self.scheduler.reservations.free(workers)  # what the reservations hold: O(workers)
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
                tasks=w.slots - slot.slots,
                claimed_by=slot.claimed_by,
            ))
        return views

    def set_worker_state(self, worker_id: str, state: WorkerState) -> WorkerInfo:
        _worker_id_or_unknown(worker_id)
        if not self.store.set_worker_state(worker_id, state):
            raise WorkerNotFound(worker_id)
        if state == WorkerState.ACTIVE:
            self.request_pass()
        info = self.store.get_worker(worker_id)
        assert info is not None
        return info

    def remove_worker(self, worker_id: str, force: bool = False) -> None:
        """Forget a worker. One with live tasks is refused unless ``force`` (the reaper then loses them)."""
        _worker_id_or_unknown(worker_id)
        if self.store.get_worker(worker_id) is None:
            raise WorkerNotFound(worker_id)
        live = self.store.list_tasks(status=LIVE, worker_id=worker_id, limit=None)
        if live and not force:
            raise CloudAIError(
                f"worker {worker_id} still holds {len(live)} live task(s); drain it and wait, or use --force"
            )
        self.store.delete_worker(worker_id)

    # -- quotas -----------------------------------------------------------------------------------------
    def set_quota(self, user: str, cpus: float | None = None, memory: int | None = None, gpus: int | None = None,
                  tasks: int | None = None, waiting: int | None = None) -> Quota:
        """Set ``user``'s quota (admin). Limits not given keep the operator's default (``CLOUDAI_DEFAULT_QUOTA_*``,
        none unless set); at least one is needed."""
        if not user.strip():
            raise ValidationError("user", user, "name the user whose quota to set")
        if cpus is None and memory is None and gpus is None and tasks is None and waiting is None:
            raise ValidationError("quota", user, "give at least one of --cpus, --memory, --gpus, --tasks, --waiting")
        for name, value in (("gpus", gpus), ("tasks", tasks), ("waiting", waiting)):
            if value is not None and value < 0:
                raise ValidationError(name, value, "use a whole number from 0")
        quota = Quota(user, cpus=cpus, memory=memory, gpus=gpus, tasks=tasks, updated_at=utcnow(), waiting=waiting)
        self.store.set_quota(quota)
        self.request_pass()  # a raised quota may let waiting tasks start
        return quota

    def clear_quota(self, user: str) -> None:
        """Remove ``user``'s quota (admin); a user without one is an error."""
        if not self.store.delete_quota(user):
            raise CloudAIError(f"user {user!r} has no quota; `cloudai admin quota list` shows the quotas")
        self.request_pass()

    def quotas(self) -> list[Quota]:
        return self.store.list_quotas()

    def quota_usage(self, user: str | None = None) -> tuple[Quota | None, dict[str, float]]:
        """``user``'s quota (admin-set limits over the operator's defaults; None: no limits) and what their
        queued and running tasks hold now, with how many of their tasks wait (``waiting``)."""
        from cloudai.quotapolicy import effective

        who = user or self.settings.user
        used = self.scheduler.reservations.user_usage(who)
        used["waiting"] = self.store.count_tasks(who, S.PENDING)
        return effective(who, self.store.get_quota(who), self.scheduler.quota_defaults()), used


def _duration(seconds: float) -> str:
    """``7d``, ``36h``, ``90m``, ``45s``: a cap as users write it."""
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale and seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


def _worker_id_or_unknown(worker_id: str) -> None:
    """An id no worker can have (not UTF-8, NUL, too long) is simply unknown, before the store sees it."""
    try:
        limits.text("worker id", worker_id, max_chars=limits.MAX_ID_CHARS)
    except ValidationError:
        raise WorkerNotFound(worker_id) from None
