-- Done with webhook events (delivered, or given up): acknowledged in the consumer group and
-- deleted in the same step, so the stream holds exactly the events still on their way and its
-- length is what the bound counts.
-- KEYS[1] the stream; ARGV[1] the group, the rest entry ids (the caller sends at most 100).
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
