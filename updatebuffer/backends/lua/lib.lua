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

-- Order keys are <family byte><key>, built by the client so that bytewise order is Python's
-- order within a family (exact for any int, float or Decimal: Lua doubles are not); values of
-- two families cannot be compared (nil).
local function order_lt(a, b)
  if string.byte(a, 1) ~= string.byte(b, 1) then return nil end
  return bytes_lt(a, b)
end

-- A float sum as text that reads back as the same double (17 significant digits) and never
-- looks like an integer, so HINCRBY (the incr fast path) refuses to add to it.
local function float_text(x)
  local s = string.format('%.17g', x)
  if not string.find(s, '[.e]') then s = s .. '.0' end
  return s
end

-- A column's 'c:' field holds its sum (int text, or float_text) or, when another operation
-- owns the name, '~' plus that operation's letter (e, g, l): one operation per column per row.
local OWNER = { extra = '~e', greatest = '~g', least = '~l' }

local function claim_error(row, name, mine)
  local held = redis.call('HGET', row, 'c:' .. name)
  if held and held ~= mine then
    local other = string.byte(held, 1) == 126 and string.sub(held, 2) or 'c'
    return { 'conflict=' .. other, string.sub(mine, 2) .. ':' .. name }
  end
  return nil
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
  for _, item in ipairs(u.extra) do
    local err = claim_error(row, item[1], OWNER.extra)
    if err then return err end
  end
  for _, spec in ipairs({ { u.greatest, 'G:', OWNER.greatest }, { u.least, 'L:', OWNER.least } }) do
    for _, item in ipairs(spec[1]) do
      local err = claim_error(row, item[1], spec[3])
      if err then return err end
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
  -- Python's left-to-right sum, to the bit: an int column sums exactly (HINCRBY, refused
  -- beyond int64) until its first float delta; from then on it is a double and every delta is
  -- added as a double, as Python adds float + int. Lua numbers are doubles (HINCRBYFLOAT is
  -- not: it adds in long double and keeps 17 decimal places).
  for _, spec in ipairs({ { u.ints, true }, { u.floats, false } }) do
    for _, item in ipairs(spec[1]) do
      local field = 'c:' .. item[1]
      local held = redis.call('HGET', row, field)
      if held and string.byte(held, 1) == 126 then
        restore()
        return { 'conflict=' .. string.sub(held, 2), field }
      end
      saved[#saved + 1] = { field, held }
      if spec[2] and (not held or string.find(held, '^%-?%d+$')) then
        local r = redis.pcall('HINCRBY', row, field, item[2])
        if type(r) == 'table' and r.err then
          restore()
          return { 'overflow', field }
        end
      else
        local total = tonumber(item[2])
        if held then total = tonumber(held) + total end
        if total ~= total or total == math.huge or total == -math.huge then
          restore()
          return { 'nonfinite', field }
        end
        redis.call('HSET', row, field, float_text(total))
      end
    end
  end
  -- 3. last write wins (unless this update is older than the row)
  for _, item in ipairs(u.extra) do
    if older then
      redis.call('HSETNX', row, 'e:' .. item[1], item[2])
      redis.call('HSETNX', row, 'c:' .. item[1], OWNER.extra)
    else
      redis.call('HSET', row, 'e:' .. item[1], item[2], 'c:' .. item[1], OWNER.extra)
    end
  end
  for _, spec in ipairs({ { u.greatest, 'g:', 'G:', false, OWNER.greatest },
                          { u.least, 'l:', 'L:', true, OWNER.least } }) do
    for _, item in ipairs(spec[1]) do
      local okey = spec[3] .. item[1]
      local held = redis.call('HGET', row, okey)
      if not held then
        redis.call('HSET', row, spec[2] .. item[1], item[2], okey, item[3], 'c:' .. item[1], spec[5])
      else
        -- A strictly better value wins; on a tie (equal instants with other offsets, 1 and 1.0)
        -- the earlier update keeps its value, as in Python's max/min. An `older` update (a
        -- replayed dead letter) came first, so it also wins a tie.
        local better
        if spec[4] then better = order_lt(item[3], held) else better = order_lt(held, item[3]) end
        if older and not better then
          if spec[4] then better = not order_lt(held, item[3]) else better = not order_lt(item[3], held) end
        end
        if better then
          redis.call('HSET', row, spec[2] .. item[1], item[2], okey, item[3])
        end
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
