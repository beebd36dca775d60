-- Claim up to `limit` due rows of one partition into a new in-flight batch with a lease.
-- KEYS[1] pending, KEYS[2] leases, KEYS[3] owner, KEYS[4] batch key.
-- ARGV: base, batch id, limit, max score (ms; rows first buffered at or before it are due),
--       lease ms.
-- Reading and removing a row is one atomic step here, so no update can slip between them.
local pending, leases, owner, bkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local base, id, limit, maxscore, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local got, skipped = 0, 0
local members, out = {}, {}
while got < limit do
  local page = redis.call('ZRANGEBYSCORE', pending, '-inf', maxscore, 'LIMIT', skipped, limit - got)
  if #page == 0 then break end
  for _, m in ipairs(page) do
    -- A row whose older data is still in a live batch waits, so an older `extra` can never be
    -- applied after a newer one.
    if redis.call('HEXISTS', owner, m) == 1 then
      skipped = skipped + 1
    else
      got = got + 1
      local dst = bkey .. ':' .. got
      redis.call('RENAME', base .. ':' .. m, dst)
      redis.call('ZREM', pending, m)
      redis.call('HSET', owner, m, id)
      members[got] = m
      out[#out + 1] = redis.call('HGETALL', dst)
    end
  end
end
if got == 0 then return nil end
local now = now_ms()
redis.call('HSET', bkey, 'attempt', 1, 'n', got, 'members', table.concat(members, '\n'), 'created', now)
redis.call('ZADD', leases, now + lease, id)
return { id, 1, out }
