"""Cluster maintenance run by beat: dead workers, lost tasks, pending placement, log retention.
Each job holds a Redis lock so two beats never act twice."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import redis

from cloudai import keys, metrics
from cloudai.archive import archive_stream
from cloudai.artifacts import ArtifactStore, open_artifacts
from cloudai.clock import redis_now, with_redis_heartbeats
from cloudai.lines import archive_line
from cloudai.logs import LogBus
from cloudai.models import LIVE, Task, TaskError, TaskStatus, WorkerState, new_execution_id, utcnow
from cloudai.reservations import Reservations
from cloudai.scheduler import Scheduler
from cloudai.settings import Settings
from cloudai.store import TaskStore

log = logging.getLogger(__name__)
UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered, unacknowledged messages in this hash
S = TaskStatus
RETRY_REGISTRY_TTL_S = 7 * 86400  # a retry's registry entry outlives any wait in pending; claims refresh it


@contextmanager
def job_lock(client: redis.Redis, name: str, ttl_s: float) -> Iterator[bool]:
    """Yields whether this process got the job's lock; the lock expires on its own if we die."""
    lock = client.lock(keys.lock(name), timeout=max(1.0, ttl_s), blocking=False)
    got = lock.acquire(blocking=False)
    try:
        yield bool(got)
    finally:
        if got:
            try:
                lock.release()
            except redis.exceptions.LockError:
                pass


def lose_task(store: TaskStore, bus: LogBus, task: Task, reason: str,
              retention_s: float = 86400.0, reservations: Reservations | None = None) -> TaskStatus | None:
    """A task whose worker died: a new attempt (pending, same id) when retries are left, else ``lost`` (its
    log closed, archived from the stream, and given the retention TTL: nothing is left without one). The lost
    attempt's reservation is released (its GPU ids stay fenced until its container is known gone). Returns the
    new status, or None when the task had moved on meanwhile."""
    new = _lose(store, bus, task, reason, retention_s)
    if new is not None and reservations is not None:
        reservations.release(task.task_id, task.attempt, task.worker_id)
    return new


def _lose(store: TaskStore, bus: LogBus, task: Task, reason: str, retention_s: float) -> TaskStatus | None:
    expected = [task.status] if task.status in LIVE else [S.QUEUED, S.RUNNING]
    if task.attempt <= task.retries:
        note = f"{reason}; retrying (attempt {task.attempt + 1} of {task.retries + 1})"
        execution = new_execution_id(task.attempt + 1)
        # the store's compare-and-set (on this very attempt) decides; then Redis fences the old attempt's
        # writer out before the notice is written, so none of its lines can land after it
        if store.transition(task.task_id, expected, S.PENDING, execution=task.execution_id,
                            attempt=task.attempt + 1, execution_id=execution, worker_id=None, gpu_ids=[],
                            container_id=None, started_at=None, pending_reason=note, error=TaskError("Lost", reason)):
            bus.attempt(task.task_id, execution, RETRY_REGISTRY_TTL_S)
            writer = bus.writer(task.task_id, execution=execution)
            seq = writer.next_seq
            writer.add(f"[cloudai] {note}")
            writer.flush()
            store.append_log(task.task_id, seq, [archive_line(f"[cloudai] {note}", "")])
            return S.PENDING
        return None
    # no attempt is current any more: the old one's archive chunks and outcome are refused (execution_id "")
    if store.transition(task.task_id, expected, S.LOST, execution=task.execution_id, execution_id="",
                        completed_at=utcnow(), error=TaskError("Lost", reason)):
        try:
            bus.end(task.task_id, S.LOST.value, None, reason)  # also drops the registry: the old writer is fenced
            archive_stream(store, bus, task.task_id)  # what the worker had not archived yet
            bus.expire(task.task_id, retention_s)
        except Exception:  # beat's retention job archives and expires it later
            log.warning("log of lost task %s not archived yet", task.task_id, exc_info=True)
        return S.LOST
    return None


def ended_before(task: Task, cutoff: datetime) -> bool:
    """Whether ``task`` ended before ``cutoff`` (what a retention job may remove the traces of)."""
    return task.status.terminal and (task.completed_at or task.created_at) < cutoff


class Maintenance:
    """The jobs beat runs on every tick."""

    def __init__(self, settings: Settings, store: TaskStore, bus: LogBus, scheduler: Scheduler,
                 artifacts: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.redis = bus.redis
        self.scheduler = scheduler
        self._artifacts = artifacts  # opened on first use (the retention job)

    @property
    def artifacts(self) -> ArtifactStore:
        if self._artifacts is None:
            self._artifacts = open_artifacts(self.settings)
        return self._artifacts

    def reap(self) -> dict[str, list[str]]:
        """Workers silent for longer than the heartbeat timeout go offline; the live tasks of workers that are
        not alive become lost (or are retried)."""
        done: dict[str, list[str]] = {"offline": [], "lost": [], "retried": []}
        with job_lock(self.redis, "reap", self.settings.heartbeat_timeout_s) as got:
            if not got:
                return done
            now = redis_now(self.redis)  # one clock: workers stamp their heartbeats with Redis TIME too
            timeout = self.settings.heartbeat_timeout_s
            workers = {w.worker_id: w for w in with_redis_heartbeats(self.redis, self.store.list_workers())}
            for worker in workers.values():
                silent = worker.state != WorkerState.OFFLINE and not worker.alive(now, timeout)
                if silent and self.store.set_worker_state(worker.worker_id, WorkerState.OFFLINE, worker.state):
                    log.warning("worker %s missed heartbeats since %s: offline", worker.worker_id,
                                worker.last_heartbeat.isoformat())
                    done["offline"].append(worker.worker_id)
            for task in self.store.list_tasks(status=LIVE, limit=None):
                holder = workers.get(task.worker_id or "")
                if holder is not None and holder.alive(now, timeout):
                    continue
                if holder is None:
                    reason = f"worker {task.worker_id} is no longer registered"
                else:
                    age = (now - holder.last_heartbeat).total_seconds()
                    reason = f"worker {task.worker_id} stopped heartbeating {age:.0f}s ago"
                new = lose_task(self.store, self.bus, task, reason, self.settings.log_retention_s,
                                self.scheduler.reservations)
                if new == S.PENDING:
                    done["retried"].append(task.task_id)
                elif new == S.LOST:
                    done["lost"].append(task.task_id)
        if done["retried"] or done["lost"]:
            self.scheduler.place_pending()
        return done

    def place_pending(self) -> list[str]:
        """Beat's tick: what was signalled, then the full backfill for about one beat interval (a pass not
        done by then resumes on the next tick)."""
        return [t.task_id for t in self.scheduler.backfill(max(1.0, self.settings.beat_interval_s / 2))]

    def reconcile_reservations(self, grace_s: float = 60.0) -> dict[str, int]:
        """Make the scheduler's Redis state agree with the store (it is kept incrementally; this repairs
        what a crash between two steps, or a Redis restart, left behind)."""
        with job_lock(self.redis, "reconcile", 120) as got:
            if not got:
                return {}
            done = self.scheduler.reservations.reconcile(self.store.list_workers(),
                                                         self.store.list_tasks(status=LIVE, limit=None), grace_s)
        for kind in ("released", "adopted"):
            metrics.DRIFT.labels(kind).set(done.get(kind, 0))
        if done.get("released"):
            self.scheduler.place_pending()
        return done

    def redispatch_lost_messages(self, grace_s: float = 60.0) -> list[str]:
        """Queued tasks whose message is nowhere (not in their worker's queue, not being delivered) after
        ``grace_s``: a Redis restart without persistence loses messages, and the store must not keep a task
        queued for ever. Their message is sent again; a duplicate is harmless (the claim is a compare-and-set)."""
        sent: list[str] = []
        with job_lock(self.redis, "redispatch", 300) as got:
            if not got:
                return sent
            now = utcnow()
            in_flight: str | None = None
            for task in self.store.list_tasks(status=S.QUEUED, limit=None):
                assignment = self.store.get_assignment(task.task_id)
                if assignment is None or (now - assignment.assigned_at).total_seconds() < grace_s:
                    continue
                if in_flight is None:  # messages being delivered (kombu keeps them until acked)
                    in_flight = "\n".join(str(v) for v in self.redis.hvals(UNACKED_KEY))
                queued = "\n".join(str(m) for m in self.redis.lrange(keys.worker_queue(task.worker_id or ""), 0, -1))
                message_id = f"{task.task_id}.{task.attempt}"  # the Celery task id dispatch gives it
                if message_id in queued or message_id in in_flight:
                    continue
                log.warning("task %s is queued on %s but its message is gone: sending it again", task.task_id,
                            task.worker_id)
                assert self.scheduler.dispatch is not None, "beat's maintenance places and sends tasks"
                self.scheduler.dispatch(task)
                self.store.create_assignment(task.task_id, task.worker_id or "")
                sent.append(task.task_id)
        return sent

    def expire_logs(self) -> list[str]:
        """Give finished tasks' log streams a TTL of the retention period (archiving the stream first when the
        worker could not: a lost task). Streams of tasks the store doesn't know are expired too."""
        expired: list[str] = []
        with job_lock(self.redis, "retention", 300) as got:
            if not got:
                return expired
            for key in self.redis.scan_iter(match=keys.log_stream("*"), count=500, _type="stream"):
                if self.redis.ttl(key) != -1:
                    continue
                task_id = key.rsplit(":", 1)[-1]
                task = self.store.get_task(task_id)
                if task is not None and not task.status.terminal:
                    continue
                if task is not None:
                    archive_stream(self.store, self.bus, task_id)  # what no worker archived (a lost task)
                age = (utcnow() - (task.completed_at or task.created_at)).total_seconds() if task else 0.0
                self.bus.expire(task_id, max(1.0, self.settings.log_retention_s - age))
                expired.append(task_id)
        return expired

    def expire_archives(self, limit: int = 1000) -> list[str]:
        """Remove the log archives of tasks that ended more than ``CLOUDAI_LOG_ARCHIVE_RETENTION`` ago (0: keep
        them for ever); each such log then says so in one line. Returns the tasks whose archive went."""
        removed: list[str] = []
        retention = self.settings.log_archive_retention_s
        if not retention:
            return removed
        with job_lock(self.redis, "archive-retention", 300) as got:
            if not got:
                return removed
            cutoff = utcnow() - timedelta(seconds=retention)
            for task_id in self.store.old_log_archives(cutoff, limit):
                task = self.store.get_task(task_id)
                if task is not None and not ended_before(task, cutoff):
                    continue  # still running, or ended within the retention period
                freed = self.store.delete_log(task_id)
                if task is not None:
                    note = (f"[cloudai] this log was removed {retention / 86400:g} days after the task ended "
                            "(CLOUDAI_LOG_ARCHIVE_RETENTION)")
                    self.store.append_log(task_id, 1, [archive_line(note, "")])
                log.info("log archive of task %s removed (%d bytes)", task_id, freed)
                removed.append(task_id)
        return removed

    def expire_artifacts(self, limit: int = 1000) -> list[str]:
        """Remove the stored files (outputs, upload) of tasks that ended more than ``CLOUDAI_ARTIFACT_RETENTION``
        ago (0: keep them for ever); a task that has not ended keeps its upload, however long it waits. Returns
        the tasks whose files went."""
        removed: list[str] = []
        retention = self.settings.artifact_retention_s
        if not retention:
            return removed
        with job_lock(self.redis, "artifact-retention", 300) as got:
            if not got:
                return removed
            cutoff = utcnow() - timedelta(seconds=retention)
            for task_id in self.artifacts.stored_before(cutoff, limit):
                task = self.store.get_task(task_id)
                if task is not None and not ended_before(task, cutoff):
                    continue  # still to run, or ended within the retention period
                freed = self.artifacts.delete(task_id)
                log.info("stored files of task %s removed (%d bytes)", task_id, freed)
                removed.append(task_id)
        return removed
