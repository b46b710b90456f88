"""Per-worker free capacity kept incrementally in Redis and changed only by Lua scripts, so a placement is
one atomic step that costs O(workers), never O(live tasks).

State (names in :mod:`cloudai.keys`): each worker's free CPUs (milli-CPUs), memory, slots and GPU ids; one
reservation record per queued/running task (what it holds, for which attempt); per-user totals (quotas) and
decayed usage (fair share); and at most one backfill claim per worker (the waiting task that has first right
to that worker's resources). Reserve and release are the only writers in normal operation; beat reconciles
everything from the store (:meth:`Reservations.reconcile`), and a worker whose state is missing or was
computed for another capacity is rebuilt on first use."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from cloudai import gpus, keys
from cloudai import reservation_scripts as scripts
from cloudai.models import Quota, Task, WorkerInfo

log = logging.getLogger(__name__)

GPU_WEIGHT = 8.0  # a GPU counts as 8 CPUs in fair-share usage
MIN_CHARGE_S = 60.0  # usage charged when a task is placed (as if it ran a minute); the rest when it ends
CLAIM_TTL_S = 300  # a claim no placement pass renews (beat stopped) lapses after this
P = keys.SCHED_PREFIX

def milli(cpus: float) -> int:
    return max(1, round(cpus * 1000))


def signature(worker: WorkerInfo) -> str:
    """The capacity a worker's free counters were computed from; a change makes them be rebuilt."""
    return _signature(worker.cpus, worker.memory, worker.slots, tuple(worker.gpu_ids))


@functools.lru_cache(maxsize=4096)
def _signature(cpus: float, memory: int, slots: int, gpu_ids: tuple[str, ...]) -> str:
    return f"{milli(cpus)}:{memory}:{slots}:{','.join(sorted(gpu_ids))}"


def weight(task: Task) -> float:
    """Fair-share usage per second the task holds its resources."""
    return task.req_cpu + GPU_WEIGHT * task.req_gpu


@dataclass(frozen=True)
class Placed:
    worker_id: str
    gpu_ids: list[str]


@dataclass(frozen=True)
class NoFit:
    """Nothing fits now: the most any candidate has free (after others' claims), the waiting task whose claim
    holds resources that would fit it, and the worker this task now claims (if it claimed one)."""

    cpus: float
    memory: int
    gpus: int
    slots: int
    blocked_by: str
    claimed: str


@dataclass(frozen=True)
class OverQuota:
    resource: str  # cpu | mem | gpus | tasks
    used: float
    limit: float


@dataclass(frozen=True)
class FreeView:
    cpus: float
    memory: int
    slots: int
    gpu_ids: list[str]
    claimed_by: str | None


@dataclass(frozen=True)
class Candidates:
    """Workers packed once for the placement script: by id, with their capacity signatures. A submit that
    places among the same workers as the last one reuses this instead of packing 50 workers again."""

    by_id: dict[str, WorkerInfo]
    packed: str  # lines alternating worker id and capacity signature, in id order

    @classmethod
    def of(cls, workers: Iterable[WorkerInfo]) -> Candidates:
        ordered = sorted(workers, key=lambda w: w.worker_id)
        return cls({w.worker_id: w for w in ordered}, "\n".join(f"{w.worker_id}\n{signature(w)}" for w in ordered))


@dataclass(frozen=True)
class Held:
    """The task already holds a reservation (another placement got it first)."""


Outcome = Placed | NoFit | OverQuota | Held


class Reservations:
    """The Redis side of placement. ``live_on`` lists the store's live tasks of one worker: used only to
    rebuild a worker whose Redis state is missing."""

    def __init__(self, client: redis.Redis, halflife_s: float = 7 * 86400.0,
                 live_on: Callable[[str], list[Task]] | None = None) -> None:
        self.redis = client
        self.halflife_s = halflife_s
        self.live_on = live_on
        self._place = client.register_script(scripts.PLACE)
        self._release = client.register_script(scripts.RELEASE)
        self._adopt = client.register_script(scripts.ADOPT)
        self._recompute_worker = client.register_script(scripts.RECOMPUTE_WORKER)
        self._recompute_user = client.register_script(scripts.RECOMPUTE_USER)
        self._end_pass = client.register_script(scripts.END_PASS)
        self._view = client.register_script(scripts.VIEW)

    # -- the hook for fenced GPUs ---------------------------------------------------------------------
    def fenced_gpu_ids(self, worker_id: str, gpu_ids: list[str]) -> set[str]:
        """Which of ``gpu_ids`` of ``worker_id`` must not be handed out although no live reservation holds them
        (a lost attempt's container may still use them). The one place that decides which GPU ids count as
        free besides the reservations: release holds these back, rebuild leaves them out. They are the ids
        still leased (:func:`cloudai.gpus.fenced_gpu_ids`): the executor and the agent drop a lease only once
        its container is known gone, and a lease's TTL is the fencing deadline."""
        return gpus.fenced_gpu_ids(self.redis, worker_id, gpu_ids) if gpu_ids else set()

    # -- placement --------------------------------------------------------------------------------------
    def place(self, task: Task, candidates: list[WorkerInfo] | Candidates, quota: Quota | None,
              policy: str = "spread", dry: bool = False, generation: str = "", claim: bool = False) -> Outcome:
        """Reserve the best candidate that fits ``task`` (atomically, with the quota), or say why none does.
        ``dry``: choose without reserving. ``claim``: when nothing fits, claim the worker it waits for."""
        if not isinstance(candidates, Candidates):
            candidates = Candidates.of(candidates)
        q = quota or Quota(task.user_id)
        args: list[str | int | float] = [
            P, task.task_id, task.attempt, task.user_id, milli(task.req_cpu), task.memory_bytes, task.req_gpu,
            -1 if q.cpus is None else milli(q.cpus), -1 if q.memory is None else q.memory,
            -1 if q.gpus is None else q.gpus, -1 if q.tasks is None else q.tasks,
            "dry" if dry else "reserve", policy, generation, "1" if claim else "0",
            repr(weight(task) * MIN_CHARGE_S), repr(self.halflife_s), CLAIM_TTL_S, repr(weight(task)),
        ]
        args.append(candidates.packed)
        args.append(",".join(task.gpu_devices))
        by_id = candidates.by_id
        for _ in range(3):
            out = [_text(x) for x in self._evalsha(self._place, args)]
            if out[0] != "init":
                break
            for worker_id in out[1:]:
                self.rebuild(by_id[worker_id])
        if out[0] == "ok":
            return Placed(out[1], [g for g in out[2].split(",") if g])
        if out[0] == "held":
            return Held()
        if out[0] == "quota":
            return OverQuota(out[1], float(out[2]), float(out[3]))
        if out[0] == "none":
            return NoFit(max(0.0, int(out[1]) / 1000), max(0, int(out[2])), max(0, int(out[3])),
                         max(0, int(out[4])), out[5], out[6])
        raise RuntimeError(f"placement state of workers {out[1:]} could not be rebuilt")

    def _evalsha(self, script: Any, args: list[str | int | float]) -> Any:
        """Run a registered script on a pooled connection directly. Every submit runs the placement script
        once, and redis-py's per-command wrapper (pool bookkeeping, retry closure, instrumentation) cost as
        much CPU as the script itself; what it did that matters is kept: a script Redis lost is loaded again,
        and a dropped connection is reconnected and tried once more (a placement that did run then answers
        'held', as it would under redis-py's own retry)."""
        pool = self.redis.connection_pool
        try:
            conn = pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants the command's name
            conn = pool.get_connection("EVALSHA")  # type: ignore[call-arg]
        try:
            for attempt in range(3):
                try:
                    conn.send_command("EVALSHA", script.sha, 0, *args)
                    return conn.read_response()
                except redis.exceptions.NoScriptError:
                    if attempt:
                        raise
                    conn.send_command("SCRIPT", "LOAD", script.script)
                    conn.read_response()
                except (redis.ConnectionError, redis.TimeoutError):
                    conn.disconnect()
                    if attempt:
                        raise
            raise RuntimeError("unreachable")
        finally:
            pool.release(conn)

    def release(self, task_id: str, attempt: int | None = None, worker_id: str | None = None) -> bool:
        """Give back what ``task_id`` holds (only for ``attempt`` when given); idempotent. Every path that
        ends a task's hold (finish, cancel, lost, requeue) calls this."""
        hold = ""
        if worker_id:  # only the GPU ids this reservation gives back can need holding back
            reserved: object = self.redis.hget(keys.sched_reservation(task_id), "gpus")
            ids = [g for g in _text(reserved or "").split(",") if g]
            hold = ",".join(sorted(self.fenced_gpu_ids(worker_id, ids)))
        return bool(self._release(args=[P, task_id, "" if attempt is None else attempt, repr(self.halflife_s),
                                        repr(MIN_CHARGE_S), hold]))

    def adopt(self, task: Task) -> None:
        """Record the reservation of a task the store has live on its worker (idempotent)."""
        for _ in range(2):
            old = _text(self._adopt(args=[P, task.task_id, task.attempt, task.worker_id or "", task.user_id,
                                          milli(task.req_cpu), task.memory_bytes, ",".join(task.gpu_ids),
                                          repr(weight(task))]))
            if not old:
                return
            self.release(task.task_id, int(old))  # a stale record of an earlier attempt

    def rebuild(self, worker: WorkerInfo) -> None:
        """Recompute a worker's free counters from capacity and reservation records, first adopting the
        store's live tasks on it (Redis may have lost them)."""
        if self.live_on is not None:
            for task in self.live_on(worker.worker_id):
                self.adopt(task)
        self._recompute(worker)

    def _recompute(self, worker: WorkerInfo) -> None:
        fenced = self.fenced_gpu_ids(worker.worker_id, list(worker.gpu_ids))
        offered = [g for g in worker.gpu_ids if g not in fenced]
        self._recompute_worker(args=[P, worker.worker_id, signature(worker), milli(worker.cpus), worker.memory,
                                     worker.slots, ",".join(offered), len(worker.gpu_ids)])

    # -- backfill claims --------------------------------------------------------------------------------
    def new_generation(self) -> str:
        return str(self.redis.incr(keys.SCHED_CLAIM_GEN))

    def end_pass(self, generation: str, worker_ids: Iterable[str]) -> None:
        ids = list(worker_ids)
        if ids:
            self._end_pass(args=[P, generation, *ids])

    # -- views ------------------------------------------------------------------------------------------
    def free(self, workers: list[WorkerInfo]) -> dict[str, FreeView]:
        """What each worker has free now (rebuilt first where missing)."""
        if not workers:
            return {}
        ids = [w.worker_id for w in workers]
        for w, fields in zip(workers, self._view(args=[P, *ids]), strict=True):
            if not fields or _text(fields[3]) != signature(w):
                self.rebuild(w)
        pipe = self.redis.pipeline(transaction=False)
        self._view(args=[P, *ids], client=pipe)
        for w in workers:
            pipe.smembers(keys.sched_gpus(w.worker_id))
            pipe.hget(keys.sched_claim(w.worker_id), "owner")
        out = pipe.execute()
        views = {}
        for i, w in enumerate(workers):
            if not out[0][i]:
                raise RuntimeError(f"placement state of worker {w.worker_id} could not be rebuilt")
            cpu, mem, slots = (int(x) for x in out[0][i][:3])
            gpu_set, owner = out[1 + 2 * i], out[2 + 2 * i]
            views[w.worker_id] = FreeView(cpu / 1000, mem, slots, sorted((_text(g) for g in gpu_set), key=gpu_order),
                                          _text(owner) if owner else None)
        return views

    def user_usage(self, user_id: str) -> dict[str, float]:
        """What ``user_id``'s reservations hold now: cpus, memory (bytes), gpus, tasks."""
        raw = self.redis.hgetall(keys.sched_user(user_id))
        got = {_text(k): int(v) for k, v in raw.items()}
        return {"cpus": got.get("cpu", 0) / 1000, "memory": got.get("mem", 0), "gpus": got.get("gpus", 0),
                "tasks": got.get("tasks", 0)}

    def usage(self) -> dict[str, float]:
        """Every user's fair-share usage (CPU-seconds), decayed to now."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.SCHED_USAGE)
        pipe.hgetall(keys.SCHED_USAGE_AT)
        pipe.time()
        raw, at, (sec, usec) = pipe.execute()
        now = sec + usec / 1e6
        out = {}
        for user, value in raw.items():
            then = float(at.get(user, now))
            decay = 2 ** (-(now - then) / self.halflife_s) if self.halflife_s > 0 and now > then else 1.0
            out[_text(user)] = float(value) * decay
        return out

    # -- reconciliation (beat) --------------------------------------------------------------------------
    def reconcile(self, workers: list[WorkerInfo], live: list[Task], grace_s: float = 60.0) -> dict[str, int]:
        """Make Redis agree with the store: release records of tasks that are no longer live (after
        ``grace_s``, so a placement in flight keeps its record), adopt live tasks that have none, and rebuild
        every worker's counters and every user's totals from the records."""
        by_id = {t.task_id: t for t in live}
        released = adopted = 0
        records: dict[str, dict[str, str]] = {}
        for key in self.redis.scan_iter(match=keys.sched_reservation("*"), count=1000):
            rec = {_text(k): _text(v) for k, v in self.redis.hgetall(key).items()}
            if rec:
                records[_text(key)[len(keys.sched_reservation("")):]] = rec
        redis_now = self.redis.time()
        now = redis_now[0] + redis_now[1] / 1e6
        for task_id, rec in records.items():
            task = by_id.get(task_id)
            current = (task is not None and str(task.attempt) == rec.get("attempt")
                       and task.worker_id == rec.get("worker"))
            old = now - float(rec.get("at", now)) > grace_s
            if not current and old and self.release(task_id, int(rec["attempt"]), rec.get("worker")):
                released += 1
        for task in live:
            found = records.get(task.task_id)
            if found is None or found.get("attempt") != str(task.attempt):
                self.adopt(task)
                adopted += 1
        for worker in workers:
            self._recompute(worker)
        registered = {w.worker_id for w in workers}
        for gone in {_text(k) for k in self.redis.hkeys(keys.SCHED_FREE)} - registered:  # removed workers
            self.redis.hdel(keys.SCHED_FREE, gone)
            self.redis.delete(keys.sched_gpus(gone), keys.sched_claim(gone))
        users = {t.user_id for t in live} | {rec.get("user", "") for rec in records.values()}
        for key in self.redis.scan_iter(match=keys.sched_user("*"), count=1000):
            users.add(_text(key)[len(keys.sched_user("")):])
        for user in filter(None, users):
            self._recompute_user(args=[P, user])
        return {"released": released, "adopted": adopted, "workers": len(workers)}


def gpu_order(gpu_id: str) -> tuple[int, str]:
    return (int(gpu_id), gpu_id) if gpu_id.isdigit() else (1 << 30, gpu_id)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
