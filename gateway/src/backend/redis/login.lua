-- Numbers a new login of a user in one scope and tells every node holding the user's
-- connections, in one step, so no login can slip between the number and the announcement.
-- KEYS[1] the user's login HASH (scope -> last sequence), KEYS[2] the user's inbox channel (same
-- slot). ARGV: 1 scope (a platform id, or "all"), 2 "PUBLISH" or "SPUBLISH", 3 expiry (ms).
-- Returns the login's sequence number.
local seq = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local control
if ARGV[1] == 'all' then
  control = string.format('C{"action":"replace","seq":%d}', seq)
else
  control = string.format('C{"action":"replace","platform":%s,"seq":%d}', ARGV[1], seq)
end
redis.call(ARGV[2], KEYS[2], control)
return seq
