-- Delete every dead letter of one partition. KEYS[1] dead. ARGV[1] base. Returns how many.
local dead, base = KEYS[1], ARGV[1]
local ids = redis.call('ZRANGE', dead, 0, -1)
for _, id in ipairs(ids) do
  local bkey = base .. ':~b:' .. id
  redis.call('DEL', bkey .. ':1', bkey)
end
redis.call('DEL', dead)
return #ids
