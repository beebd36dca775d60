-- Claim up to `limit` due rows of one partition into a new in-flight batch with a lease.
-- KEYS[1] pending, KEYS[2] leases, KEYS[3] owner, KEYS[4] batch key.
-- ARGV: base, batch id, limit, max score (ms; rows first buffered at or before it are due),
--       lease ms.
-- Reading and removing a row is one atomic step here, so no update can slip between them.
-- Per page: one HMGET for the owners, one ZREM and one HSET for the claimed members; per row
-- only RENAME and HGETALL.
local pending, leases, owner, bkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local base, id, limit, maxscore, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local got, skipped = 0, 0
local members, out = {}, {}
while got < limit do
  local page = redis.call('ZRANGEBYSCORE', pending, '-inf', maxscore, 'LIMIT', skipped, math.min(limit - got, 1000))
  if #page == 0 then break end
  -- A row whose older data is still in a live batch waits, so an older `extra` can never be
  -- applied after a newer one.
  local owned = redis.call('HMGET', owner, unpack(page))
  local taken, owners = {}, {}
  for i, m in ipairs(page) do
    if owned[i] then
      skipped = skipped + 1
    else
      got = got + 1
      local dst = bkey .. ':' .. got
      redis.call('RENAME', base .. ':' .. m, dst)
      members[got] = m
      taken[#taken + 1] = m
      owners[#owners + 1] = m
      owners[#owners + 1] = id
      out[got] = redis.call('HGETALL', dst)
    end
  end
  if #taken > 0 then
    redis.call('ZREM', pending, unpack(taken))
    redis.call('HSET', owner, unpack(owners))
  end
end
if got == 0 then return nil end
local now = now_ms()
redis.call('HSET', bkey, 'attempt', 1, 'n', got, 'members', table.concat(members, '\n'), 'created', now)
redis.call('ZADD', leases, now + lease, id)
return { id, 1, out }
