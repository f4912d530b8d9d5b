-- Sends one private message: id from the recipient's counter, one publish on their inbox channel;
-- stored in their offline stream when no node holds a connection of theirs.
-- KEYS[1] the recipient's user HASH, KEYS[2] their offline STREAM, KEYS[3] their inbox channel,
-- KEYS[4] (optional) the send's dedupe STRING (same slot).
-- ARGV: 1 now (ms), 2 offline cap, 3 envelope, 4 "PUBLISH" or "SPUBLISH", 5 record ttl (ms),
-- 6 "1" when the message may be stored (the sender's budget allows it), 7 offline ttl (ms),
-- 8 the sender's inbox channel, where their other devices get a copy, or '' for none (on a
-- cluster it lives in another slot, and the copy goes out in a pipeline of its own),
-- 9 how long the dedupe key lives (ms).
-- Returns {nodes reached, stored (1, 0, or -1 when it had to be stored and may not), msg_id},
-- plus a 4th element 1 when KEYS[4] held an earlier send's outcome and nothing was sent. A
-- refused send is not remembered: nothing went out.
local dedupe = KEYS[4]
if dedupe then
  local seen = redis.call('GET', dedupe)
  if seen then
    local nodes, stored, id = string.match(seen, '^(%d+):(%d+):(.+)$')
    if id then return {tonumber(nodes), tonumber(stored), id, 1} end
  end
end
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
if ARGV[8] ~= '' then
  redis.call(ARGV[4], ARGV[8], 'M' .. id .. '|' .. ARGV[3])
end
if dedupe then
  redis.call('SET', dedupe, string.format('%d:%d:%s', nodes, stored, id), 'PX', ARGV[9])
end
return {nodes, stored, id}
