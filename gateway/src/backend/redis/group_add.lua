-- Adds a group to a user's groups unless that would put them past the limit, in one step, so that
-- two adds racing at the limit cannot both pass. A user already in the group is never refused
-- (adding again is how a retry after a cut pipeline completes the membership).
-- KEYS[1] the user's groups SET. ARGV: 1 the group, 2 the most groups a user may be in.
-- Returns 1 if the user is in the group now, 0 if refused (nothing changed).
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 1
end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
