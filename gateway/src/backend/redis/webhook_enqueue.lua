-- Adds webhook events to the queue stream while it holds fewer than the bound; the rest of the
-- batch is refused (the caller counts it), so a full queue never drops an older event for a newer
-- one. XLEN is O(1), so the check costs nothing per queued event.
-- KEYS[1] the stream; ARGV[1] the bound, then per event: event id, at (ms), JSON body.
-- Returns {added, length after}.
local max = tonumber(ARGV[1])
local len = redis.call('XLEN', KEYS[1])
local added = 0
for i = 2, #ARGV, 3 do
  if len >= max then
    break
  end
  redis.call('XADD', KEYS[1], '*', 'id', ARGV[i], 'at', ARGV[i + 1], 'b', ARGV[i + 2])
  len = len + 1
  added = added + 1
end
return {added, len}
