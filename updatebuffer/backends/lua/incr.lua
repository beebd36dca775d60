-- KEYS[1] pending zset, KEYS[2] stats hash.  ARGV[1] base, ARGV[2] push id ('' for none),
-- ARGV[3] number of updates, then the updates (see parse_update). `first` = 0 means "now".
-- Applies every update; returns {failed...} as {index, code, field} triples (rows that failed
-- are untouched). A push id already seen (a retried push) applies nothing and returns 'dup'.
local pending, stats = KEYS[1], KEYS[2]
local base = ARGV[1]
-- Fast path for the hot shape, sent with a short ARGV: base, '!', member, canonical, column,
-- delta (one int column, count 1, first = now, not signal-only). Same effect as merge_row in
-- 3 commands (6 for a new row) instead of ~10, without building tables or defining helpers.
if ARGV[2] == '!' then
  local member = ARGV[3]
  local row = base .. ':' .. member
  local field = 'c:' .. ARGV[5]
  -- A single field needs no restore: a failed HINCRBY changes nothing.
  local r = redis.pcall('HINCRBY', row, field, ARGV[6])
  if type(r) == 'table' and r.err then return { 1, 'overflow', field } end
  -- _n counts merged updates, so it is 1 exactly when this call created the row hash; a new
  -- row hash is a new pending member (claim moves the hash and the member together). An
  -- existing row was first buffered before now: _f and the pending score stay.
  if redis.call('HINCRBY', row, '_n', 1) == 1 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('HSET', row, '_k', ARGV[4], '_f', now)
    redis.call('ZADD', pending, 'NX', now, member)
  end
  redis.call('HINCRBY', stats, 'accepted', 1)
  return {}
end
-- @lib: the shared helpers go here, after the fast path, which needs none of them (defining
-- them costs about a microsecond per call).
if ARGV[2] ~= '' then
  if not redis.call('SET', base .. ':~push:' .. ARGV[2], '1', 'NX', 'EX', 86400) then
    return 'dup'
  end
end
-- Store update `u` in the empty hash `key` field by field, in the row hash layout (a float sum
-- arrives as repr() text, which always holds a '.' or an exponent, like float_text). Not through
-- merge_row: the merge that refused the row may refuse it again for the same reason (a delta
-- that is itself out of range), and a dead letter without its row would be lost.
local function keep_raw(key, u)
  local fields = { '_k', u.canonical, '_n', u.count, '_f', u.first }
  if u.signal then fields[#fields + 1] = '_sn'; fields[#fields + 1] = u.count end
  for _, spec in ipairs({ { u.ints, 'c:' }, { u.floats, 'c:' }, { u.extra, 'e:' } }) do
    for _, item in ipairs(spec[1]) do
      fields[#fields + 1] = spec[2] .. item[1]
      fields[#fields + 1] = item[2]
    end
  end
  for _, spec in ipairs({ { u.greatest, 'g:', 'G:' }, { u.least, 'l:', 'L:' } }) do
    for _, item in ipairs(spec[1]) do
      fields[#fields + 1] = spec[2] .. item[1]
      fields[#fields + 1] = item[2]
      fields[#fields + 1] = spec[3] .. item[1]
      fields[#fields + 1] = item[3]
    end
  end
  -- In chunks: unpack() is limited by the Lua C stack (~8000 values).
  for lo = 1, #fields, 1000 do
    redis.call('HSET', key, unpack(fields, lo, math.min(lo + 999, #fields)))
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
    keep_raw(bkey .. ':1', u)
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
