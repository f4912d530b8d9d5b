-- Sends one private message: id from the recipient's counter, one publish on their inbox channel;
-- stored in their offline stream when no node holds a connection of theirs.
-- KEYS[1] the recipient's user HASH, KEYS[2] their offline STREAM, KEYS[3] their inbox channel.
-- ARGV: 1 now (ms), 2 offline cap, 3 envelope, 4 "PUBLISH" or "SPUBLISH", 5 record ttl (ms),
-- 6 "1" when the message may be stored (the sender's budget allows it), 7 offline ttl (ms).
-- Returns {nodes reached, stored (1, 0, or -1 when it had to be stored and may not), msg_id}.
local seq = redis.call('HINCRBY', KEYS[1], 'mq', 1)
local now = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'mm') or '0')
if last > now then now = last end
redis.call('HSET', KEYS[1], 'mm', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local id = string.format('%013d-%010d', now, seq)
local nodes = redis.call(ARGV[4], KEYS[3], 'M' .. id .. '|' .. ARGV[3])
local stored = 0
if nodes == 0 then
  if ARGV[6] ~= '1' then return {0, -1, id} end
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], id, 'm', ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  stored = 1
end
return {nodes, stored, id}
