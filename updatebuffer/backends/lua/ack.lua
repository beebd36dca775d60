-- The flush callback returned: delete the batch. KEYS[1] batch key, KEYS[2] leases,
-- KEYS[3] retry, KEYS[4] owner, KEYS[5] stats. ARGV[1] batch id.
-- A late ack from a worker whose lease expired is harmless: the batch was applied (at least once)
-- and a second ack finds nothing. Returns the rows deleted.
local bkey, leases, retry, owner, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id = ARGV[1]
local n = tonumber(redis.call('HGET', bkey, 'n'))
if not n or redis.call('HEXISTS', bkey, 'dead_at') == 1 then return 0 end
local members = split_lines(redis.call('HGET', bkey, 'members'))
for j = 1, n do
  redis.call('DEL', bkey .. ':' .. j)
  if redis.call('HGET', owner, members[j]) == id then redis.call('HDEL', owner, members[j]) end
end
redis.call('DEL', bkey)
redis.call('ZREM', leases, id)
redis.call('ZREM', retry, id)
redis.call('HINCRBY', stats, 'flushed', n)
return n
