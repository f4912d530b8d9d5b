-- One step of the index repair in one bucket: the next users of the index after the bucket's
-- repair cursor (kept in the state so every node continues the same walk), and old tombstones
-- dropped as index.lua does.
-- KEYS: 1 the bucket's index, 2 its state (cursor in field "#r"), 3 its tombstones.
-- ARGV: 1 how many users, 2 now (ms), 3 how long a tombstone is kept (ms).
-- Returns the users; fewer than asked means the walk of this bucket starts over next time.
local n, now, keep = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cursor = redis.call('HGET', KEYS[2], '#r')
local min = '-'
if cursor then min = '(' .. cursor end
local page = redis.call('ZRANGE', KEYS[1], min, '+', 'BYLEX', 'LIMIT', 0, n)
if #page < n then
  redis.call('HDEL', KEYS[2], '#r')
else
  redis.call('HSET', KEYS[2], '#r', page[#page])
end
local old = redis.call('ZRANGE', KEYS[3], '-inf', now - keep, 'BYSCORE', 'LIMIT', 0, 64)
if #old > 0 then
  redis.call('HDEL', KEYS[2], unpack(old))
  redis.call('ZREM', KEYS[3], unpack(old))
end
return page
