-- Counts visibly online users overall and per platform, exactly, in one slot.
-- KEYS[1] scratch key, KEYS[2] invisible set, then for each of the 9 groups (all users, then
-- platforms 1..8) ARGV[1] keys: that group's set on each live node.
-- Returns 9 counts.
local n = tonumber(ARGV[1])
local scratch, invisible = KEYS[1], KEYS[2]
local out = {}
for g = 0, 8 do
  local keys = {}
  for i = 1, n do keys[i] = KEYS[2 + g * n + i] end
  local count = 0
  if n > 0 then
    redis.call('ZUNIONSTORE', scratch, n, unpack(keys))
    count = redis.call('ZCARD', scratch) - redis.call('ZINTERCARD', 2, scratch, invisible)
  end
  out[g + 1] = count
end
redis.call('DEL', scratch)
return out
