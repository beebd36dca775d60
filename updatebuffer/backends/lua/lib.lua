-- Shared helpers, inserted into every updatebuffer script (at its "-- @lib" line, else on top).
-- Keys of one partition share the hash tag in `base` (<prefix>:<version>:{<tag>}), so every
-- key a script touches lives in one Redis Cluster slot.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Bytewise a < b. Lua's `<` on strings uses strcoll(), which depends on the server's locale.
local function bytes_lt(a, b)
  local la, lb = #a, #b
  local n = math.min(la, lb)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return la < lb
end

-- Order keys are <family char><key>: numeric families (n: number, t: datetime in epoch
-- microseconds, d: date ordinal) compare as numbers, the others (s, b, u) bytewise.
local NUMERIC = { n = true, t = true, d = true }

local function order_lt(a, b)
  local fa, fb = string.sub(a, 1, 1), string.sub(b, 1, 1)
  if fa ~= fb then return nil end
  if NUMERIC[fa] then
    return tonumber(string.sub(a, 2)) < tonumber(string.sub(b, 2))
  end
  return bytes_lt(string.sub(a, 2), string.sub(b, 2))
end

local function split_lines(s)
  local out = {}
  for part in string.gmatch(s, '[^\n]+') do out[#out + 1] = part end
  return out
end

-- Merge one update into the row hash `row`. `u` holds arrays ints/floats ({name, delta}),
-- extra ({name, value}), greatest/least ({name, value, orderkey}), plus canonical, signal,
-- count and first (ms). `older` is true when the update predates what the row holds (replay of a
-- dead letter): then existing extras win. Returns nil, or {code, field} without any change.
local function merge_row(row, u, older)
  -- 1. read-only checks first, so a rejected update changes nothing
  for _, spec in ipairs({ { u.greatest, 'G:' }, { u.least, 'L:' } }) do
    for _, item in ipairs(spec[1]) do
      local held = redis.call('HGET', row, spec[2] .. item[1])
      if held and order_lt(held, item[3]) == nil then
        return { 'mixed', spec[2] .. item[1] }
      end
    end
  end
  -- 2. sums; on any failure restore what this call changed
  local saved = {}
  local function restore()
    for i = #saved, 1, -1 do
      local s = saved[i]
      if s[2] then redis.call('HSET', row, s[1], s[2]) else redis.call('HDEL', row, s[1]) end
    end
  end
  for _, spec in ipairs({ { u.ints, 'c:', 'HINCRBY', 'overflow' },
                          { u.floats, 'f:', 'HINCRBYFLOAT', 'nonfinite' } }) do
    for _, item in ipairs(spec[1]) do
      local field = spec[2] .. item[1]
      saved[#saved + 1] = { field, redis.call('HGET', row, field) }
      local r = redis.pcall(spec[3], row, field, item[2])
      if type(r) == 'table' and r.err then
        restore()
        return { spec[4], field }
      end
    end
  end
  -- 3. last write wins (unless this update is older than the row)
  for _, item in ipairs(u.extra) do
    if older then
      redis.call('HSETNX', row, 'e:' .. item[1], item[2])
    else
      redis.call('HSET', row, 'e:' .. item[1], item[2])
    end
  end
  for _, spec in ipairs({ { u.greatest, 'g:', 'G:', false }, { u.least, 'l:', 'L:', true } }) do
    for _, item in ipairs(spec[1]) do
      local okey = spec[3] .. item[1]
      local held = redis.call('HGET', row, okey)
      local take = not held
      if held then
        if spec[4] then take = order_lt(item[3], held) else take = order_lt(held, item[3]) end
      end
      if take then
        redis.call('HSET', row, spec[2] .. item[1], item[2], okey, item[3])
      end
    end
  end
  -- 4. bookkeeping
  redis.call('HSETNX', row, '_k', u.canonical)
  redis.call('HINCRBY', row, '_n', u.count)
  local first = tonumber(redis.call('HGET', row, '_f') or '')
  if not first or u.first < first then redis.call('HSET', row, '_f', u.first) end
  -- _sn counts signal-only updates: the row is signal-only while _sn equals _n, so an update
  -- that is not signal-only never has to touch it.
  if u.signal then redis.call('HINCRBY', row, '_sn', u.count) end
  return nil
end

-- Parse one update from ARGV starting at index i. Layout:
--   member canonical signal count first nint nfloat nextra ngreatest nleast
--   then nint*(name delta) nfloat*(name delta) nextra*(name value)
--   ngreatest*(name value orderkey) nleast*(name value orderkey)
local function parse_update(argv, i)
  local u = { member = argv[i], canonical = argv[i + 1], signal = argv[i + 2] == '1',
              count = tonumber(argv[i + 3]), first = tonumber(argv[i + 4]) }
  local counts = { tonumber(argv[i + 5]), tonumber(argv[i + 6]), tonumber(argv[i + 7]),
                   tonumber(argv[i + 8]), tonumber(argv[i + 9]) }
  i = i + 10
  local function take(n, width)
    local list = {}
    for k = 1, n do
      local item = {}
      for w = 1, width do item[w] = argv[i + w - 1] end
      list[k] = item
      i = i + width
    end
    return list
  end
  u.ints = take(counts[1], 2)
  u.floats = take(counts[2], 2)
  u.extra = take(counts[3], 2)
  u.greatest = take(counts[4], 3)
  u.least = take(counts[5], 3)
  return u, i
end
