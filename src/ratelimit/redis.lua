-- keygate's rate-limit decision: every window of one key's bucket, in one atomic call.
--
-- KEYS[1]  the bucket: a hash with one field per window, the window's theoretical arrival
--          time (TAT) as "seconds:nanoseconds" since the Unix epoch
-- KEYS[2]  (charges only) this decision's marker: a re-sent call finds its first answer here
--          and charges nothing again
-- ARGV     mode ("c" charge, "r" refund), cost, marker lifetime (ms), now as seconds and
--          nanoseconds ("" and "" for Redis's own clock), then for each window its field,
--          interval (ns) and burst (ns)
--
-- Lua numbers are doubles: every sum below stays under 2^53 (offsets from now are at most
-- one burst; windows whose burst is longer than 104 days are exact to a few nanoseconds).

local mode = ARGV[1]
local cost = tonumber(ARGV[2])

if mode == 'c' then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    return prior
  end
end

local E9 = 1000000000
local now_s, now_n
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now_s = tonumber(t[1])
  now_n = tonumber(t[2]) * 1000
else
  now_s = tonumber(ARGV[4])
  now_n = tonumber(ARGV[5])
end

local n = (#ARGV - 5) / 3
local fields, intervals, bursts = {}, {}, {}
for i = 1, n do
  fields[i] = ARGV[3 + 3 * i]
  intervals[i] = tonumber(ARGV[4 + 3 * i])
  bursts[i] = tonumber(ARGV[5 + 3 * i])
end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))

-- A TAT as (seconds, nanoseconds), or nil when the field holds something else.
local function parse(v)
  if not v then
    return nil
  end
  local s, ns = string.match(v, '^(%d+):(%d+)$')
  if not s then
    return nil
  end
  return tonumber(s), tonumber(ns)
end

-- Writes now + offset (ns) into a field.
local function store(field, offset)
  local t = now_n + offset
  local s = now_s + math.floor(t / E9)
  redis.call('HSET', KEYS[1], field, string.format('%d:%d', s, t % E9))
end

-- Keeps the bucket until its emptiest window is full again (never shortening it, so a
-- window another route still uses is not lost).
local function keep(longest)
  local want = math.floor(longest / 1000000) + 1
  if redis.call('PTTL', KEYS[1]) < want then
    redis.call('PEXPIRE', KEYS[1], want)
  end
end

if mode == 'r' then
  local seen = {}
  for i = 1, n do
    local s, ns = parse(stored[i])
    if s and not seen[fields[i]] then
      seen[fields[i]] = true
      local t = (s - now_s) * E9 + (ns - now_n) - cost * intervals[i]
      if t > bursts[i] then
        t = bursts[i]
      end
      if t <= 0 then
        redis.call('HDEL', KEYS[1], fields[i])
      else
        store(fields[i], t)
      end
    end
  end
  return 'ok'
end

-- The offset of each window's TAT from now, within [0, burst]; a TAT further ahead than
-- one burst (a clock that stepped back) or unreadable is clamped to one burst, and stored
-- so, so that the bucket refills from here rather than staying empty.
local offsets, clamped = {}, {}
for i = 1, n do
  local s, ns = parse(stored[i])
  local d
  if not s then
    d = stored[i] and bursts[i] or 0
    clamped[i] = stored[i] ~= false and stored[i] ~= nil
  elseif s - now_s > bursts[i] / E9 + 1 then
    d = bursts[i] + 1
  elseif s - now_s < -1 then
    d = 0
  else
    d = (s - now_s) * E9 + (ns - now_n)
  end
  if d < 0 then
    d = 0
  end
  if d > bursts[i] then
    d = bursts[i]
    clamped[i] = true
  end
  offsets[i] = d
end

local allowed = 1
for i = 1, n do
  if offsets[i] + cost * intervals[i] > bursts[i] then
    allowed = 0
  end
end

local longest = 0
for i = 1, n do
  local write = nil
  if allowed == 1 then
    write = offsets[i] + cost * intervals[i]
  elseif clamped[i] then
    write = offsets[i]
  end
  if write then
    store(fields[i], write)
    if write > longest then
      longest = write
    end
  end
end
if longest > 0 then
  keep(longest)
end

local parts = { string.format('%d:%d:%d', allowed, now_s, now_n) }
for i = 1, n do
  parts[#parts + 1] = string.format('%d', offsets[i])
end
local answer = table.concat(parts, ':')
redis.call('SET', KEYS[2], answer, 'PX', ARGV[3])
return answer
