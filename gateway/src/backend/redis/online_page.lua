-- One bucket's part of a page of visibly online users, in id order after a cursor.
-- KEYS: 1 the bucket's index (ZSET, scores 0), 2 its state (HASH user -> "version:mask").
-- ARGV: 1 cursor ("" from the start), 2 how many users to return at most, 3 a platform bit (0:
--   any platform), 4 how many index entries to look at, at most (a page of a rare platform
--   stops there instead of scanning the bucket).
-- Returns {users, bound}: bound is "" when the bucket has nothing after the last user looked at,
-- else that user: every match up to it is in `users`, what lies after it is unread.
local after, want = ARGV[1], tonumber(ARGV[2])
local platform, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local min = '-'
if after ~= '' then min = '(' .. after end
local out, last = {}, ''
while budget > 0 do
  local n = math.min(budget, 2 * want)
  local page = redis.call('ZRANGE', KEYS[1], min, '+', 'BYLEX', 'LIMIT', 0, n)
  local masks
  if platform ~= 0 and #page > 0 then masks = redis.call('HMGET', KEYS[2], unpack(page)) end
  for i, user in ipairs(page) do
    last = user
    local ok = true
    if masks then
      local m = tonumber(string.match(masks[i] or '', ':(%d+)$') or '0')
      ok = bit.band(m, platform) ~= 0
    end
    if ok then
      out[#out + 1] = user
      if #out == want then return {out, user} end
    end
  end
  if #page < n then return {out, ''} end
  budget = budget - #page
  min = '(' .. last
end
return {out, last}
