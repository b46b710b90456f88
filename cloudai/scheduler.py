"""Placement: pick a worker whose free capacity fits a task and reserve it, in one atomic Redis step
(:mod:`cloudai.reservations`); a submit costs O(workers), never O(live tasks). GPU ids are chosen there,
stored with the task, and used exactly by the worker.

Waiting tasks are placed by passes (after a task ends, on beat's tick, on undrain): in fair-share order across
users (:mod:`cloudai.fairshare`), priority then age within a user; dependencies and quotas are checked first. A
waiting task that fits nowhere claims the worker it is closest to fitting on: later tasks may use that
worker's resources only beyond the claim (backfill), so the head is never starved yet blocks nothing else.

A submit's fixed cost is kept small: the workers are listed from the store only when its workers version
changed (:meth:`cloudai.store.base.TaskStore.workers_version`), their packing for the placement script is
reused, heartbeats are judged by Redis's clock (its offset measured once a second), and the task and its
assignment are one store write (:meth:`cloudai.store.base.TaskStore.create_assigned`).

Which GPU ids of a worker count as free besides the reservations (a lost attempt may still hold some) is
decided in one place: :meth:`cloudai.reservations.Reservations.fenced_gpu_ids`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import redis

from cloudai import keys, quotapolicy
from cloudai.errors import CloudAIError, PlacementError, RedisUnavailable, ServiceUnavailable, WorkerNotFound
from cloudai.fairshare import rank
from cloudai.models import (
    LIVE,
    Quota,
    Task,
    TaskError,
    TaskStatus,
    WorkerInfo,
    WorkerState,
    format_bytes,
    utcnow,
)
from cloudai.quotapolicy import effective, running_limits
from cloudai.reservations import Candidates, Held, NoFit, OverQuota, Placed, Reservations, gpu_order
from cloudai.settings import Settings
from cloudai.store import TaskStore
from cloudai.volumes import parse_mount

log = logging.getLogger(__name__)
S = TaskStatus
Dispatch = Callable[[Task], None]
EPS = 1e-9


class QuotaExceeded(PlacementError):
    """The task asks for more than its user's quota allows even with nothing else running."""


class TooManyWaiting(QuotaExceeded):
    """The task would wait, and its user already has as many waiting tasks as their quota allows: refused at
    submit (exit 2), nothing recorded."""


def fits(task: Task, cpus: float, memory: int, gpus: int, labels: dict[str, str]) -> bool:
    return (
        task.req_cpu <= cpus + EPS
        and task.memory_bytes <= memory
        and task.req_gpu <= gpus
        and all(labels.get(k) == v for k, v in task.constraints.items())
    )


def offers(task: Task, worker: WorkerInfo) -> bool:
    """``worker`` has what ``task`` names besides amounts, which no waiting changes: the volumes it mounts
    (writable where it mounts them ``rw``) and the exact GPU ids of ``--gpus device=``."""
    return (all(parse_mount(m).offered_by(worker.volumes) for m in task.mounts)
            and (not task.gpu_devices or set(task.gpu_devices) <= set(worker.gpu_ids)))


def could_ever_run(task: Task, worker: WorkerInfo) -> bool:
    """``worker`` fits ``task`` when it runs nothing else."""
    return (worker.slots >= 1 and fits(task, worker.cpus, worker.memory, len(worker.gpu_ids), worker.labels)
            and offers(task, worker))


def needs(task: Task) -> str:
    """What a task names that only some workers have, as its reasons say it: ``volume data (rw), GPUs 0,1``."""
    parts = []
    mounts = [parse_mount(m) for m in task.mounts]
    if mounts:
        names = ", ".join(dict.fromkeys(m.volume + (" (rw)" if m.mode == "rw" else "") for m in mounts))
        parts.append(f"volume{'s' if len(mounts) > 1 else ''} {names}")
    if task.gpu_devices:
        parts.append(f"GPU{'s' if len(task.gpu_devices) > 1 else ''} {','.join(task.gpu_devices)}")
    return ", ".join(parts)


_QUOTA_NAMES = {"cpu": "CPUs", "mem": "memory", "gpus": "GPUs", "tasks": "tasks"}


def quota_reason(user: str, over: OverQuota) -> str:
    """``quota: alice uses 2 of 2 GPUs``."""
    if over.resource == "cpu":
        used, limit = f"{over.used / 1000:g}", f"{over.limit / 1000:g}"
    elif over.resource == "mem":
        used, limit = format_bytes(int(over.used)), format_bytes(int(over.limit))
    else:
        used, limit = f"{over.used:g}", f"{over.limit:g}"
    return f"quota: {user} uses {used} of {limit} {_QUOTA_NAMES[over.resource]}"


class Scheduler:
    """Places tasks on workers; ``dispatch`` puts a queued task's message on its worker's queue."""

    STARVATION_S = 3600.0  # a task waiting longer goes before fair share and priority (oldest first)

    def __init__(self, settings: Settings, store: TaskStore, client: redis.Redis,
                 dispatch: Dispatch | None = None) -> None:
        self.settings = settings
        self.store = store
        self.redis = client
        # on the same client: a submit's placement and its message share one connection pool
        # None: this process only reads (an operator's direct-mode command); placing needs a dispatcher
        self.dispatch: Dispatch | None = dispatch
        self.reservations = Reservations(
            client, settings.fairshare_halflife_s,
            live_on=lambda worker_id: store.list_tasks(status=LIVE, worker_id=worker_id, limit=None),
        )
        self._workers: tuple[object, list[WorkerInfo]] | None = None  # (store's workers version, the list)
        self._packed: dict[tuple[str, ...], Candidates] = {}  # candidate sets of that list, packed for Lua
        # the candidates of a task without pin or constraints: (that list, valid while the cut-off is before
        # this, the candidates)
        self._open: tuple[list[WorkerInfo], datetime, list[WorkerInfo]] | None = None
        self._clock: tuple[float, timedelta] = (float("-inf"), timedelta(0))  # (measured at, Redis - ours)
        self._publishes_defaults = False  # the master's scheduler: its settings are the cluster's quota defaults
        self._defaults: tuple[float, quotapolicy.Defaults] | None = None  # (read at, the published defaults)

    # -- the operator's default quotas ------------------------------------------------------------------
    def publish_quota_defaults(self) -> None:
        """Make this process's default quotas the cluster's (the master, at start and on each of its passes):
        beat's and the workers' passes read them, so one user is held to one quota whoever places."""
        self._publishes_defaults = True
        self.redis.set(keys.SCHED_QUOTA_DEFAULTS, quotapolicy.to_text(quotapolicy.defaults(self.settings)))

    #: how long published defaults are used before they are read again (a submit costs no extra round trip)
    DEFAULTS_CHECK_S = 1.0

    def quota_defaults(self) -> quotapolicy.Defaults:
        """The cluster's default quotas: this process's settings where it is the master, else the master's as
        published (this process's settings while none are)."""
        if self._publishes_defaults:
            return quotapolicy.defaults(self.settings)
        now = time.monotonic()
        if self._defaults is None or now - self._defaults[0] > self.DEFAULTS_CHECK_S:
            published = quotapolicy.from_text(self.redis.get(keys.SCHED_QUOTA_DEFAULTS))
            self._defaults = (now, published if published is not None else quotapolicy.defaults(self.settings))
        return self._defaults[1]

    #: how often the offset of Redis's clock from this host's is measured again (one TIME per interval)
    CLOCK_CHECK_S = 1.0

    def _now(self) -> datetime:
        """Now by Redis's clock (the one heartbeats are stamped with), without a round trip per submit: this
        host's clock plus the offset measured at most :attr:`CLOCK_CHECK_S` ago."""
        measured_at, offset = self._clock
        mono = time.monotonic()
        if mono - measured_at > self.CLOCK_CHECK_S:
            before = utcnow()
            sec, usec = self.redis.time()
            after = utcnow()
            offset = datetime.fromtimestamp(sec + usec / 1e6, before.tzinfo) - (before + (after - before) / 2)
            self._clock = (mono, offset)
        return utcnow() + offset

    def _list_workers(self) -> list[WorkerInfo]:
        """The registered workers; listed from the store only when its workers version changed (a submit
        reads one counter instead of every worker record). The list is shared: callers must not change it."""
        version = self.store.workers_version()
        cached = self._workers
        if version is not None and cached is not None and cached[0] == version:
            return cached[1]
        workers = self.store.list_workers()
        self._workers = None if version is None else (version, workers)
        self._packed = {}
        return workers

    def _pack(self, workers: list[WorkerInfo], candidates: list[WorkerInfo]) -> Candidates | list[WorkerInfo]:
        """``candidates`` packed for the placement script, once per set of workers while the list of
        ``workers`` is the cached one (whose records never change)."""
        cached = self._workers
        if cached is None or workers is not cached[1]:
            return candidates
        ids = tuple(w.worker_id for w in candidates)
        packed = self._packed.get(ids)
        if packed is None:
            if len(self._packed) >= 64:
                self._packed = {}
            packed = self._packed[ids] = Candidates.of(candidates)
        return packed

    # -- candidates and reasons -------------------------------------------------------------------------
    def _alive(self, worker: WorkerInfo) -> bool:
        return (worker.state == WorkerState.ACTIVE and not worker.pressure
                and worker.alive(self._now(), self.settings.heartbeat_timeout_s))

    def _candidates(self, task: Task, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        """Active workers with a fresh heartbeat, not under pressure (a worker short of disk takes no new task),
        that have the task's labels (and are its pinned worker)."""
        # runs for every worker on every submit: one datetime comparison each (WorkerInfo.alive's arithmetic,
        # as a cut-off), and the label test only for a task that has constraints
        cutoff = self._now() - timedelta(seconds=self.settings.heartbeat_timeout_s)
        active, pinned, wanted = WorkerState.ACTIVE, task.pinned_worker, task.constraints.items()
        named = bool(task.mounts or task.gpu_devices)  # volumes or GPU ids only some workers have
        open_task = not pinned and not wanted and not named
        kept = self._open
        if open_task and kept is not None and kept[0] is workers and cutoff <= kept[1]:
            return kept[2]  # the same workers, none of them stale yet
        candidates = [w for w in workers if w.state == active and w.last_heartbeat >= cutoff and not w.pressure
                      and (not pinned or w.worker_id == pinned)
                      and (not wanted or all(w.labels.get(k) == v for k, v in wanted))
                      and (not named or offers(task, w))]
        cached = self._workers
        if open_task and candidates and cached is not None and workers is cached[1]:
            # what most tasks get; it holds until the first of them goes stale (a stale worker becomes fresh
            # again only by a heartbeat, which changes the store's workers version and so the list)
            self._open = (workers, min(w.last_heartbeat for w in candidates), candidates)
        return candidates

    def _unavailable(self, task: Task, workers: list[WorkerInfo], candidates: list[WorkerInfo]) -> str | None:
        """Why no usable worker could run ``task`` even empty (it waits for one to come back), else None."""
        if any(could_ever_run(task, w) for w in candidates):
            return None
        now = self._now()
        pressed = [w for w in workers if w.pressure and w.state == WorkerState.ACTIVE and could_ever_run(task, w)
                   and (not task.pinned_worker or w.worker_id == task.pinned_worker)
                   and w.alive(now, self.settings.heartbeat_timeout_s)]
        if pressed and not any(could_ever_run(task, w) for w in candidates):
            # the worker's own words (its disk, not any task's): it waits until the worker has room again
            return f"worker {pressed[0].worker_id} takes no new task: {pressed[0].pressure}"
        if task.pinned_worker and not candidates:
            return f"worker {task.pinned_worker} is not active"
        able = [w for w in workers if could_ever_run(task, w)
                and (not task.pinned_worker or w.worker_id == task.pinned_worker)]
        if not candidates and not able:
            if task.constraints and any(self._alive(w) for w in workers):
                wanted = ",".join(f"{k}={v}" for k, v in task.constraints.items())
                return f"no active worker has the labels {wanted}"
            if needs(task) and any(self._alive(w) for w in workers):
                return f"no active worker offers {needs(task)}"
            return "no active worker (none with a fresh heartbeat that is not draining)"
        names = ", ".join(w.worker_id for w in able[:3]) + (" ..." if len(able) > 3 else "")
        states = {("draining" if w.state == WorkerState.DRAINING else "offline") for w in able}
        kind = " or ".join(sorted(states)) or "offline"
        plural = "s" if len(able) > 1 else ""
        return f"no active worker can run it: only {kind} worker{plural} {names} could; it waits for one to return"

    @staticmethod
    def _nofit_reason(task: Task, nofit: NoFit) -> str:
        if nofit.blocked_by:
            # not named: it may be another user's task, and users see only their own
            return ("waiting behind an earlier task that waited longer for the resources it would use "
                    "(backfill keeps them for it)")
        if task.gpu_devices and task.req_gpu > nofit.gpus:
            subject, obj = ("they are", "them") if len(task.gpu_devices) > 1 else ("it is", "it")
            return f"needs {needs(task)}; {subject} busy on every worker that has {obj}"
        if task.req_gpu > nofit.gpus:
            plural = "s" if task.req_gpu > 1 else ""
            return f"needs {task.req_gpu} GPU{plural}; the most free on any worker is {nofit.gpus}"
        if task.req_cpu > nofit.cpus + EPS:
            return f"needs {task.req_cpu:g} CPUs; the most free on any worker is {nofit.cpus:g}"
        if task.memory_bytes > nofit.memory:
            return (f"needs {format_bytes(task.memory_bytes)} memory; the most free on any worker is "
                    f"{format_bytes(nofit.memory)}")
        if nofit.slots < 1:
            return "every worker that fits it runs as many tasks as it has slots"
        return "no worker has all of the CPUs, memory, GPUs and a slot free at once"

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
        if any(could_ever_run(task, w) for w in workers):
            return
        if needs(task) and not any(offers(task, w) for w in workers):
            what = (f"worker {task.pinned_worker} does not offer" if task.pinned_worker
                    else "no registered worker offers")
            raise PlacementError(
                f"{what} {needs(task)}; `cloudai workers` lists each worker's volumes and GPU ids (an operator "
                "declares volumes with `cloudai worker start --volume NAME=HOSTPATH[:ro|rw]`)")
        where = f"worker {task.pinned_worker}" if task.pinned_worker else "any registered worker"
        biggest = max(workers, key=lambda w: (len(w.gpu_ids), w.cpus, w.memory))
        raise PlacementError(
            f"task needs {task.resources.describe()}"
            + (f" with labels {task.constraints}" if task.constraints else "")
            + f", more than {where} has (largest: {biggest.worker_id} with {biggest.cpus:g} CPUs, "
            f"{format_bytes(biggest.memory)}, {len(biggest.gpu_ids)} GPUs); lower the request or add a worker"
        )

    def _quota(self, task: Task) -> Quota | None:
        """The user's quota (admin-set limits over the operator's defaults); refuses a task over it alone."""
        quota = effective(task.user_id, self.store.get_quota(task.user_id), self.quota_defaults())
        if quota is not None:
            why = quota.exceeded_alone(task.resources)
            if why:
                raise QuotaExceeded(f"{why}; lower the request or ask an admin (`cloudai admin quota set`)")
        return quota

    # -- dependencies -----------------------------------------------------------------------------------
    def _dependencies(self, task: Task, cache: dict[str, Task | None]) -> tuple[str, str]:
        """('ok', ''), ('wait', reason) or ('cancel', reason) for a task's ``after`` list."""
        waiting = []
        for dep_id in task.after:
            if dep_id not in cache:
                cache[dep_id] = self.store.get_task(dep_id)
            dep = cache[dep_id]
            if dep is None:
                return "cancel", f"dependency {dep_id} no longer exists"
            if dep.status == S.COMPLETED:
                continue
            if dep.status.terminal:
                return "cancel", f"dependency {dep_id} ended {dep.status.value}"
            waiting.append(dep_id)
        if waiting:
            return "wait", f"waiting for {', '.join(waiting)} to complete"
        return "ok", ""

    def _cancel_for_dependency(self, task: Task, reason: str, create: bool) -> None:
        error = TaskError("DependencyFailed", reason)
        if create:
            task.status, task.completed_at, task.error, task.pending_reason = S.CANCELLED, utcnow(), error, None
            self.store.create_task(task)
        elif not self.store.transition(task.task_id, S.PENDING, S.CANCELLED, completed_at=utcnow(), error=error,
                                       pending_reason=None):
            return
        from cloudai.logs import LogBus  # rare; a submit's usual path doesn't load the log modules

        bus = LogBus(self.redis, self.settings.log_stream_maxlen)
        bus.end(task.task_id, S.CANCELLED.value, None, reason)
        bus.expire(task.task_id, self.settings.log_retention_s)

    # -- submit -----------------------------------------------------------------------------------------
    def preview(self, task: Task) -> str:
        """Where ``task`` would go now (``--dry-run``); records nothing. Raises like :meth:`submit`."""
        workers = self._list_workers()
        self._check_possible(task, workers)
        quota = self._quota(task)
        try:
            candidates = self._candidates(task, workers)  # reads Redis's clock
            why = self._unavailable(task, workers, candidates)
            if why:
                return "pending: " + why
            outcome = self.reservations.place(task, self._pack(workers, candidates), running_limits(quota),
                                              self.settings.placement_policy, dry=True)
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis error during placement: {exc}") from exc
        if isinstance(outcome, Placed):
            return f"queued on worker {outcome.worker_id}"
        if isinstance(outcome, OverQuota):
            return "pending: " + quota_reason(task.user_id, outcome)
        if isinstance(outcome, Held):  # dry runs reserve nothing, so never
            return "pending: already being placed"
        return "pending: " + self._nofit_reason(task, outcome)

    def submit(self, task: Task) -> Task:
        """Record ``task`` as queued on a worker that fits (and enqueue it), or as pending with a reason.
        On an enqueue failure nothing stays recorded."""
        if self.dispatch is None:
            raise RuntimeError("this process does not place tasks: the master, beat and worker agents do")
        try:
            workers = self._list_workers()
            self._check_possible(task, workers)
            quota = self._quota(task)
            if task.after:
                state, why = self._dependencies(task, {})
                if state == "cancel":
                    self._cancel_for_dependency(task, why, create=True)
                    return task
                if state == "wait":
                    return self._record_pending(task, why, quota)
            candidates = self._candidates(task, workers)
            unavailable = self._unavailable(task, workers, candidates)
            if unavailable:
                return self._record_pending(task, unavailable, quota)
            outcome = self.reservations.place(task, self._pack(workers, candidates), running_limits(quota),
                                              self.settings.placement_policy, claim=True)
            if isinstance(outcome, Placed):
                self._queue(task, outcome, create=True)
                return task
            if isinstance(outcome, OverQuota):
                return self._record_pending(task, quota_reason(task.user_id, outcome), quota)
            if isinstance(outcome, Held):  # a task id that is already reserved: never a new task's
                raise PlacementError(f"task {task.task_id} is already being placed")
            return self._record_pending(task, self._nofit_reason(task, outcome), quota)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # what a check before the submit would say
            raise RedisUnavailable(self.settings.redis_url, exc) from exc
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis error during placement: {exc}") from exc

    def _record_pending(self, task: Task, reason: str, quota: Quota | None = None) -> Task:
        """Record ``task`` waiting with ``reason``, unless its user already has as many waiting tasks as
        ``quota`` allows (counted only here, on the path of a task that would wait: a placed submit pays
        nothing for it). Concurrent submits of one user may pass the count together: the bound is soft by at
        most the submits in flight."""
        limit = quota.waiting if quota is not None else None
        if limit is not None:
            waiting = self.store.count_tasks(task.user_id, S.PENDING)
            if waiting >= limit:
                raise TooManyWaiting(
                    f"{task.user_id} already has {waiting} waiting tasks, the most allowed ({limit}; "
                    "CLOUDAI_DEFAULT_QUOTA_WAITING or an admin's `cloudai admin quota set --waiting`); this one "
                    f"would wait too ({reason}). Submit it once some have started, or cancel some "
                    "(`cloudai list --status pending`)")
        task.status, task.pending_reason = S.PENDING, reason
        self.store.create_task(task)
        return task

    def release(self, task: Task) -> bool:
        """Give back what ``task``'s current attempt holds on its worker (idempotent)."""
        return self.reservations.release(task.task_id, task.attempt, task.worker_id)

    def _queue(self, task: Task, placed: Placed, create: bool) -> bool:
        """Record ``task`` queued where it was reserved (a new record with its assignment, in one store write;
        or pending -> queued) and send its message. Whatever fails gives the reservation back and leaves
        nothing half-written."""
        try:
            if create:
                task.worker_id, task.gpu_ids, task.pending_reason, task.status = (
                    placed.worker_id, placed.gpu_ids, None, S.QUEUED)
                self.store.create_assigned(task)
            elif not self.store.transition(task.task_id, S.PENDING, S.QUEUED, worker_id=placed.worker_id,
                                           gpu_ids=placed.gpu_ids, pending_reason=None):
                self.reservations.release(task.task_id, task.attempt)
                return False
        except BaseException:
            self.reservations.release(task.task_id, task.attempt)
            raise
        task.worker_id, task.gpu_ids, task.pending_reason, task.status = (
            placed.worker_id, placed.gpu_ids, None, S.QUEUED)
        try:
            if not create:
                self.store.create_assignment(task.task_id, placed.worker_id)
            self.dispatch(task)  # type: ignore[misc]  # submit and place_pending return early without one
        except Exception as exc:
            if create:
                self.store.delete_task(task.task_id)  # and its assignment
            else:
                self.store.transition(task.task_id, S.QUEUED, S.PENDING, worker_id=None, gpu_ids=[],
                                      pending_reason=f"enqueue failed: {exc}")
                self.store.delete_assignment(task.task_id)
            self.reservations.release(task.task_id, task.attempt)
            raise ServiceUnavailable(
                f"could not enqueue task {task.task_id} on {keys.worker_queue(placed.worker_id)}: {exc}") from exc
        return True

    # -- waiting tasks ----------------------------------------------------------------------------------
    def place_pending(self) -> list[Task]:
        """Queue waiting tasks that fit now (a pass; see the module doc). A call while another process runs a
        pass makes that one run again instead, so no freed resource waits for beat's next tick. A process that
        does not place (no dispatcher: an operator's command) leaves the pass to beat's next tick."""
        placed: list[Task] = []
        if self.dispatch is None:
            return placed
        try:
            self.redis.set(keys.SCHED_PASS_DIRTY, "1")
            for _ in range(5):
                lock = self.redis.lock(keys.lock("placement"), timeout=120)
                if not lock.acquire(blocking=False):
                    return placed  # its holder sees the flag and runs again
                try:
                    while self.redis.delete(keys.SCHED_PASS_DIRTY):
                        placed += self._pass()
                finally:
                    try:
                        lock.release()
                    except redis.exceptions.LockError:
                        pass  # it expired during a long pass: harmless, every step is atomic on its own
                if not self.redis.exists(keys.SCHED_PASS_DIRTY):
                    break
        except redis.RedisError as exc:
            log.warning("placement pass stopped (%s); waiting tasks wait for the next tick", exc)
        return placed

    def _pass(self) -> list[Task]:
        pending = self.store.list_tasks(status=S.PENDING, limit=None)
        if not pending:
            return []
        workers = self._list_workers()
        admin_quotas = {q.user_id: q for q in self.store.list_quotas()}
        if self._publishes_defaults:  # again each pass: Redis may have restarted empty
            self.publish_quota_defaults()
        defaults = self.quota_defaults()
        quotas: dict[str, Quota | None] = {}  # what placement checks, per user (admin's over the defaults)
        ordered = rank(pending, self.reservations.usage(), utcnow() - timedelta(seconds=self.STARVATION_S))
        generation = self.reservations.new_generation()
        cache: dict[str, Task | None] = {}
        hopeless: dict[tuple[object, ...], str] = {}  # shapes that found nothing and could claim nothing
        placed: list[Task] = []
        cancelled = False
        for task in ordered:
            reason: str | None = None
            outcome: Placed | NoFit | OverQuota | Held
            if task.after:
                state, why = self._dependencies(task, cache)
                if state == "cancel":
                    self._cancel_for_dependency(task, why, create=False)
                    cache[task.task_id] = self.store.get_task(task.task_id)
                    cancelled = True
                    continue
                if state == "wait":
                    reason = why
            candidates = self._candidates(task, workers) if reason is None else []
            if reason is None:
                reason = self._unavailable(task, workers, candidates)
            shape = (task.pinned_worker, tuple(sorted(task.constraints.items())), task.req_cpu,
                     task.memory_bytes, task.req_gpu, tuple(task.mounts), tuple(task.gpu_devices))
            if task.user_id not in quotas:
                quotas[task.user_id] = running_limits(
                    effective(task.user_id, admin_quotas.get(task.user_id), defaults))
            if reason is None and shape in hopeless and quotas[task.user_id] is None:
                reason = hopeless[shape]
            if reason is None:
                outcome = self.reservations.place(task, self._pack(workers, candidates), quotas[task.user_id],
                                                  self.settings.placement_policy, generation=generation,
                                                  claim=True)
                if isinstance(outcome, Placed):
                    try:
                        if self._queue(task, outcome, create=False):
                            placed.append(task)
                    except CloudAIError:
                        log.exception("placing pending task %s failed", task.task_id)
                        break
                    continue
                if isinstance(outcome, Held):
                    continue  # another pass is placing it
                if isinstance(outcome, OverQuota):
                    reason = quota_reason(task.user_id, outcome)
                else:
                    reason = self._nofit_reason(task, outcome)
                    if not outcome.claimed:
                        hopeless[shape] = reason
            if reason != task.pending_reason:
                self.store.update_task(task.task_id, S.PENDING, pending_reason=reason)
        self.reservations.end_pass(generation, [w.worker_id for w in workers])
        if cancelled:
            self.redis.set(keys.SCHED_PASS_DIRTY, "1")  # dependents of what was cancelled: once more
        return placed


__all__ = ["Scheduler", "fits", "offers", "gpu_order", "QuotaExceeded", "TooManyWaiting", "quota_reason"]
