-- After handover.lua moved every entry: each bucket's set of the node's users becomes the
-- handover name's, so whoever reaps the name when the window ends finds them (write.rs,
-- reap_node). RENAME is O(1) here: the name is new, so there is nothing to overwrite.
-- KEYS: pairs, per bucket: the node's set, the handover name's (same bucket, same hash tag). On a
--   cluster the caller sends one bucket per call.
-- Returns how many sets were renamed.
local renamed = 0
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 1])
    renamed = renamed + 1
  end
end
return renamed
