"""The Redis Streams queue's keys and the Lua scripts that change them (redis_streams.py runs them).

Keys, all under the queue name P (one Redis, not a cluster: the scripts derive a job's keys from its id), with
one work stream and waiting set per model M, so a worker reads only the jobs of the models it serves:
    P:work:M             stream of {job: id, spec: JSON, at: enqueue time}; consumer group "workers" reads it
                         with XREADGROUP (the spec lets a worker start before its claim script settles); entries
                         are acknowledged when their job ends and trimmed from the head, never deleted one by one
                         (TRIM_WORK: the group's lag, which autoscalers read, stays defined)
    P:waiting:M          sorted set of queued, never-claimed job ids by enqueue order: depth and queue position
    P:deadlines:M        sorted set of the ids of queued jobs with a deadline, by deadline, for EXPIRE_QUEUED; an
                         id leaves it with its waiting-set entry (claimed, cancelled, ended) or when that script
                         sees it due
    P:enqueued           counter giving those scores
    P:dead               dead-letter stream: {job, entry, deliveries, worker} of jobs abandoned too often
    P:job:ID             hash: state, model, spec (JSON), deadline, created_at, updated_at, entry (work stream id),
                         owner (token of the current claim; '' never claimed, '-' handed back), worker,
                         heartbeat, deliveries, error, cancel, seq, wrote (id of the last publish or finish, so
                         a retry of it is not applied twice), tenant ('' without authentication)
    P:job:ID:events      stream of the job's events with explicit ids 0-1, 0-2, ... so sequence = id - 1;
                         field e = encode_event bytes, or q = position for the Queued event the enqueue script
                         writes, or s = attempt and w = worker for the Started event a claim(start=True) writes
    P:idem:SHA           job id for sha256(scope, idempotency key) (scope: the tenant, else the caller), SET NX
                         semantics; expires with the job (its hash names it in `idem`, beside `fp`, the request's
                         fingerprint)
    P:tenant:T:jobs      set of the ids of tenant T's jobs enqueued with an in-flight limit; the enqueue script
                         drops those that ended or expired before it counts them; expires with its last job
    P:rate:T             hash: tokens, at (ms): tenant T's token bucket (TAKE_TOKEN); expires once full again
    P:workers:M          sorted set of the workers serving M by the time of their last announce (every heartbeat
                         interval); expires the visibility timeout after the last one
    P:cancel             pub/sub channel: the cancel script publishes the id of a running job whose flag it raised
The per-job keys (and a job's idempotency key) expire result_ttl_s after their last write. Every check-then-write
on a job runs in one Lua script, so ownership, the at-most-once finish and cancelling a queued job cannot race.
"""

# Shared by the scripts below. KEYS[1] job hash, KEYS[2] its event stream, KEYS[3] its model's work stream, KEYS[4]
# its model's waiting zset, KEYS[5] its model's deadlines zset; TTL in ms and `now` come from the caller so every
# script is deterministic.
# Work entries are acknowledged, never XDEL'ed: an entry deleted ahead of the group's last delivered one makes Redis
# report the group's lag as NULL (XINFO GROUPS), which KEDA's redis-streams trigger reads as 0, so a pool at zero
# would never wake for the jobs behind it. Instead the stream is trimmed from its head (XTRIM MINID leaves no
# tombstone) up to the oldest entry still needed: pending (delivered, not yet acknowledged) or never delivered. An
# entry whose job ended while it waited (cancelled, expired) stays until a worker's read delivers it; the claim
# script then finds the job terminal and drops it. KEYS[3] the work stream.
TRIM_WORK = """
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function trim_work(group)
  local groups = redis.pcall('XINFO', 'GROUPS', KEYS[3])
  if type(groups) ~= 'table' or groups.err then return end  -- no stream: nothing to trim
  local last, pending = nil, 0
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then last, pending = info['last-delivered-id'], tonumber(info['pending']) end
  end
  if not last then return end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  local keep = ms .. '-' .. string.format('%.0f', tonumber(seq) + 1)  -- the first entry not yet delivered
  if pending > 0 then
    local oldest = redis.call('XPENDING', KEYS[3], group)[2]
    if id_less(oldest, keep) then keep = oldest end
  end
  redis.call('XTRIM', KEYS[3], 'MINID', keep)
end
"""

PRELUDE = TRIM_WORK + """
local function is_terminal(state)
  return state == 'completed' or state == 'failed' or state == 'cancelled'
end
local function touch(ttl)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  local idem = redis.call('HGET', KEYS[1], 'idem')
  if idem and idem ~= '' then redis.call('PEXPIRE', idem, ttl) end
end
local function append(field, value)
  local n = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], '0-' .. n, field, value)
end
local function drop_entry(group, entry, job_id)
  redis.call('XACK', KEYS[3], group, entry)
  trim_work(group)
  redis.call('ZREM', KEYS[4], job_id)
  redis.call('ZREM', KEYS[5], job_id)
end
-- the terminal event, the state and the acknowledgement in one step: the at-most-once finish
local function terminate(event, state, err, now, ttl, group, job_id)
  append('e', event)
  redis.call('HSET', KEYS[1], 'state', state, 'error', err, 'updated_at', now)
  drop_entry(group, redis.call('HGET', KEYS[1], 'entry'), job_id)
  touch(ttl)
end
"""

# KEYS[6] idempotency key, KEYS[7] score counter, KEYS[8] the tenant's set of jobs in flight. ARGV: id, spec,
# model, deadline, now, ttl, max depth, use idempotency (1/0), job key prefix, request fingerprint, tenant, the
# tenant's max jobs in flight (0: no limit, and the job is not put in the set). A key already used for another
# request (another fingerprint) is a conflict.
ENQUEUE = PRELUDE + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'existing', ARGV[1]} end  -- a retry of this very call
if ARGV[8] == '1' then
  local existing = redis.call('GET', KEYS[6])
  if existing and redis.call('EXISTS', ARGV[9] .. existing) == 1 then
    if redis.call('HGET', ARGV[9] .. existing, 'fp') ~= ARGV[10] then return {'conflict', existing} end
    return {'existing', existing}
  end
end
if ARGV[12] ~= '0' then
  local live = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[8])) do
    local s = redis.call('HGET', ARGV[9] .. id, 'state')
    if s and not is_terminal(s) then live = live + 1 else redis.call('SREM', KEYS[8], id) end
  end
  if live >= tonumber(ARGV[12]) then return {'busy', live} end
end
local depth = redis.call('ZCARD', KEYS[4])
if depth >= tonumber(ARGV[7]) then return {'full', depth} end
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[7]), ARGV[1])
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1]) end
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[1], 'spec', ARGV[2], 'at', ARGV[5])
redis.call('HSET', KEYS[1], 'state', 'queued', 'model', ARGV[3], 'spec', ARGV[2], 'deadline', ARGV[4],
           'created_at', ARGV[5], 'updated_at', ARGV[5], 'entry', entry, 'owner', '', 'worker', '',
           'heartbeat', '', 'deliveries', 0, 'error', '', 'cancel', 0, 'seq', 0, 'tenant', ARGV[11])
if ARGV[12] ~= '0' then
  redis.call('SADD', KEYS[8], ARGV[1])
  redis.call('PEXPIRE', KEYS[8], ARGV[6])
end
if ARGV[8] == '1' then
  redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[6])
  redis.call('HSET', KEYS[1], 'idem', KEYS[6], 'fp', ARGV[10])
end
append('q', depth)
touch(ARGV[6])
return {'new', tostring(depth)}
"""

# ARGV: entry, group, token, worker, now, ttl, job id, start (1/0), max deliveries. Returns false when the entry
# is stale (job expired or already terminal, e.g. cancelled while queued), else {deliveries, spec, cancel,
# created_at, started, resumed (1: held before, by a worker that died or handed it back), seq (the job's event
# count: the claim's writes continue from it)}. With start = 1 and
# nothing against handing the job out (claim_verdict's three tests, on the same `now`), the Started event is
# appended and the job is running: started = 1. The same token again (a retry after a lost reply) gets the same
# answer with nothing applied twice: no second delivery, no second Started event.
CLAIM = PRELUDE + """
local state = redis.call('HGET', KEYS[1], 'state')
if (not state) or is_terminal(state) then
  drop_entry(ARGV[2], ARGV[1], ARGV[7])
  return false
end
if redis.call('HGET', KEYS[1], 'owner') == ARGV[3] then
  local h = redis.call('HMGET', KEYS[1], 'deliveries', 'spec', 'cancel', 'created_at', 'claim_started',
                       'claim_resumed')
  return {tonumber(h[1]), h[2], h[3], h[4], tonumber(h[5]) or 0, tonumber(h[6]) or 0,
          tonumber(redis.call('HGET', KEYS[1], 'seq'))}
end
-- The entry must still be this worker's: a claim retried through a blip may find it reclaimed by another
-- worker meanwhile (XAUTOCLAIM), which now runs the job. Not ours: nothing changes, the entry stays.
local pending = redis.call('XPENDING', KEYS[3], ARGV[2], ARGV[1], ARGV[1], 1)
if pending[1] == nil or pending[1][2] ~= ARGV[4] then
  return false
end
local n = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
local resumed = 0
if redis.call('HGET', KEYS[1], 'owner') ~= '' then resumed = 1 end
redis.call('ZREM', KEYS[4], ARGV[7])
redis.call('ZREM', KEYS[5], ARGV[7])
redis.call('HSET', KEYS[1], 'owner', ARGV[3], 'worker', ARGV[4], 'heartbeat', ARGV[5], 'updated_at', ARGV[5])
local cancel = redis.call('HGET', KEYS[1], 'cancel')
local deadline = redis.call('HGET', KEYS[1], 'deadline')
local started = 0
if ARGV[8] == '1' and cancel ~= '1' and n <= tonumber(ARGV[9])
    and (deadline == '' or tonumber(ARGV[5]) < tonumber(deadline)) then
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], '0-' .. seq, 's', n, 'w', ARGV[4])
  redis.call('HSET', KEYS[1], 'state', 'running')
  started = 1
end
redis.call('HSET', KEYS[1], 'claim_started', started, 'claim_resumed', resumed)
touch(ARGV[6])
return {n, redis.call('HGET', KEYS[1], 'spec'), cancel, redis.call('HGET', KEYS[1], 'created_at'), started,
        resumed, tonumber(redis.call('HGET', KEYS[1], 'seq'))}
"""

# out_of_step: `seq` (the job's event count the caller's write is to leave, '' to write wherever the stream is) is
# not the next one: the job's events are not where this claim left them. Only the job's owner appends to them while
# it holds the job, so this means Redis lost some of the claim's own writes it had acknowledged (restarted from an
# append-only file missing its last second, or a replica promoted before it had them): the caller writes them again
# first (redis_rewrite.py).
OWNED = """
local function owned(token)
  local owner = redis.call('HGET', KEYS[1], 'owner')
  return owner == token and not is_terminal(redis.call('HGET', KEYS[1], 'state'))
end
local function out_of_step(seq)
  return seq ~= '' and tonumber(redis.call('HGET', KEYS[1], 'seq')) + 1 ~= tonumber(seq)
end
"""

# ARGV: token, event bytes, '1' if Started, now, ttl, write id, seq. Returns a Published value: 0 lost, 1 ok, 2 ok
# + cancel flag; 3 nothing written, the job's events are out of step with the claim's (see OWNED). The write id
# (fresh per publish, the same on its retries) makes a retry after a lost reply a no-op: a job's writes are
# sequential, so the hash keeps only the last one's.
PUBLISH = PRELUDE + OWNED + """
local function verdict()
  if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
  return 1
end
if redis.call('HGET', KEYS[1], 'wrote') == ARGV[6] then return verdict() end
if not owned(ARGV[1]) then return 0 end
if out_of_step(ARGV[7]) then return 3 end
append('e', ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'state', 'running') end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4], 'wrote', ARGV[6])
touch(ARGV[5])
return verdict()
"""

# KEYS[6] dead-letter stream. ARGV: token, event bytes, state, error, now, ttl, group, job id, dead-letter (1/0),
# dead-letter stream max length, write id (as PUBLISH's: a retried finish whose first attempt landed returns 1), seq
# (as PUBLISH's: 3, nothing written, when the job's events are out of step with the claim's).
FINISH = PRELUDE + OWNED + """
if redis.call('HGET', KEYS[1], 'wrote') == ARGV[11] then return 1 end
if not owned(ARGV[1]) then return 0 end
if out_of_step(ARGV[12]) then return 3 end
redis.call('HSET', KEYS[1], 'wrote', ARGV[11])
if ARGV[9] == '1' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[10], '*', 'job', ARGV[8],
             'entry', redis.call('HGET', KEYS[1], 'entry'), 'deliveries', redis.call('HGET', KEYS[1], 'deliveries'),
             'worker', redis.call('HGET', KEYS[1], 'worker'))
end
terminate(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""

# ARGV: token, now, ttl, group, worker, idle ms, job id. The job is queued again, first in line (it counts toward
# the depth an autoscaler reads, can be cancelled at once, and fails if its deadline passes while it waits), keeping
# its events; its owner is '-' (held before: not "never claimed"), this delivery is taken back, and its work entry
# looks idle for `idle ms` (the visibility timeout), so the next reclaim scan of any worker takes it. 0 when the
# claim no longer holds the job, 1 done, 2 cancelled instead (its cancel flag was up: nobody would act on it).
# ARGV[8], ARGV[9]: the Failed(CANCELLED) event bytes and error.
HAND_BACK = PRELUDE + OWNED + """
if not owned(ARGV[1]) then return 0 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  terminate(ARGV[8], 'cancelled', ARGV[9], ARGV[2], ARGV[3], ARGV[4], ARGV[7])
  return 2
end
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'owner', '-', 'worker', '', 'heartbeat', '', 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[4], 0, ARGV[7])
local deadline = redis.call('HGET', KEYS[1], 'deadline')
if deadline and deadline ~= '' then redis.call('ZADD', KEYS[5], deadline, ARGV[7]) end
redis.call('XCLAIM', KEYS[3], ARGV[4], ARGV[5], 0, redis.call('HGET', KEYS[1], 'entry'), 'IDLE', ARGV[6], 'JUSTID')
touch(ARGV[3])
return 1
"""

# ARGV: Failed(CANCELLED) bytes, error, now, ttl, group, job id, cancel channel. -1 unknown job, 0 already terminal,
# 1 cancelled while never claimed (terminal now), 2 held by a worker (cancel flag raised, and published).
CANCEL = PRELUDE + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return -1 end
if is_terminal(redis.call('HGET', KEYS[1], 'state')) then return 0 end
if owner == '' or owner == '-' then  -- never claimed, or handed back: nobody holds it
  terminate(ARGV[1], 'cancelled', ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
  return 1
end
redis.call('HSET', KEYS[1], 'cancel', 1, 'updated_at', ARGV[3])
touch(ARGV[4])
redis.call('PUBLISH', ARGV[7], ARGV[6])
return 2
"""

# A job that ended, deleted before its keys expire: its hash, its events and its idempotency key (where that still
# names it). ARGV: job id. {'gone', ''} no such job, {'busy', state} not ended (nothing deleted), {'deleted', state}.
# A work entry of the job still undelivered (cancelled while queued) is dropped by the claim script, which finds
# no hash.
DELETE = PRELUDE + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'gone', ''} end
if not is_terminal(state) then return {'busy', state} end
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and idem ~= '' and redis.call('GET', idem) == ARGV[1] then redis.call('DEL', idem) end
redis.call('DEL', KEYS[1], KEYS[2])
return {'deleted', state}
"""

# A token bucket: KEYS[1] its hash (tokens, at: ms). ARGV: tokens per second (> 0), burst (the most it holds).
# Returns 0 when a token was taken, else the ms until one is there. The time is Redis' own (TIME), not the
# caller's: the fronts share every bucket and their clocks may disagree (a script is replicated by its effects, so
# reading the time in it is allowed). A full bucket's key expires: an idle tenant leaves nothing behind.
TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(h[1]), tonumber(h[2])
if not tokens or not at then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""

# ARGV: token, now, ttl, group, worker. XCLAIM by the same consumer resets the entry's idle time, which is what
# keeps XAUTOCLAIM in other workers' claim() off a job that is slow but alive. 0 lost, 1 ok, 2 ok + cancel flag.
HEARTBEAT = PRELUDE + OWNED + """
if not owned(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat', ARGV[2], 'updated_at', ARGV[2])
redis.call('XCLAIM', KEYS[3], ARGV[4], ARGV[5], 0, redis.call('HGET', KEYS[1], 'entry'), 'JUSTID')
touch(ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
return 1
"""


# Fail the queued jobs of one model whose deadline passed (they would otherwise stay queued, and count toward the
# depth and its limit, until a worker of the model came to claim them), and drop waiting ids whose job records
# expired. KEYS[1] waiting zset, KEYS[2] deadlines zset, KEYS[3] work stream. ARGV: now, ttl, job key prefix,
# Failed(DEADLINE_EXCEEDED) bytes, error, most jobs per call, group. Returns how many jobs it failed (handed-back
# ones included). A job delivered to a worker whose claim script has not run yet is still unowned: that script then
# finds it terminal and drops it.
EXPIRE_QUEUED = TRIM_WORK + """
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[6]))) do
  local job = ARGV[3] .. id
  redis.call('ZREM', KEYS[2], id)
  local state, owner = unpack(redis.call('HMGET', job, 'state', 'owner'))
  if not state then
    redis.call('ZREM', KEYS[1], id)
  elseif state == 'queued' and (owner == '' or owner == '-') then
    local seq = redis.call('HINCRBY', job, 'seq', 1)
    redis.call('XADD', job .. ':events', '0-' .. seq, 'e', ARGV[4])
    redis.call('HSET', job, 'state', 'failed', 'error', ARGV[5], 'updated_at', ARGV[1])
    redis.call('XACK', KEYS[3], ARGV[7], redis.call('HGET', job, 'entry'))  -- a handed-back job's was delivered
    redis.call('ZREM', KEYS[1], id)
    redis.call('PEXPIRE', job, ARGV[2])
    redis.call('PEXPIRE', job .. ':events', ARGV[2])
    local idem = redis.call('HGET', job, 'idem')
    if idem and idem ~= '' then redis.call('PEXPIRE', idem, ARGV[2]) end
    n = n + 1
  end
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, 9)) do  -- the oldest waiting ids: records expired?
  if redis.call('EXISTS', ARGV[3] .. id) == 0 then redis.call('ZREM', KEYS[1], id) end
end
if n > 0 then trim_work(ARGV[7]) end
return n
"""
