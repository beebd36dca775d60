-- The flush callback returned: delete the batch. KEYS[1] batch key, KEYS[2] leases,
-- KEYS[3] retry, KEYS[4] owner, KEYS[5] stats. ARGV[1] batch id.
-- A late ack from a worker whose lease expired is harmless: the batch was applied (at least once)
-- and a second ack finds nothing. Returns the rows deleted.
local bkey, leases, retry, owner, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id = ARGV[1]
local n = tonumber(redis.call('HGET', bkey, 'n'))
if not n or redis.call('HEXISTS', bkey, 'dead_at') == 1 then return 0 end
local members = split_lines(redis.call('HGET', bkey, 'members'))
-- In chunks: unpack() is limited by the Lua C stack (~8000 values).
for lo = 1, n, 1000 do
  local hi = math.min(lo + 999, n)
  local rows, names, mine = {}, {}, {}
  for j = lo, hi do
    rows[#rows + 1] = bkey .. ':' .. j
    names[#names + 1] = members[j]
  end
  redis.call('DEL', unpack(rows))
  local owners = redis.call('HMGET', owner, unpack(names))
  for k, o in ipairs(owners) do
    if o == id then mine[#mine + 1] = names[k] end
  end
  if #mine > 0 then redis.call('HDEL', owner, unpack(mine)) end
end
redis.call('DEL', bkey)
redis.call('ZREM', leases, id)
redis.call('ZREM', retry, id)
redis.call('HINCRBY', stats, 'flushed', n)
return n
