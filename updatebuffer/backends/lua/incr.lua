-- KEYS[1] pending zset, KEYS[2] stats hash.  ARGV[1] base, ARGV[2] push id ('' for none),
-- ARGV[3] number of updates, then the updates (see parse_update). `first` = 0 means "now".
-- Applies every update; returns {failed...} as {index, code, field} triples (rows that failed
-- are untouched). A push id already seen (a retried push) applies nothing and returns 'dup'.
local pending, stats = KEYS[1], KEYS[2]
local base = ARGV[1]
if ARGV[2] ~= '' then
  if not redis.call('SET', base .. ':~push:' .. ARGV[2], '1', 'NX', 'EX', 86400) then
    return 'dup'
  end
end
local n = tonumber(ARGV[3])
local now = now_ms()
local i = 4
local failed = {}
local accepted = 0
for k = 1, n do
  local u
  u, i = parse_update(ARGV, i)
  if u.first == 0 then u.first = now end
  local row = base .. ':' .. u.member
  local err = merge_row(row, u, false)
  if err and ARGV[2] ~= '' then
    -- A pushed (already acknowledged) row must not be dropped: keep it as a dead letter,
    -- with the reason, for an operator to inspect, fix and replay.
    local bid = ARGV[2] .. '.' .. k
    local bkey = base .. ':~b:' .. bid
    merge_row(bkey .. ':1', u, false)
    redis.call('HSET', bkey, 'attempt', 0, 'n', 1, 'members', u.member, 'created', now,
               'error', err[1] .. ' on ' .. err[2], 'failed_at', now, 'dead_at', now)
    redis.call('ZADD', base .. ':~dead', now, bid)
    redis.call('HINCRBY', stats, 'dead', 1)
  end
  if err then
    failed[#failed + 1] = k
    failed[#failed + 1] = err[1]
    failed[#failed + 1] = err[2]
  else
    -- NX keeps the first-buffered score: a hot row is not postponed by new updates.
    redis.call('ZADD', pending, 'NX', u.first, u.member)
    accepted = accepted + u.count
  end
end
if accepted > 0 then redis.call('HINCRBY', stats, 'accepted', accepted) end
return failed
