-- Last step of a handover (handover.lua moved the entries, handover_sets.lua the node's sets): the
-- node leaves the registry, and the handover name gets a heartbeat that makes it dead (reaped, see
-- registry.rs) when the window ends. Counts and online lists read the online index, which still
-- holds the users until their entries expire or they are reaped. The name never gets a NodeInfo,
-- so nobody is sent to it.
-- KEYS: 1 heartbeats, 2 node infos (the registry's slot).
-- ARGV: 1 node, 2 handover name, 3 the name's heartbeat score (ms), 4 "1" when some bucket's
--   set was handed over (a name that holds nobody needs no reaping).
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  return 1
end
return 0
