-- Claim up to `limit` due rows of one partition into a new in-flight batch with a lease.
-- KEYS[1] pending, KEYS[2] leases, KEYS[3] batch key.
-- ARGV: base, batch id, limit, max score (ms; rows first buffered at or before it are due),
--       lease ms.
-- Reading and removing a row is one atomic step here, so no update can slip between them. A
-- claimed row hash moves to <base>:~f:<member> until its batch is acknowledged; per row that is
-- one RENAMENX and one HGETALL, per page one ZREM.
local pending, leases, bkey = KEYS[1], KEYS[2], KEYS[3]
local base, id, limit, maxscore, lease = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local inflight = base .. ':~f:'
local got, skipped = 0, 0
local members, out = {}, {}
while got < limit do
  local page = redis.call('ZRANGEBYSCORE', pending, '-inf', maxscore, 'LIMIT', skipped, math.min(limit - got, 1000))
  if #page == 0 then break end
  local gone = {}
  for _, m in ipairs(page) do
    local f = inflight .. m
    -- RENAMENX refuses while the row's older data is still in flight: the row waits, so an
    -- older `extra` can never be applied after a newer one.
    local r = redis.pcall('RENAMENX', base .. ':' .. m, f)
    if r == 1 then
      got = got + 1
      members[got] = m
      gone[#gone + 1] = m
      out[got] = redis.call('HGETALL', f)
    elseif r == 0 then
      skipped = skipped + 1
    else
      -- No row hash behind the member (never written by these scripts): drop the member
      -- instead of failing the claim of every other row.
      gone[#gone + 1] = m
    end
  end
  if #gone > 0 then redis.call('ZREM', pending, unpack(gone)) end
end
if got == 0 then return nil end
local now = now_ms()
redis.call('HSET', bkey, 'attempt', 1, 'n', got, 'members', table.concat(members, '\n'), 'created', now)
redis.call('ZADD', leases, now + lease, id)
return { id, 1, out }
