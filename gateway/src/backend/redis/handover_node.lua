-- After handover.lua moved every entry: the node's user and platform sets become the handover
-- name's (RENAME, O(1)), and the node leaves the registry. The name gets a heartbeat that makes
-- it dead (reaped, see registry.rs) when the window ends; until then counts and online lists,
-- which read the sets of every node with a live heartbeat, still count its users. It never gets
-- a NodeInfo, so nobody is sent to it.
-- KEYS: 1-9 the node's sets (users, platforms 1-8), 10-18 the same of the handover name,
--   19 heartbeats, 20 node infos. All in the registry's slot.
-- ARGV: 1 node, 2 handover name, 3 the name's heartbeat score (ms).
for i = 1, 9 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[9 + i])
  end
end
redis.call('ZREM', KEYS[19], ARGV[1])
redis.call('HDEL', KEYS[20], ARGV[1])
if redis.call('EXISTS', KEYS[10]) == 1 then
  redis.call('ZADD', KEYS[19], ARGV[3], ARGV[2])
  return 1
end
return 0
