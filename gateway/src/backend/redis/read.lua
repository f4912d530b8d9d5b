-- Moves a read position forward only. KEYS[1] the user's read positions HASH.
-- ARGV: 1 group, 2 msg_id, canonical and at most the group's last (the caller clamps it: the
-- group's hash is in another cluster slot). Canonical ids sort as strings.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (not current) or ARGV[2] > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
