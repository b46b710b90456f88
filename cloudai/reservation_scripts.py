"""The Lua scripts of :mod:`cloudai.reservations`: each runs atomically in Redis, so a reservation is checked
and taken (or given back) in one step that no other placement can interleave with. Key names come from
:data:`cloudai.keys.SCHED_PREFIX`, passed as ARGV[1] (so one script serves any worker: a single Redis, not
Redis Cluster). They read Redis's own clock (TIME) before writing, which needs Redis 5 or later."""

LIB = """
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
-- a worker's free state is one field of the hash P..'free' (one HMGET reads every candidate): the tag 'F1',
-- then free cpu, mem, slots and capacity cpu, mem, slots, gpus as 7 big-endian doubles (struct), then the
-- capacity signature. One struct.unpack decodes a worker; a text format's pattern match and seven tonumber()
-- cost six times as much, on every candidate of every placement. A value in any other format reads as missing,
-- so the worker is rebuilt (and rewritten in this format) on first use.
local FREE_TAG, FREE_FMT = 'F1', '>ddddddd'
local function unpackfree(v)  -- cpu, mem, slots, capc, capm, caps, capg, sig; nil when missing or foreign
  if not v or #v < 58 or string.sub(v, 1, 2) ~= FREE_TAG then return nil end
  local c, m, s, cc, cm, cs, cg, pos = struct.unpack(FREE_FMT, v, 3)
  return c, m, s, cc, cm, cs, cg, string.sub(v, pos)
end
local function decode(v)
  local c, m, s, cc, cm, cs, cg, sig = unpackfree(v)
  if not c then return nil end
  return {cpu = c, mem = m, slots = s, capc = cc, capm = cm, caps = cs, capg = cg, sig = sig}
end
local function putfree(w, f)
  redis.call('HSET', P .. 'free', w, FREE_TAG .. struct.pack(FREE_FMT, f.cpu, f.mem, f.slots, f.capc, f.capm,
             f.caps, f.capg) .. f.sig)
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
# alternating worker id and capacity signature (one argument: packing hundreds costs more than placing), then
# the exact GPU ids the task asks for (csv; '': any ids, as many as gpus)
PLACE = LIB + """
local task, attempt, user = ARGV[2], ARGV[3], ARGV[4]
local cpu, mem, gpus = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local quota = {cpu = tonumber(ARGV[8]), mem = tonumber(ARGV[9]), gpus = tonumber(ARGV[10]),
               tasks = tonumber(ARGV[11])}
local mode, policy, gen, want_claim = ARGV[12], ARGV[13], ARGV[14], ARGV[15]
local amount, hl, ttl, weight = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18]), ARGV[19]
local want_ids = split(ARGV[21])
local used = redis.call('HMGET', P .. 'user:' .. user, 'cpu', 'mem', 'gpus', 'tasks')
local want = {cpu = cpu, mem = mem, gpus = gpus, tasks = 1}
local names = {'cpu', 'mem', 'gpus', 'tasks'}
for i, f in ipairs(names) do
  local u = tonumber(used[i] or '0')
  if quota[f] >= 0 and u + want[f] > quota[f] then return {'quota', f, tostring(u), tostring(quota[f])} end
end
-- a task holds at most one reservation: a second pass placing the same task (or a stale record of a lost
-- release, which beat's reconciliation removes) must not count it twice
if mode == 'reserve' and redis.call('EXISTS', P .. 'res:' .. task) == 1 then return {'held'} end
local init, best, best_score, own_claim = {}, nil, nil, nil
local maxc, maxm, maxg, maxs, blocked_by = -1, -1, -1, -1, ''
local claimable, claim_best = nil, nil
local claimed = {}
for _, w in ipairs(redis.call('SMEMBERS', P .. 'claimed')) do claimed[w] = true end
local ids, sigs, vals = {}, {}, {}
for id, sig in string.gmatch(ARGV[20], '([^\\n]+)\\n([^\\n]+)') do
  ids[#ids + 1] = id
  sigs[#sigs + 1] = sig
end
if #ids > 0 then vals = redis.call('HMGET', P .. 'free', unpack(ids)) end
-- the loop below runs for every candidate on every placement: no table per worker (decode() builds one,
-- which would cost more than all the rest of a worker's turn), no string made per worker (the tag is checked
-- by its bytes, the signature found in place), library functions held in locals, and claims are read only
-- where there are any
local no_claim = {false, 0, 0, 0, false}
local sunpack, sbyte, sfind, mmax = struct.unpack, string.byte, string.find, math.max
local TAG1, TAG2 = string.byte(FREE_TAG, 1, 2)
local best_i, bc, bm, bs, bcc, bcm, bcs, bcg = nil, 0, 0, 0, 0, 0, 0, 0  -- the best worker's free state
for i, w in ipairs(ids) do
  local v, want_sig = vals[i], sigs[i]
  local rc, rm, rs, capc, capm, caps, capg
  if v and #v == 58 + #want_sig and sbyte(v, 1) == TAG1 and sbyte(v, 2) == TAG2
     and sfind(v, want_sig, 59, true) == 59 then
    rc, rm, rs, capc, capm, caps, capg = sunpack(FREE_FMT, v, 3)
  end
  if not rc then
    table.insert(init, w)
  else
    local rg = 0
    if gpus > 0 then  -- only a GPU task looks at GPUs; one that names its ids counts only those free
      if #want_ids > 0 then
        for _, id in ipairs(want_ids) do rg = rg + redis.call('SISMEMBER', P .. 'gpus:' .. w, id) end
      else
        rg = redis.call('SCARD', P .. 'gpus:' .. w)
      end
    end
    local c = no_claim
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
      local load = mmax(1 - (rc - cpu) / capc, 1 - (rm - mem) / capm, 1 - (rs - 1) / caps)
      if best == nil or (policy == 'pack' and load > best_score) or (policy ~= 'pack' and load < best_score) then
        best, best_score, best_i = w, load, i
        bc, bm, bs, bcc, bcm, bcs, bcg = rc, rm, rs, capc, capm, caps, capg
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
local ids = want_ids
if #ids == 0 then ids = redis.call('SMEMBERS', P .. 'gpus:' .. best) end
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
-- the best worker's free state as read above (nothing changed it since: the script is atomic), less the task
redis.call('HSET', P .. 'free', best, FREE_TAG .. struct.pack(FREE_FMT, bc - cpu, bm - mem, bs - 1, bcc, bcm, bcs,
           bcg) .. sigs[best_i])
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
RELEASE = LIB + """
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
ADOPT = LIB + """
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
RECOMPUTE_WORKER = LIB + """
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
RECOMPUTE_USER = LIB + """
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
END_PASS = LIB + """
local n = 0
for i = 3, #ARGV do
  local key = P .. 'claim:' .. ARGV[i]
  local g = redis.call('HGET', key, 'gen')
  if g and g ~= ARGV[2] then n = n + redis.call('DEL', key) end
  if not g or g ~= ARGV[2] then redis.call('SREM', P .. 'claimed', ARGV[i]) end
end
return n
"""

# ARGV: prefix, worker ids. Each worker's free cpu, mem, slots (integer text) and capacity signature, or an
# empty list where its state is missing: the stored value is binary (see LIB), which a client that decodes
# replies as text can't read.
VIEW = LIB + """
local out = {}
for i = 2, #ARGV do
  local c, m, s, _, _, _, _, sig = unpackfree(redis.call('HGET', P .. 'free', ARGV[i]))
  if c then
    out[#out + 1] = {string.format('%d', c), string.format('%d', m), string.format('%d', s), sig}
  else
    out[#out + 1] = {}
  end
end
return out
"""
