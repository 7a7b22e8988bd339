-- keygate's rate-limit decisions: one or more decisions, each over every window of one
-- key's bucket, in one atomic call. Decisions run in order, so two on the same bucket see
-- each other's charge exactly as two separate calls would.
--
-- KEYS[2d-1]  decision d's bucket: a hash with one field per window, the window's
--             theoretical arrival time (TAT) as "seconds:nanoseconds" since the Unix epoch
-- KEYS[2d]    decision d's marker: a re-sent call finds its first answer here and charges
--             nothing again (a refund without a marker names its bucket here)
-- ARGV        marker lifetime (ms), now as seconds and nanoseconds ("" and "" for Redis's
--             own clock), extra bucket lifetime (ms); then for each decision: its mode ("c"
--             charge, "r" refund), its number of windows, and for each window its field, its
--             burst and its charge (cost × interval, or one nanosecond more than the burst
--             when the cost exceeds the capacity) as seconds and nanoseconds
--
-- Returns one answer per decision: "allowed:now_s:now_ns:offset…" for a charge (or the
-- marker's earlier text), "ok" for a refund.
--
-- Lua numbers are doubles, exact below 2^53: every time here is a pair (seconds,
-- nanoseconds) with 0 <= nanoseconds < 10^9, so every sum stays exact for any window.

local E9 = 1000000000

local function norm(s, n)
  local carry = math.floor(n / E9)
  return s + carry, n - carry * E9
end
local function add(as, an, bs, bn)
  return norm(as + bs, an + bn)
end
local function sub(as, an, bs, bn)
  return norm(as - bs, an - bn)
end
local function le(as, an, bs, bn)
  return as < bs or (as == bs and an <= bn)
end

local now_s, now_n
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now_s = tonumber(t[1])
  now_n = tonumber(t[2]) * 1000
else
  now_s = tonumber(ARGV[2])
  now_n = tonumber(ARGV[3])
end
local marker_ms = ARGV[1]
local extra = tonumber(ARGV[4])

-- A stored TAT as (seconds, nanoseconds), or nil when the field holds something else.
local function parse(v)
  if not v then
    return nil
  end
  local s, ns = string.match(v, '^(%d+):(%d+)$')
  if not s or #s > 15 or #ns > 9 then
    return nil
  end
  return tonumber(s), tonumber(ns)
end

-- What this call has read and written of each bucket, so that the decisions of one call
-- on one bucket (a hot key) read it once and write it once, at the end: each field's value
-- (false: none), the fields changed, and the longest lifetime wanted. The answers given,
-- by marker, are written at the end too, after the buckets, and found here by a decision
-- repeated within the call.
local buckets = {}
local answered, marked = {}, {}

local function opened(bucket)
  local b = buckets[bucket]
  if not b then
    b = { values = {}, changed = {}, want = nil }
    buckets[bucket] = b
  end
  return b
end

-- The stored values of `fields` (false where none), and whether the bucket held something
-- else than a hash (then dropped, and read as empty).
local function read(bucket, fields)
  local b = opened(bucket)
  local missing = {}
  for i = 1, #fields do
    if b.values[fields[i]] == nil then
      missing[#missing + 1] = fields[i]
    end
  end
  local poisoned = false
  if #missing > 0 then
    local got = redis.pcall('HMGET', bucket, unpack(missing))
    if type(got) ~= 'table' or got.err ~= nil then
      -- Anything but a hash at the bucket's name (written by someone else) is dropped, and
      -- the bucket read as empty: it fails closed for one burst, then refills, never for good.
      redis.call('DEL', bucket)
      poisoned = true
      b.values = {}
      b.changed = {}
      for i = 1, #fields do
        b.values[fields[i]] = false
      end
    else
      for i = 1, #missing do
        b.values[missing[i]] = got[i] or false
      end
    end
  end
  local stored = {}
  for i = 1, #fields do
    stored[i] = b.values[fields[i]]
  end
  return stored, poisoned
end

-- Writes now + offset into a field of a bucket.
local function store(bucket, field, os, on)
  local s, ns = add(now_s, now_n, os, on)
  local b = opened(bucket)
  b.values[field] = string.format('%d:%d', s, ns)
  b.changed[field] = true
end

-- Removes a field of a bucket.
local function remove(bucket, field)
  local b = opened(bucket)
  b.values[field] = false
  b.changed[field] = true
end

-- Keeps a bucket until its emptiest window is full again (never shortening it, so that a
-- window another route still uses is not lost).
local function keep(bucket, ls, ln)
  local want = ls * 1000 + math.floor(ln / 1000000) + 1 + extra
  local b = opened(bucket)
  if not b.want or b.want < want then
    b.want = want
  end
end

-- An answer given under a marker (kept at the end of the call).
local function answer_as(marker, text)
  if not answered[marker] then
    marked[#marked + 1] = marker
  end
  answered[marker] = text
end

-- The answer a marker already holds, from this call or an earlier one.
local function prior(marker)
  local here = answered[marker]
  if here then
    return here
  end
  local got = redis.pcall('GET', marker)
  if type(got) == 'string' then
    return got
  end
  return nil
end

-- One decision on `bucket`, its windows read from ARGV starting after index `at`.
local function decide(bucket, marker, mode, n, at)
  if mode == 'c' then
    local earlier = prior(marker)
    if earlier then
      return earlier
    end
  end

  local fields, burst_s, burst_n, charge_s, charge_n = {}, {}, {}, {}, {}
  for i = 1, n do
    local base = at + 5 * (i - 1)
    fields[i] = ARGV[base + 1]
    burst_s[i] = tonumber(ARGV[base + 2])
    burst_n[i] = tonumber(ARGV[base + 3])
    charge_s[i] = tonumber(ARGV[base + 4])
    charge_n[i] = tonumber(ARGV[base + 5])
  end

  local stored, poisoned = read(bucket, fields)

  -- A refund with a marker of its own (a retried give-back) is taken once.
  local own_marker = mode == 'r' and marker ~= bucket
  if own_marker then
    local earlier = prior(marker)
    if earlier then
      return earlier
    end
  end

  if mode == 'r' then
    local seen = {}
    local ls, ln = 0, 0
    for i = 1, n do
      local s, ns = parse(stored[i])
      if s and not seen[fields[i]] then
        seen[fields[i]] = true
        local ds, dn = sub(s, ns, now_s, now_n)
        ds, dn = sub(ds, dn, charge_s[i], charge_n[i])
        if le(burst_s[i], burst_n[i], ds, dn) then
          ds, dn = burst_s[i], burst_n[i]
        end
        if le(ds, dn, 0, 0) then
          remove(bucket, fields[i])
        else
          store(bucket, fields[i], ds, dn)
          if le(ls, ln, ds, dn) then
            ls, ln = ds, dn
          end
        end
      end
    end
    if ls > 0 or ln > 0 then
      keep(bucket, ls, ln)
    end
    if own_marker then
      answer_as(marker, 'ok')
    end
    return 'ok'
  end

  -- The offset of each window's TAT from now, within [0, burst]. A TAT further ahead than
  -- one burst (a clock that stepped back) or unreadable is clamped to one burst and stored
  -- so, so that the bucket refills from here rather than staying empty.
  local off_s, off_n, clamped = {}, {}, {}
  for i = 1, n do
    local v = stored[i]
    local s, ns = parse(v)
    local ds, dn = 0, 0
    if s then
      ds, dn = sub(s, ns, now_s, now_n)
      if le(ds, dn, 0, 0) then
        ds, dn = 0, 0
      end
    elseif poisoned or (v and v ~= false) then
      ds, dn = burst_s[i], burst_n[i]
      clamped[i] = true
    end
    if not le(ds, dn, burst_s[i], burst_n[i]) then
      ds, dn = burst_s[i], burst_n[i]
      clamped[i] = true
    end
    off_s[i], off_n[i] = ds, dn
  end

  local allowed = 1
  for i = 1, n do
    local ns_, nn_ = add(off_s[i], off_n[i], charge_s[i], charge_n[i])
    if not le(ns_, nn_, burst_s[i], burst_n[i]) then
      allowed = 0
    end
  end

  local ls, ln = 0, 0
  for i = 1, n do
    local ws, wn
    if allowed == 1 then
      ws, wn = add(off_s[i], off_n[i], charge_s[i], charge_n[i])
    elseif clamped[i] then
      ws, wn = off_s[i], off_n[i]
    end
    -- A full window needs no state: nothing is written for it.
    if ws and (ws > 0 or wn > 0) then
      store(bucket, fields[i], ws, wn)
      if le(ls, ln, ws, wn) then
        ls, ln = ws, wn
      end
    end
  end
  if ls > 0 or ln > 0 then
    keep(bucket, ls, ln)
  end

  local parts = { string.format('%d:%d:%d', allowed, now_s, now_n) }
  for i = 1, n do
    parts[#parts + 1] = string.format('%d.%09d', off_s[i], off_n[i])
  end
  local answer = table.concat(parts, ':')
  answer_as(marker, answer)
  return answer
end

local answers = {}
local at = 4
for d = 1, #KEYS / 2 do
  local mode = ARGV[at + 1]
  local n = tonumber(ARGV[at + 2])
  answers[d] = decide(KEYS[2 * d - 1], KEYS[2 * d], mode, n, at + 2)
  at = at + 2 + 5 * n
end

-- The buckets first, then the answers: a call cut short charges rather than leave an
-- answer standing for a charge never made.
for bucket, b in pairs(buckets) do
  local set, gone = {}, {}
  for field in pairs(b.changed) do
    local v = b.values[field]
    if v then
      set[#set + 1] = field
      set[#set + 1] = v
    else
      gone[#gone + 1] = field
    end
  end
  if #set > 0 then
    redis.call('HSET', bucket, unpack(set))
  end
  if #gone > 0 then
    redis.call('HDEL', bucket, unpack(gone))
  end
  if b.want and redis.call('PTTL', bucket) < b.want then
    redis.call('PEXPIRE', bucket, b.want)
  end
end
for i = 1, #marked do
  redis.call('SET', marked[i], answered[marked[i]], 'PX', marker_ms)
end
return answers
