-- A draining node hands its entries over to expiry (zero-flap restarts): moves each user's entry
-- from the node's field to the handover name's, expiring at most `window` from now. The record
-- is left alone: the entries' union is the same, so nothing visible changes and nothing is
-- published. A user who reconnects elsewhere meanwhile is simply written by that node; whoever
-- did not expires, and the reaper of the handover name publishes them offline (write.lua).
-- KEYS: the users' hashes (one per user; on a cluster the caller sends one user per call).
-- ARGV: 1 node, 2 handover name, 3 latest expiry (ms).
local from, to, latest = 'n:' .. ARGV[1], 'n:' .. ARGV[2], tonumber(ARGV[3])
for i = 1, #KEYS do
  local entry = redis.call('HGET', KEYS[i], from)
  if entry then
    local mask, idle, expires = string.match(entry, '^(%d+):(%d):(%d+)$')
    if mask then
      local until_ms = math.min(tonumber(expires), latest)
      redis.call('HSET', KEYS[i], to, mask .. ':' .. idle .. ':' .. string.format('%d', until_ms))
    end
    redis.call('HDEL', KEYS[i], from)
  end
end
return #KEYS
