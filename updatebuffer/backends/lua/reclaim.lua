-- Take one batch that needs another delivery: a failed batch whose backoff elapsed (any failed
-- batch when draining) or a batch whose lease expired (its worker died or hung).
-- KEYS[1] leases, KEYS[2] retry, KEYS[3] dead, KEYS[4] stats.
-- ARGV: base, lease ms, max attempts, drain ('1'/'0'), ids to skip (newline separated).
-- Returns {'batch', id, attempt, rows}, {'split', id}, {'dead', id} or nil.
local leases, retry, dead, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local base, lease, max_attempts, drain = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local skip = {}
for _, s in ipairs(split_lines(ARGV[5])) do skip[s] = true end
local inflight = base .. ':~f:'
local now = now_ms()
local id, from
local function pick(zset, maxscore)
  local offset = 0
  while true do
    local page = redis.call('ZRANGEBYSCORE', zset, '-inf', maxscore, 'LIMIT', offset, 50)
    if #page == 0 then return nil end
    for _, c in ipairs(page) do
      if not skip[c] then return c end
    end
    offset = offset + #page
  end
end
id = pick(retry, drain and '+inf' or now)
from = retry
if not id then
  id = pick(leases, now)
  from = leases
end
if not id then return nil end
local bkey = base .. ':~b:' .. id
local attempt = tonumber(redis.call('HGET', bkey, 'attempt'))
if not attempt then
  -- Acked meanwhile by a worker whose lease had expired: nothing left to deliver.
  redis.call('ZREM', from, id)
  return { 'gone', id }
end
local n = tonumber(redis.call('HGET', bkey, 'n'))
local members = split_lines(redis.call('HGET', bkey, 'members'))
redis.call('ZREM', from, id)
-- A batch whose lease expired may have been applied by its worker (killed after the commit,
-- before the ack), or its worker may be crashing on it: it is redelivered unchanged, with its
-- id, and not split or dead-lettered until a redelivery has run the callback and seen it raise
-- (fail.lua clears the flag). The client logs it once it exceeds max_attempts.
if from == leases then redis.call('HSET', bkey, 'expired', 1) end
local maybe_applied = redis.call('HEXISTS', bkey, 'expired') == 1
if attempt >= max_attempts and not maybe_applied then
  if n == 1 then
    -- Failed alone max_attempts times: keep it as a dead letter until replayed or purged. Its
    -- row moves out of the in-flight slot, so newer data of the same row can be claimed.
    -- pcall: a missing row hash must not leave the batch half dead-lettered.
    redis.pcall('RENAME', inflight .. members[1], bkey .. ':1')
    redis.call('ZADD', dead, now, id)
    redis.call('HSET', bkey, 'dead_at', now)
    redis.call('HINCRBY', stats, 'dead', 1)
    return { 'dead', id }
  end
  -- Split in two halves with derived ids, deliverable at once, to isolate the failing rows.
  -- The ids are the parent's plus '.0'/'.1' (updatebuffer.child_batch_id): a host's ledger
  -- recognises rows it applied under the parent (a commit reported as failed) by that lineage.
  -- The rows stay where they are (<base>:~f:<member>); only the batch records change.
  local half = math.floor((n + 1) / 2)
  local parts = { { id .. '.0', 1, half }, { id .. '.1', half + 1, n } }
  for _, part in ipairs(parts) do
    local cid, lo, hi = part[1], part[2], part[3]
    local ckey = base .. ':~b:' .. cid
    local cm = {}
    for j = lo, hi do cm[#cm + 1] = members[j] end
    redis.call('HSET', ckey, 'attempt', 0, 'n', #cm, 'members', table.concat(cm, '\n'), 'created', now)
    redis.call('ZADD', retry, 0, cid)
  end
  redis.call('DEL', bkey)
  return { 'split', id }
end
attempt = attempt + 1
redis.call('HSET', bkey, 'attempt', attempt)
redis.call('ZADD', leases, now + lease, id)
if attempt > 1 then redis.call('HINCRBY', stats, 'retries', 1) end
local out = {}
for j = 1, n do out[j] = redis.call('HGETALL', inflight .. members[j]) end
return { 'batch', id, attempt, out }
