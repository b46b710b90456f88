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

import redis

from cloudai import keys
from cloudai.models import Quota, Task, WorkerInfo

log = logging.getLogger(__name__)

GPU_WEIGHT = 8.0  # a GPU counts as 8 CPUs in fair-share usage
MIN_CHARGE_S = 60.0  # usage charged when a task is placed (as if it ran a minute); the rest when it ends
CLAIM_TTL_S = 300  # a claim no placement pass renews (beat stopped) lapses after this
P = keys.SCHED_PREFIX

_LIB = """
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function charge(user, amount, t, hl)
  local u = tonumber(redis.call('HGET', P .. 'usage', user) or '0')
  local at = tonumber(redis.call('HGET', P .. 'usage_at', user) or t)
  if hl > 0 and t > at then u = u * math.pow(2, -(t - at) / hl) end
  redis.call('HSET', P .. 'usage', user, tostring(u + amount))
  redis.call('HSET', P .. 'usage_at', user, tostring(t))
end
-- a worker's free state is one field of the hash P..'free': cpu|mem|slots|capc|capm|caps|capg|sig, so one
-- HMGET reads every candidate (one call per worker would cost more than the placement itself)
local function decode(v)
  if not v then return nil end
  local c, m, s, cc, cm, cs, cg, sig = string.match(v,
    '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  if not c then return nil end
  return {cpu = tonumber(c), mem = tonumber(m), slots = tonumber(s), capc = tonumber(cc), capm = tonumber(cm),
          caps = tonumber(cs), capg = tonumber(cg), sig = sig}
end
local function putfree(w, f)
  redis.call('HSET', P .. 'free', w, string.format('%d|%d|%d|%d|%d|%d|%d|', f.cpu, f.mem, f.slots, f.capc,
             f.capm, f.caps, f.capg) .. f.sig)
end
local function addfree(w, dc, dm, ds)
  local f = decode(redis.call('HGET', P .. 'free', w))
  if not f then return false end
  f.cpu, f.mem, f.slots = f.cpu + dc, f.mem + dm, f.slots + ds
  putfree(w, f)
  return true
end
local function split(csv)
  local out = {}
  if csv == nil or csv == '' then return out end
  for id in string.gmatch(csv, '([^,]+)') do table.insert(out, id) end
  return out
end
"""

# ARGV: prefix, task, attempt, user, cpu (milli), mem, gpus, quota cpu/mem/gpus/tasks (-1: none), mode
# (reserve|dry), policy (spread|pack), claim generation ('' on submit: every claim binds), claim ('1': claim a
# worker when nothing fits), charge, half-life, claim ttl, weight, then the candidates as one string of lines
# alternating worker id and capacity signature (one argument: packing hundreds costs more than placing)
_PLACE = _LIB + """
local task, attempt, user = ARGV[2], ARGV[3], ARGV[4]
local cpu, mem, gpus = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local quota = {cpu = tonumber(ARGV[8]), mem = tonumber(ARGV[9]), gpus = tonumber(ARGV[10]),
               tasks = tonumber(ARGV[11])}
local mode, policy, gen, want_claim = ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local amount, hl, ttl, weight = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18]), ARGV[19]
local used = redis.call('HMGET', P .. 'user:' .. user, 'cpu', 'mem', 'gpus', 'tasks')
local want = {cpu = cpu, mem = mem, gpus = gpus, tasks = 1}
local names = {'cpu', 'mem', 'gpus', 'tasks'}
for i, f in ipairs(names) do
  local u = tonumber(used[i] or '0')
  if quota[f] >= 0 and u + want[f] > quota[f] then return {'quota', f, tostring(u), tostring(quota[f])} end
end
local init, best, best_score, own_claim = {}, nil, nil, nil
local maxc, maxm, maxg, maxs, blocked_by = -1, -1, -1, -1, ''
local claimable, claim_best = nil, nil
local claimed = {}
for _, w in ipairs(redis.call('SMEMBERS', P .. 'claimed')) do claimed[w] = true end
local lines = {}
for line in string.gmatch(ARGV[20], '([^\\n]+)') do table.insert(lines, line) end
local ids, sigs, vals = {}, {}, {}
for i = 1, #lines - 1, 2 do
  ids[#ids + 1] = lines[i]
  sigs[#sigs + 1] = lines[i + 1]
end
if #ids > 0 then vals = redis.call('HMGET', P .. 'free', unpack(ids)) end
for i, w in ipairs(ids) do
  local f = decode(vals[i])
  if not f or f.sig ~= sigs[i] then
    table.insert(init, w)
  else
    local capc, capm, caps, capg = f.capc, f.capm, f.caps, f.capg
    local rc, rm, rs = f.cpu, f.mem, f.slots
    local rg = 0
    if gpus > 0 then rg = redis.call('SCARD', P .. 'gpus:' .. w) end  -- only a GPU task looks at GPUs
    local c = {false, 0, 0, 0, false}
    if claimed[w] then
      c = redis.call('HMGET', P .. 'claim:' .. w, 'owner', 'cpu', 'mem', 'gpus', 'gen')
      if not c[1] then redis.call('SREM', P .. 'claimed', w) end  -- lapsed
    end
    local ec, em, eg, es = rc, rm, rg, rs
    local bound = false
    if c[1] == task then
      own_claim = w
    elseif c[1] and (gen == '' or c[5] == gen) then
      bound = true
      ec, em, eg, es = rc - tonumber(c[2]), rm - tonumber(c[3]), rg - tonumber(c[4]), rs - 1
    end
    if ec > maxc then maxc = ec end
    if em > maxm then maxm = em end
    if eg > maxg then maxg = eg end
    if es > maxs then maxs = es end
    if cpu <= ec and mem <= em and (gpus == 0 or gpus <= eg) and es >= 1 then
      local load = math.max(1 - (rc - cpu) / capc, 1 - (rm - mem) / capm, 1 - (rs - 1) / caps)
      if best == nil or (policy == 'pack' and load > best_score) or (policy ~= 'pack' and load < best_score) then
        best, best_score = w, load
      end
    else
      if bound and cpu <= rc and mem <= rm and gpus <= rg and rs >= 1 then blocked_by = c[1] end
      if not bound and cpu <= capc and mem <= capm and gpus <= capg and caps >= 1 then
        local deficit = math.max(0, cpu - rc) / capc + math.max(0, mem - rm) / capm
                        + math.max(0, gpus - rg) / math.max(capg, 1) + math.max(0, 1 - rs) / caps
        if c[1] == task then deficit = deficit - 1 end
        if claimable == nil or deficit < claim_best then claimable, claim_best = w, deficit end
      end
    end
  end
end
if #init > 0 then
  table.insert(init, 1, 'init')
  return init
end
if best == nil then
  local claimed = ''
  if mode == 'reserve' and want_claim == '1' and claimable ~= nil then
    if own_claim and own_claim ~= claimable then
      redis.call('DEL', P .. 'claim:' .. own_claim)
      redis.call('SREM', P .. 'claimed', own_claim)
    end
    local key = P .. 'claim:' .. claimable
    redis.call('SADD', P .. 'claimed', claimable)
    redis.call('DEL', key)
    redis.call('HSET', key, 'owner', task, 'cpu', cpu, 'mem', mem, 'gpus', gpus, 'gen', gen == '' and 's' or gen)
    redis.call('EXPIRE', key, ttl)
    claimed = claimable
  end
  return {'none', tostring(maxc), tostring(maxm), tostring(maxg), tostring(maxs), blocked_by, claimed}
end
if mode ~= 'reserve' then return {'ok', best, ''} end
local ids = redis.call('SMEMBERS', P .. 'gpus:' .. best)
table.sort(ids, function(a, b)
  local na, nb = tonumber(a), tonumber(b)
  if na and nb then return na < nb end
  if na then return true end
  if nb then return false end
  return a < b
end)
local taken = {}
for i = 1, gpus do
  taken[i] = ids[i]
  redis.call('SREM', P .. 'gpus:' .. best, ids[i])
end
local csv = table.concat(taken, ',')
addfree(best, 0 - cpu, 0 - mem, -1)
local t = now()
redis.call('HSET', P .. 'res:' .. task, 'worker', best, 'cpu', cpu, 'mem', mem, 'gpus', csv, 'ngpus', gpus,
           'user', user, 'attempt', attempt, 'at', tostring(t), 'w', weight)
redis.call('SADD', P .. 'wres:' .. best, task)
redis.call('SADD', P .. 'ures:' .. user, task)
local uk = P .. 'user:' .. user
redis.call('HINCRBY', uk, 'cpu', cpu)
redis.call('HINCRBY', uk, 'mem', mem)
redis.call('HINCRBY', uk, 'gpus', gpus)
redis.call('HINCRBY', uk, 'tasks', 1)
charge(user, amount, t, hl)
if own_claim then
  redis.call('DEL', P .. 'claim:' .. own_claim)
  redis.call('SREM', P .. 'claimed', own_claim)
end
return {'ok', best, csv}
"""

# ARGV: prefix, task, attempt ('' any), half-life, min charge seconds, GPU ids to hold back (csv)
_RELEASE = _LIB + """
local key = P .. 'res:' .. ARGV[2]
local r = redis.call('HMGET', key, 'worker', 'cpu', 'mem', 'gpus', 'ngpus', 'user', 'attempt', 'at', 'w')
if not r[1] then return 0 end
if ARGV[3] ~= '' and r[7] ~= ARGV[3] then return 0 end
local w, cpu, mem, user = r[1], tonumber(r[2]), tonumber(r[3]), r[6]
if addfree(w, cpu, mem, 1) then
  local hold = {}
  for _, id in ipairs(split(ARGV[6])) do hold[id] = true end
  for _, id in ipairs(split(r[4])) do
    if not hold[id] then redis.call('SADD', P .. 'gpus:' .. w, id) end
  end
end
redis.call('SREM', P .. 'wres:' .. w, ARGV[2])
redis.call('SREM', P .. 'ures:' .. user, ARGV[2])
local uk = P .. 'user:' .. user
redis.call('HINCRBY', uk, 'cpu', 0 - cpu)
redis.call('HINCRBY', uk, 'mem', 0 - mem)
redis.call('HINCRBY', uk, 'gpus', 0 - tonumber(r[5]))
redis.call('HINCRBY', uk, 'tasks', 0 - 1)
local t = now()
charge(user, tonumber(r[9]) * math.max(0, t - tonumber(r[8]) - tonumber(ARGV[5])), t, tonumber(ARGV[4]))
redis.call('DEL', key)
return 1
"""

# ARGV: prefix, task, attempt, worker, user, cpu, mem, gpu csv, weight. Records a reservation the store
# knows of but Redis does not (Redis restarted, a reserve whose record was lost); returns the attempt of a
# different record of the same task instead of overwriting it.
_ADOPT = _LIB + """
local key = P .. 'res:' .. ARGV[2]
local old = redis.call('HGET', key, 'attempt')
if old then
  if old == ARGV[3] then return '' end
  return old
end
local w, user, cpu, mem = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local ids = split(ARGV[8])
if addfree(w, 0 - cpu, 0 - mem, -1) then
  for _, id in ipairs(ids) do redis.call('SREM', P .. 'gpus:' .. w, id) end
end
redis.call('HSET', key, 'worker', w, 'cpu', cpu, 'mem', mem, 'gpus', ARGV[8], 'ngpus', #ids, 'user', user,
           'attempt', ARGV[3], 'at', tostring(now()), 'w', ARGV[9])
redis.call('SADD', P .. 'wres:' .. w, ARGV[2])
redis.call('SADD', P .. 'ures:' .. user, ARGV[2])
local uk = P .. 'user:' .. user
redis.call('HINCRBY', uk, 'cpu', cpu)
redis.call('HINCRBY', uk, 'mem', mem)
redis.call('HINCRBY', uk, 'gpus', #ids)
redis.call('HINCRBY', uk, 'tasks', 1)
return ''
"""

# ARGV: prefix, worker, sig, cpu, mem, slots, GPU ids offered (csv), number of GPUs. Free = capacity minus the
# worker's reservation records, in one atomic step.
_RECOMPUTE_WORKER = _LIB + """
local w = ARGV[2]
local c, m, s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local used = {}
for _, t in ipairs(redis.call('SMEMBERS', P .. 'wres:' .. w)) do
  local r = redis.call('HMGET', P .. 'res:' .. t, 'cpu', 'mem', 'gpus', 'worker')
  if not r[1] or r[4] ~= w then
    redis.call('SREM', P .. 'wres:' .. w, t)
  else
    c, m, s = c - tonumber(r[1]), m - tonumber(r[2]), s - 1
    for _, id in ipairs(split(r[3])) do used[id] = true end
  end
end
redis.call('DEL', P .. 'gpus:' .. w)
putfree(w, {cpu = c, mem = m, slots = s, capc = tonumber(ARGV[4]), capm = tonumber(ARGV[5]),
            caps = tonumber(ARGV[6]), capg = tonumber(ARGV[8]), sig = ARGV[3]})
for _, id in ipairs(split(ARGV[7])) do
  if not used[id] then redis.call('SADD', P .. 'gpus:' .. w, id) end
end
return 1
"""

# ARGV: prefix, user. The user's totals from their reservation records.
_RECOMPUTE_USER = _LIB + """
local u = ARGV[2]
local c, m, g, n = 0, 0, 0, 0
for _, t in ipairs(redis.call('SMEMBERS', P .. 'ures:' .. u)) do
  local r = redis.call('HMGET', P .. 'res:' .. t, 'cpu', 'mem', 'ngpus', 'user')
  if not r[1] or r[4] ~= u then
    redis.call('SREM', P .. 'ures:' .. u, t)
  else
    c, m, g, n = c + tonumber(r[1]), m + tonumber(r[2]), g + tonumber(r[3]), n + 1
  end
end
redis.call('DEL', P .. 'user:' .. u)
if n > 0 then redis.call('HSET', P .. 'user:' .. u, 'cpu', c, 'mem', m, 'gpus', g, 'tasks', n) end
return n
"""

# ARGV: prefix, generation, worker ids: drop the claims a placement pass did not renew.
_END_PASS = _LIB + """
local n = 0
for i = 3, #ARGV do
  local key = P .. 'claim:' .. ARGV[i]
  local g = redis.call('HGET', key, 'gen')
  if g and g ~= ARGV[2] then n = n + redis.call('DEL', key) end
  if not g or g ~= ARGV[2] then redis.call('SREM', P .. 'claimed', ARGV[i]) end
end
return n
"""


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


Outcome = Placed | NoFit | OverQuota


class Reservations:
    """The Redis side of placement. ``live_on`` lists the store's live tasks of one worker: used only to
    rebuild a worker whose Redis state is missing."""

    def __init__(self, client: redis.Redis, halflife_s: float = 7 * 86400.0,
                 live_on: Callable[[str], list[Task]] | None = None) -> None:
        self.redis = client
        self.halflife_s = halflife_s
        self.live_on = live_on
        self._place = client.register_script(_PLACE)
        self._release = client.register_script(_RELEASE)
        self._adopt = client.register_script(_ADOPT)
        self._recompute_worker = client.register_script(_RECOMPUTE_WORKER)
        self._recompute_user = client.register_script(_RECOMPUTE_USER)
        self._end_pass = client.register_script(_END_PASS)

    # -- the hook for fenced GPUs ---------------------------------------------------------------------
    def fenced_gpu_ids(self, worker_id: str) -> set[str]:
        """GPU ids of ``worker_id`` that must not be handed out although no live reservation holds them (a
        lost attempt's container may still use them). The one place that decides which GPU ids count as
        free besides the reservations: release holds these back, rebuild leaves them out."""
        return set()

    # -- placement --------------------------------------------------------------------------------------
    def place(self, task: Task, candidates: list[WorkerInfo], quota: Quota | None, policy: str = "spread",
              dry: bool = False, generation: str = "", claim: bool = False) -> Outcome:
        """Reserve the best candidate that fits ``task`` (atomically, with the quota), or say why none does.
        ``dry``: choose without reserving. ``claim``: when nothing fits, claim the worker it waits for."""
        q = quota or Quota(task.user_id)
        args: list[str | int | float] = [
            P, task.task_id, task.attempt, task.user_id, milli(task.req_cpu), task.memory_bytes, task.req_gpu,
            -1 if q.cpus is None else milli(q.cpus), -1 if q.memory is None else q.memory,
            -1 if q.gpus is None else q.gpus, -1 if q.tasks is None else q.tasks,
            "dry" if dry else "reserve", policy, generation, "1" if claim else "0",
            repr(weight(task) * MIN_CHARGE_S), repr(self.halflife_s), CLAIM_TTL_S, repr(weight(task)),
        ]
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        args.append("\n".join(f"{w.worker_id}\n{signature(w)}" for w in ordered))
        by_id = {w.worker_id: w for w in candidates}
        for _ in range(3):
            out = [_text(x) for x in self._place(args=args)]
            if out[0] != "init":
                break
            for worker_id in out[1:]:
                self.rebuild(by_id[worker_id])
        if out[0] == "ok":
            return Placed(out[1], [g for g in out[2].split(",") if g])
        if out[0] == "quota":
            return OverQuota(out[1], float(out[2]), float(out[3]))
        if out[0] == "none":
            return NoFit(max(0.0, int(out[1]) / 1000), max(0, int(out[2])), max(0, int(out[3])),
                         max(0, int(out[4])), out[5], out[6])
        raise RuntimeError(f"placement state of workers {out[1:]} could not be rebuilt")

    def release(self, task_id: str, attempt: int | None = None, worker_id: str | None = None) -> bool:
        """Give back what ``task_id`` holds (only for ``attempt`` when given); idempotent. Every path that
        ends a task's hold (finish, cancel, lost, requeue) calls this."""
        hold = ",".join(sorted(self.fenced_gpu_ids(worker_id))) if worker_id else ""
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
        offered = [g for g in worker.gpu_ids if g not in self.fenced_gpu_ids(worker.worker_id)]
        self._recompute_worker(args=[P, worker.worker_id, signature(worker), milli(worker.cpus), worker.memory,
                                     worker.slots, ",".join(offered), len(worker.gpu_ids)])

    # -- backfill claims --------------------------------------------------------------------------------
    def new_generation(self) -> str:
        return str(self.redis.incr(keys.SCHED_CLAIM_GEN))

    def end_pass(self, generation: str, worker_ids: Iterable[str]) -> None:
        ids = list(worker_ids)
        if ids:
            self._end_pass(args=[P, generation, *ids])

    def drop_claims_of(self, task_id: str, worker_ids: Iterable[str]) -> None:
        """A claimant that left the queue (cancelled): its claims stop holding resources now."""
        for w in worker_ids:
            if _text(self.redis.hget(keys.sched_claim(w), "owner") or "") == task_id:
                self.redis.delete(keys.sched_claim(w))
                self.redis.srem(keys.SCHED_CLAIMED, w)

    # -- views ------------------------------------------------------------------------------------------
    def free(self, workers: list[WorkerInfo]) -> dict[str, FreeView]:
        """What each worker has free now (rebuilt first where missing)."""
        if not workers:
            return {}
        ids = [w.worker_id for w in workers]
        raw = [_text(v).split("|", 7) if v else None for v in self.redis.hmget(keys.SCHED_FREE, ids)]
        for w, fields in zip(workers, raw, strict=True):
            if fields is None or len(fields) < 8 or fields[7] != signature(w):
                self.rebuild(w)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(keys.SCHED_FREE, ids)
        for w in workers:
            pipe.smembers(keys.sched_gpus(w.worker_id))
            pipe.hget(keys.sched_claim(w.worker_id), "owner")
        out = pipe.execute()
        views = {}
        for i, w in enumerate(workers):
            cpu, mem, slots = (int(x) for x in _text(out[0][i]).split("|")[:3])
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
