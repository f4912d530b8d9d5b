-- Brings the online index of some buckets in line with what write.lua (on a cluster) or a read
-- of the records (the repair walk) found, and keeps each bucket's counters equal to what its
-- index holds, in the same step (index_step.lua, which scripts.rs puts before this).
-- KEYS: four per bucket, as index_step.lua says. On a cluster the caller sends one bucket per
--   call (a script's keys must share a slot).
-- ARGV: 1 now (ms), 2 how long a tombstone is kept (ms), then five per user: the bucket's group
--   number in KEYS (1-based), user, the record's version (0: there is no record), the counted
--   mask, flags: "c" the write changed the record, "r" the node's entry is gone.
-- Returns how many users' index entries changed.
local now, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local bases = {}
for i = 3, #ARGV, 5 do
  local g, flags = tonumber(ARGV[i]), ARGV[i + 4]
  bases[g] = (g - 1) * 4
  ix_report(bases[g], g, now, ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
    string.find(flags, 'c', 1, true) ~= nil, string.find(flags, 'r', 1, true) ~= nil)
end
return ix_finish(bases, now, keep)
