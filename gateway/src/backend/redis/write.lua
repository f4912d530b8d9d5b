-- Writes one node's entry of each of several users and recomputes each user's record; on one
-- Redis also the online index of each (index_step.lua, which scripts.rs puts before this), so a
-- flush is one round trip and the index moves in the same step as the record.
-- KEYS: two per user, in order: the user's hash, the user's event channel (same slot). On a
--   cluster the caller sends one user per call (a script's keys must share a slot). Then, when
--   ARGV 9 is set, four per index bucket of these users (index_step.lua). Last, when ARGV 7 is
--   set, the webhook queue stream.
-- ARGV: 1 node, 2 now (ms), 3 entry ttl (ms), 4 record ttl (ms), 5 "PUBLISH" or "SPUBLISH",
--   6 "1" to push the record's expiry out for every user (renewal, reaper) or "",
--   7 the webhook queue's bound, or "" when the caller queues webhook events itself (no webhooks,
--   or a cluster, where the queue's slot is not this call's), 8 the reporting node (the event's
--   `node`: the caller, also when it reaps a dead node), 9 how long an index tombstone is kept
--   (ms), or "" when the caller writes the index itself (a cluster: the buckets' slots are not
--   this call's), then nine per user: user, entry "mask:idle" or, to remove it, "-mask" (the
--   entry Redis last acknowledged) or "", chosen status or "", its text, when it was chosen (ms),
--   status to restore or "", its text, when it was chosen (ms), the user's bucket group in KEYS
--   (1-based) or "".
-- A chosen status is stored with when it was chosen (`ca`). A new choice always takes effect, at
-- max(its time, stored + 1), so the stored time stays the newest of any choice written. A restore
-- (renewal: the status chosen through that node) replaces the stored choice only if there is none
-- or it is older: after Redis lost the record, each node of the user restores the choice it
-- holds, and the newest wins whatever order they come in; a renewal never undoes a newer choice.
-- Returns one reply per user: {mask before, payload or "" when nothing visible changed, the
-- record's version (0: there is no record), the counted mask (the platform mask of a visibly
-- online user, else 0), and when the change is a transition (no connection anywhere <-> some)
-- whose webhook event this call queued 1, or 0 when it refused it at the bound}; the version and
-- the counted mask are what a cluster's caller writes to the online index (index.lua). Queued here, in the
-- write that makes the transition, the event cannot be lost to the node dying between the write
-- and its own enqueue. Its id is derived from the user, the record version and the event, unique
-- per transition.
-- The payload is "user|status|mask|version|last_seen|text" (text last: it may hold '|'), where
-- version is "v" when the public version is the same, else "v:pv:1" when others see the change,
-- "v:pv:0" when only the user does (record.rs, parse_payload).
--
-- Every presence change of every node runs through here, so Redis CPU per user is what caps a
-- node's flush rate. Each redis.call costs 1.5-5 us (a HGETALL reply becomes Lua strings), so a
-- user costs one HGETALL, one HSET, and a PUBLISH only when something visible changed. The
-- record's expiry moves only when the user's entries change or the caller asks (renewals keep it
-- ahead), not on every status change. Many users per call spread the script's own entry cost.
local node, now, entry_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local record_ttl, publish, touch_all = ARGV[4], ARGV[5], ARGV[6] == '1'
local queue_max, reporter, index_keep = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local queue = queue_max and KEYS[#KEYS]
local users = math.floor((#ARGV - 9) / 9)
local bases = {}
local mine = 'n:' .. node
local function visible(s) return s == 'online' or s == 'away' or s == 'busy' end

-- XLEN once per call (O(1)), then counted here.
local queue_len
local function enqueue(user, online, platforms, version)
  if not queue_len then queue_len = redis.call('XLEN', queue) end
  if queue_len >= queue_max then return 0 end
  local event = online and 'user.online' or 'user.offline'
  local id = string.sub(redis.sha1hex(user .. '|' .. version .. '|' .. event), 1, 32)
  local list = {}
  for p = 1, 8 do
    if bit.band(platforms, bit.lshift(1, p)) ~= 0 then list[#list + 1] = p end
  end
  -- The body hooks/mod.rs's WebhookEvent serializes to; `at` by hand (cjson writes big numbers
  -- in exponent form).
  local body = '{"id":"' .. id .. '","event":"' .. event .. '","user":' .. cjson.encode(user)
    .. ',"platforms":[' .. table.concat(list, ',') .. '],"node":' .. cjson.encode(reporter)
    .. ',"at":' .. ARGV[2] .. '}'
  redis.call('XADD', queue, '*', 'id', id, 'at', ARGV[2], 'b', body)
  queue_len = queue_len + 1
  return 1
end

local out = {}
for u = 1, users do
  local key, channel = KEYS[2 * u - 1], KEYS[2 * u]
  local a = 9 + (u - 1) * 9
  local user, entry = ARGV[a + 1], ARGV[a + 2]
  local was_mask
  if string.byte(entry, 1) == 45 then -- "-mask": a removal that knows what this node had
    was_mask, entry = tonumber(string.sub(entry, 2)), ''
  end
  local cs, ct, ca = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local rs, rt, ra = ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]

  -- Fold every live entry but this node's, which is replaced by `entry`; expired ones (nodes
  -- that died) are dropped on the way. Record fields go to locals, not a table: building a
  -- table per user was a measurable part of the script's cost.
  local fields = redis.call('HGETALL', key)
  local st, pl, tx, v, pv, ls, rcs, rct, rca
  local drop = {}
  local mask, idle, old = 0, true, nil
  for i = 1, #fields, 2 do
    local f, x = fields[i], fields[i + 1]
    if f == 'st' then st = x
    elseif f == 'pl' then pl = x
    elseif f == 'tx' then tx = x
    elseif f == 'v' then v = x
    elseif f == 'ls' then ls = x
    elseif f == 'cs' then rcs = x
    elseif f == 'ct' then rct = x
    elseif f == 'ca' then rca = x
    elseif f == 'pv' then pv = x
    elseif f == mine then old = x
    elseif string.byte(f, 1) == 110 and string.byte(f, 2) == 58 then -- "n:"
      local m, id, exp = string.match(x, '^(%d+):(%d):(%d+)$')
      if m and tonumber(exp) > now then
        mask = bit.bor(mask, tonumber(m))
        if id == '0' then idle = false end
      else
        drop[#drop + 1] = f
      end
    end
  end

  local set = {}
  local touch = touch_all or #fields == 0
  if entry ~= '' then
    local m, id = string.match(entry, '^(%d+):(%d)$')
    if m then
      mask = bit.bor(mask, tonumber(m))
      if id == '0' then idle = false end
    end
    local same = old and string.sub(old, 1, #entry + 1) == entry .. ':'
    if not same then touch = true end
    -- An unchanged live entry keeps its expiry: renewals move it, a status change need not.
    if touch_all or not same or tonumber(string.sub(old, #entry + 2)) <= now then
      set[1] = mine
      set[2] = entry .. ':' .. (now + entry_ttl)
    end
  elseif old then
    drop[#drop + 1] = mine
    touch = true
  end
  if cs ~= '' then
    if rca then ca = string.format('%d', math.max(tonumber(ca), tonumber(rca) + 1)) end
  elseif rs ~= '' and (not rcs or (rca and tonumber(rca) < tonumber(ra))) then
    -- A stored choice without a time predates `ca`: kept, as before it.
    cs, ct, ca = rs, rt, ra
  end
  if cs ~= '' then
    rcs, rct = cs, ct
    local n = #set
    set[n + 1], set[n + 2], set[n + 3], set[n + 4], set[n + 5], set[n + 6] =
      'cs', cs, 'ct', ct, 'ca', ca
  end

  local status
  if mask == 0 then
    status = 'offline'
  elseif idle and (rcs or 'online') == 'online' then
    status = 'away'
  else
    status = rcs or 'online'
  end
  local text = ''
  if status ~= 'offline' then text = rct or '' end

  local before_status = st or 'offline'
  local before_mask = tonumber(pl or '0')
  -- Removing an entry from a record Redis lost (restarted empty while the user was online here):
  -- the user was online as far as anyone knew, so the offline transition is published (watchers
  -- and webhooks hear of it) and the record is kept, with last_seen.
  if #fields == 0 and was_mask and was_mask > 0 then
    before_status, before_mask, touch = 'online', was_mask, true
  end
  local payload
  local version = v
  if status ~= before_status or mask ~= before_mask or text ~= (tx or '') then
    version = string.format('%d', math.max(tonumber(v or '0') + 1, now))
    local was, is = visible(before_status), visible(status)
    local last_seen = ls or ''
    if was and not is then last_seen = tostring(now) end
    -- What others see (PresenceRecord::public_state) is status, mask and text of a visibly online
    -- user, only last_seen of anyone else. Something of the first three changed, so that view
    -- changed if the user was or is visibly online; if neither, last_seen stayed too (it moves
    -- only when the user stops being visibly online). The public version moves only then.
    -- A hash has pv only once it differed from v (a change only the user saw): without it, it is v.
    local public = was or is
    local public_version = pv or v or '0'
    if public then
      if public_version == (v or '0') then
        public_version = version -- max(pv + 1, now) with pv == v
      else
        public_version = string.format('%d', math.max(tonumber(public_version) + 1, now))
      end
    end
    local versions = version
    if public_version ~= version then
      versions = version .. ':' .. public_version .. (public and ':1' or ':0')
    end
    local n = #set
    set[n + 1], set[n + 2], set[n + 3], set[n + 4], set[n + 5] = 'st', status, 'pl', mask, 'tx'
    set[n + 6], set[n + 7], set[n + 8], set[n + 9], set[n + 10] = text, 'v', version, 'ls', last_seen
    -- Written when it moved, or when v moves away from it (so it is no longer implied).
    if public_version ~= (pv or version) then set[n + 11], set[n + 12] = 'pv', public_version end
    payload = user .. '|' .. status .. '|' .. mask .. '|' .. versions .. '|' .. last_seen .. '|' .. text
  end

  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  if #drop > 0 then redis.call('HDEL', key, unpack(drop)) end
  if touch and (#fields > 0 or #set > 0) then redis.call('PEXPIRE', key, record_ttl) end
  local counted = 0
  if visible(status) then counted = mask end
  local webhook
  if payload then
    redis.call(publish, channel, payload)
    if queue and (before_mask == 0) ~= (mask == 0) then
      local online = mask ~= 0
      webhook = enqueue(user, online, online and mask or before_mask, version)
    end
  end
  -- A record that does not exist (nothing was there, nothing written) has version 0.
  if #fields == 0 and #set == 0 then version = '0' end
  local v = tonumber(version or '0')
  -- The index already holds what a flush leaves as it was (the write and its index step are one
  -- script here, so no report of it can be lost or late), unless the record was missing: then
  -- the report may correct an entry the record no longer backs. Renewals and the reaper restate
  -- every user, which rewrites an index Redis lost while keeping the records.
  if index_keep then
    local before_counted = 0
    if visible(before_status) then before_counted = before_mask end
    local leaves = entry == ''
    if touch_all or leaves or #fields == 0 or counted ~= before_counted then
      local g = tonumber(ARGV[a + 9])
      bases[g] = 2 * users + (g - 1) * 4
      ix_report(bases[g], g, now, user, v, counted, payload ~= nil, leaves)
    end
  end
  out[u] = {before_mask, payload or '', v, counted, webhook}
end
if index_keep then ix_finish(bases, now, index_keep) end
return out
