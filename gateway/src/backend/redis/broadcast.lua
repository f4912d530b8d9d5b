-- Publishes one message to every node. KEYS[1] sequence, KEYS[2] broadcast channel, KEYS[3]
-- (optional) the send's dedupe STRING (same slot). ARGV: 1 now (ms), 2 envelope, 3 "PUBLISH" or
-- "SPUBLISH", 4 how long the dedupe key lives (ms). Returns {nodes reached, msg_id}, plus a 3rd
-- element 1 when KEYS[3] held an earlier send's outcome and nothing was sent.
local dedupe = KEYS[3]
if dedupe then
  local seen = redis.call('GET', dedupe)
  if seen then
    local nodes, id = string.match(seen, '^(%d+):(.+)$')
    if id then return {tonumber(nodes), id, 1} end
  end
end
local seq = redis.call('INCR', KEYS[1])
local id = string.format('%013d-%010d', tonumber(ARGV[1]), seq)
local nodes = redis.call(ARGV[3], KEYS[2], 'M' .. id .. '|' .. ARGV[2])
if dedupe then
  redis.call('SET', dedupe, string.format('%d:%s', nodes, id), 'PX', ARGV[4])
end
return {nodes, id}
