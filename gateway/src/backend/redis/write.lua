-- Writes one node's entry of one user and recomputes the user's record.
-- KEYS[1] user hash, KEYS[2] the user's event channel (same slot).
-- ARGV: 1 node, 2 entry "mask:idle" or "" to remove, 3 now (ms), 4 entry ttl (ms),
--       5 chosen status or "", 6 chosen text, 7 record ttl (ms), 8 user,
--       9 "PUBLISH" or "SPUBLISH", 10 status to restore if none is stored, 11 its text.
-- Returns 0 when nothing visible changed, else {mask before, published payload}.
-- The payload is "user|status|mask|version|last_seen|text" (text last: it may hold '|').
local key, channel = KEYS[1], KEYS[2]
local node, entry, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

if entry == '' then
  redis.call('HDEL', key, 'n:' .. node)
else
  redis.call('HSET', key, 'n:' .. node, entry .. ':' .. (now + ttl))
end
if ARGV[5] ~= '' then
  redis.call('HSET', key, 'cs', ARGV[5], 'ct', ARGV[6])
elseif ARGV[10] ~= '' and redis.call('HEXISTS', key, 'cs') == 0 then
  redis.call('HSET', key, 'cs', ARGV[10], 'ct', ARGV[11])
end

-- Fold every live entry; expired ones (nodes that died) are dropped on the way.
local fields = redis.call('HGETALL', key)
local mask, idle = 0, true
local rec = {}
for i = 1, #fields, 2 do
  local f, v = fields[i], fields[i + 1]
  if string.sub(f, 1, 2) == 'n:' then
    local m, id, exp = string.match(v, '^(%d+):(%d):(%d+)$')
    if m and tonumber(exp) > now then
      mask = bit.bor(mask, tonumber(m))
      if id == '0' then idle = false end
    else
      redis.call('HDEL', key, f)
    end
  else
    rec[f] = v
  end
end

local chosen = rec['cs'] or 'online'
local status
if mask == 0 then
  status = 'offline'
elseif chosen == 'online' and idle then
  status = 'away'
else
  status = chosen
end
local text = ''
if status ~= 'offline' then text = rec['ct'] or '' end

local before_status = rec['st'] or 'offline'
local before_mask = tonumber(rec['pl'] or '0')
local record_ttl = tonumber(ARGV[7])
if status == before_status and mask == before_mask and text == (rec['tx'] or '') then
  redis.call('PEXPIRE', key, record_ttl)
  return 0
end

local version = math.max(tonumber(rec['v'] or '0') + 1, now)
local function visible(s) return s == 'online' or s == 'away' or s == 'busy' end
local last_seen = rec['ls'] or ''
if visible(before_status) and not visible(status) then last_seen = tostring(now) end

redis.call('HSET', key, 'st', status, 'pl', mask, 'tx', text, 'v', string.format('%d', version), 'ls', last_seen)
redis.call('PEXPIRE', key, record_ttl)
local payload = ARGV[8] .. '|' .. status .. '|' .. mask .. '|' .. string.format('%d', version) .. '|' .. last_seen .. '|' .. text
redis.call(ARGV[9], channel, payload)
return {before_mask, payload}
