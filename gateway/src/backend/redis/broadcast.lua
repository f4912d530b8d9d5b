-- Publishes one message to every node. KEYS[1] sequence, KEYS[2] broadcast channel (same slot).
-- ARGV: 1 now (ms), 2 envelope, 3 "PUBLISH" or "SPUBLISH". Returns {nodes reached, msg_id}.
local seq = redis.call('INCR', KEYS[1])
local id = string.format('%013d-%010d', tonumber(ARGV[1]), seq)
local nodes = redis.call(ARGV[3], KEYS[2], 'M' .. id .. '|' .. ARGV[2])
return {nodes, id}
