-- Put one dead letter back among the pending rows, merged *before* any newer pending data of
-- the same row. KEYS[1] pending, KEYS[2] dead, KEYS[3] stats. ARGV[1] base, ARGV[2] batch id,
-- then ARGV[3..] the dead row as an update (see parse_update; built by the client from the
-- stored row). Returns 1, 0 (not dead), or {code, field} when merging fails (it stays dead).
local pending, dead = KEYS[1], KEYS[2]
local base, id = ARGV[1], ARGV[2]
if not redis.call('ZSCORE', dead, id) then return 0 end
local u = parse_update(ARGV, 3)
local row = base .. ':' .. u.member
local err = merge_row(row, u, true)
local bkey = base .. ':~b:' .. id
if err then
  -- It stays dead, with the reason this replay was refused.
  redis.call('HSET', bkey, 'error', 'replay refused: ' .. err[1] .. ' on ' .. err[2])
  return err
end
redis.call('DEL', bkey .. ':1', bkey)
redis.call('ZREM', dead, id)
local score = tonumber(redis.call('HGET', row, '_f'))
local held = redis.call('ZSCORE', pending, u.member)
if not held or score < tonumber(held) then redis.call('ZADD', pending, score, u.member) end
return 1
