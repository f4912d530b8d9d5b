-- Moves a read position forward only. KEYS[1] the user's read positions HASH.
-- ARGV: 1 group, 2 msg_id. Ids sort as strings.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (not current) or ARGV[2] > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
