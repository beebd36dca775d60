-- The flush callback raised: release the lease into the retry set after a backoff.
-- KEYS[1] batch key, KEYS[2] leases, KEYS[3] retry, KEYS[4] stats.
-- ARGV: batch id, the attempt this worker holds, backoff ms, error text.
-- Fenced by the attempt: a worker whose lease expired and was re-claimed changes nothing.
local bkey, leases, retry, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, held, backoff = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('HINCRBY', stats, 'failures', 1)
if redis.call('HGET', bkey, 'attempt') ~= held or not redis.call('ZSCORE', leases, id) then
  return 0
end
local now = now_ms()
redis.call('ZREM', leases, id)
redis.call('ZADD', retry, now + backoff, id)
redis.call('HSET', bkey, 'error', ARGV[4], 'failed_at', now)
-- This delivery ran the callback and it raised: whatever an expired lease left unknown, the
-- batch now fails for a reason of its own, so retry -> split -> dead letter resumes (a ledger
-- recognises split halves by their ids, see reclaim.lua). Without this, one crash plus one
-- poison row would keep the batch's healthy rows back forever.
redis.call('HDEL', bkey, 'expired')
return 1
