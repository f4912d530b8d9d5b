-- The online index's step for one user, shared by index.lua and, on one Redis, write.lua (which
-- then writes the index in the same script as the record: one round trip per flush). scripts.rs
-- puts this text before theirs. Each caller says where a bucket's four keys sit in KEYS: its
-- index (ZSET, scores 0: the visibly online users), its state (HASH), its tombstones (ZSET scored
-- by ms) and the writing node's users in it (ZSET, scores 0).
-- State: user -> "version:mask" for users in the index and, with mask 0, for users who left it
--   lately (tombstones, so a late report of an older version cannot put them back); "#n" counts
--   the index, "#1".."#8" its users per platform (platform p is mask bit 1 << p). Reports of one
--   user can arrive out of order (on a cluster two nodes write them, each reports after its own
--   write), so an older version never wins.
local ix_deltas, ix_trim, ix_changed = {}, {}, 0

local function ix_count(g, mask, by)
  local d = ix_deltas[g]
  if not d then
    d = {0, 0, 0, 0, 0, 0, 0, 0, 0}
    ix_deltas[g] = d
  end
  d[1] = d[1] + by
  for p = 1, 8 do
    if bit.band(mask, bit.lshift(1, p)) ~= 0 then d[p + 1] = d[p + 1] + by end
  end
end

-- One user's report: the record's version (0: there is no record), the counted mask (the
-- platform mask of a visibly online user, else 0), whether the write changed the record, and
-- whether the node's entry is gone (the user leaves the node's set). `base` is where bucket
-- group `g`'s keys start in KEYS, less one.
local function ix_report(base, g, now, user, v, cm, changed, leaves)
  local index, state, tombs = KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  local held = redis.call('HGET', state, user)
  local hv, hm = 0, 0
  if held then
    local a, b = string.match(held, '^(%d+):(%d+)$')
    hv, hm = tonumber(a or '0'), tonumber(b or '0')
  end
  local nv, nm
  if v == 0 then
    -- No record: offline, unless the index holds a version written since `now` (the user came
    -- back after the caller looked). The held version stays, so older reports stay refused.
    if hm ~= 0 and hv < now then nv, nm = hv, 0 end
  elseif v >= hv then
    -- A user who is not in the index and stays out needs no entry, unless this very write took
    -- them offline: then the tombstone refuses a late report of their being online.
    if held or cm ~= 0 or changed then nv, nm = v, cm end
  end
  if nv and (nv ~= hv or nm ~= hm or not held) then
    if hm ~= 0 then ix_count(g, hm, -1) end
    if nm ~= 0 then
      ix_count(g, nm, 1)
      if hm == 0 then
        redis.call('ZADD', index, 0, user)
        if held then redis.call('ZREM', tombs, user) end
      end
    else
      if hm ~= 0 then redis.call('ZREM', index, user) end
      redis.call('ZADD', tombs, now, user)
      ix_trim[g] = base
    end
    redis.call('HSET', state, user, string.format('%d:%d', nv, nm))
    if nm ~= hm then ix_changed = ix_changed + 1 end
  end
  if leaves then redis.call('ZREM', KEYS[base + 4], user) end
end

-- After every report of a call: the counters of each bucket touched, and old tombstones dropped
-- from one bucket this call made some in (which one turns with the clock), up to 64: more than
-- a call makes, so they never pile up, and no call does more than a small step. `bases` maps a
-- group to where its keys start, less one. Returns how many users' index entries changed.
local function ix_finish(bases, now, keep)
  for g, d in pairs(ix_deltas) do
    local state = KEYS[bases[g] + 2]
    if d[1] ~= 0 then redis.call('HINCRBY', state, '#n', d[1]) end
    for p = 1, 8 do
      if d[p + 1] ~= 0 then redis.call('HINCRBY', state, '#' .. p, d[p + 1]) end
    end
  end
  local made = {}
  for g in pairs(ix_trim) do made[#made + 1] = g end
  if #made > 0 then
    table.sort(made)
    local base = ix_trim[made[now % #made + 1]]
    local old = redis.call('ZRANGE', KEYS[base + 3], '-inf', now - keep, 'BYSCORE', 'LIMIT', 0, 64)
    if #old > 0 then
      redis.call('HDEL', KEYS[base + 2], unpack(old))
      redis.call('ZREM', KEYS[base + 3], unpack(old))
    end
  end
  return ix_changed
end
