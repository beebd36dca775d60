-- The flush callback returned: delete the batch and its rows. KEYS[1] batch key, KEYS[2] leases,
-- KEYS[3] retry, KEYS[4] stats. ARGV[1] base, ARGV[2] batch id.
-- A late ack from a worker whose lease expired is harmless: the batch was applied (at least once)
-- and a second ack finds nothing. Returns the rows deleted.
local bkey, leases, retry, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local inflight, id = ARGV[1] .. ':~f:', ARGV[2]
local meta = redis.call('HMGET', bkey, 'n', 'dead_at', 'members')
local n = tonumber(meta[1])
if not n or meta[2] then return 0 end
local members = split_lines(meta[3])
-- In chunks: unpack() is limited by the Lua C stack (~8000 values).
for lo = 1, n, 1000 do
  local rows = {}
  for j = lo, math.min(lo + 999, n) do rows[#rows + 1] = inflight .. members[j] end
  redis.call('DEL', unpack(rows))
end
redis.call('DEL', bkey)
redis.call('ZREM', leases, id)
redis.call('ZREM', retry, id)
redis.call('HINCRBY', stats, 'flushed', n)
return n
