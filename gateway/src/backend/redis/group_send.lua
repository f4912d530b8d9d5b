-- Sends one group message: membership check, id, one history write, one publish.
-- KEYS[1] members ZSET, KEYS[2] group meta HASH, KEYS[3] history STREAM, KEYS[4] group channel,
-- KEYS[5] (optional) the send's dedupe STRING (all tagged with the group). ARGV: 1 from, 2 "1" to
-- require membership, 3 now (ms), 4 history cap, 5 oldest ms kept, 6 envelope, 7 "PUBLISH" or
-- "SPUBLISH", 8 how long the dedupe key lives (ms).
-- Returns {-1} for a non-member, else {other members, nodes reached, msg_id}, plus a 4th
-- element 1 when KEYS[5] held an earlier send's outcome and nothing was sent.
local dedupe = KEYS[5]
if dedupe then
  local seen = redis.call('GET', dedupe)
  if seen then
    local others, nodes, id = string.match(seen, '^(%-?%d+):(%d+):(.+)$')
    if id then return {tonumber(others), tonumber(nodes), id, 1} end
  end
end
local is_member = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[2] == '1' and not is_member then return {-1} end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
-- Stream ids must grow even if clocks step back: never below the last ms used.
local now = tonumber(ARGV[3])
local last = tonumber(redis.call('HGET', KEYS[2], 'ms') or '0')
if last > now then now = last end
redis.call('HSET', KEYS[2], 'ms', string.format('%d', now))
local id = string.format('%013d-%010d', now, seq)
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[4], id, 'm', ARGV[6])
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[5])
local others = redis.call('ZCARD', KEYS[1])
if is_member then others = others - 1 end
local nodes = redis.call(ARGV[7], KEYS[4], 'M' .. id .. '|' .. ARGV[6])
if dedupe then
  redis.call('SET', dedupe, string.format('%d:%d:%s', others, nodes, id), 'PX', ARGV[8])
end
return {others, nodes, id}
