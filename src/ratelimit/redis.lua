-- keygate's rate-limit decisions: one or more groups of decisions, each decision over
-- every window of one key's bucket, in one atomic call. Decisions run in order, so two on
-- the same bucket see each other's charge exactly as two separate calls would. A group is
-- a run of decisions on one bucket with the same windows, cost and mode (a hot key's
-- batch is one group): the script reads its windows once and charges them in a loop.
--
-- KEYS[2g-1]  group g's bucket: a hash with one field per window, the window's
--             theoretical arrival time (TAT) as "seconds:nanoseconds" since the Unix epoch
-- KEYS[2g]    group g's markers: a hash of decision tokens, each holding what the
--             decision did ("1" charged, "0" refused, "cancelled", "ok" a refund taken), so
--             that a re-sent decision charges nothing again (a refund without a token names
--             its bucket here)
-- ARGV        marker lifetime (ms), now as seconds and nanoseconds ("" and "" for Redis's
--             own clock), extra bucket lifetime (ms), the number of specs; then each spec:
--             its number of windows, and for each window its field, its burst and its
--             charge (cost × interval, or one nanosecond more than the burst when the cost
--             exceeds the capacity) as seconds and nanoseconds; then for each group: its
--             mode ("c" charge, "r" refund), its spec (1-based), its number of decisions,
--             and each decision's token ("" none)
--
-- Returns integers: now (seconds, nanoseconds), then for each group the offset of each
-- window's TAT from now before the group (seconds, nanoseconds; zeros for refunds) and
-- each decision's status: 1 allowed, 0 refused, 3 and 4 a re-sent decision that was
-- allowed or refused before (it charges nothing now), -1 one cancelled or unreadable, 2 a
-- refund. Each allowed decision moves the group's offsets on by its charge.
--
-- Lua numbers are doubles, exact below 2^53: every time here is a pair (seconds,
-- nanoseconds) with 0 <= nanoseconds < 10^9, so every sum stays exact for any window.

local E9 = 1000000000
local floor = math.floor
local tonumber = tonumber

local function norm(s, n)
  local carry = floor(n / E9)
  return s + carry, n - carry * E9
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
local marker_ms = tonumber(ARGV[1])
local extra = tonumber(ARGV[4])

-- The specs, each read once per call.
local specs = {}
local at = 5
for i = 1, tonumber(ARGV[5]) do
  local n = tonumber(ARGV[at + 1])
  local spec = { n = n, field = {}, bs = {}, bn = {}, cs = {}, cn = {} }
  for w = 1, n do
    local base = at + 1 + 5 * (w - 1)
    spec.field[w] = ARGV[base + 1]
    spec.bs[w] = tonumber(ARGV[base + 2])
    spec.bn[w] = tonumber(ARGV[base + 3])
    spec.cs[w] = tonumber(ARGV[base + 4])
    spec.cn[w] = tonumber(ARGV[base + 5])
  end
  specs[i] = spec
  at = at + 1 + 5 * n
end
local first_group = at

-- The markers: every token of the call read up front, one HMGET per marker hash, and
-- what this call answers written at the end, after the buckets.
local markers = {}
local function marker_hash(name)
  local m = markers[name]
  if not m then
    m = { tokens = {}, count = 0, prior = {}, answers = {}, changed = {}, nchanged = 0 }
    markers[name] = m
  end
  return m
end
do
  local p = first_group
  for g = 1, #KEYS / 2 do
    local k = tonumber(ARGV[p + 3])
    for i = p + 4, p + 3 + k do
      local token = ARGV[i]
      if token ~= '' then
        local m = marker_hash(KEYS[2 * g])
        m.count = m.count + 1
        m.tokens[m.count] = token
      end
    end
    p = p + 3 + k
  end
end
for name, m in pairs(markers) do
  local got = redis.pcall('HMGET', name, unpack(m.tokens))
  if type(got) ~= 'table' or got.err ~= nil then
    -- Anything but a hash at the markers' name (written by someone else) is dropped.
    redis.call('DEL', name)
  else
    for i = 1, m.count do
      if got[i] then
        m.prior[m.tokens[i]] = got[i]
      end
    end
  end
end

-- The answer a token already holds, from this call or an earlier one.
local function answered(m, token)
  return m.answers[token] or m.prior[token]
end
local function answer_as(m, token, text)
  if not m.changed[token] then
    m.changed[token] = true
    m.nchanged = m.nchanged + 1
  end
  m.answers[token] = text
end

-- What this call has read and written of each bucket: each field's TAT as numbers (s is
-- false when the field holds none; unreadable marks a value that is not a TAT), the
-- fields changed, and the longest lifetime wanted. Read once, written once at the end.
local buckets = {}

-- A stored TAT as (seconds, nanoseconds), or nil when the field holds something else.
local function parse(v)
  local s, ns = string.match(v, '^(%d+):(%d+)$')
  if not s or #s > 15 or #ns > 9 then
    return nil
  end
  return tonumber(s), tonumber(ns)
end

local function opened(bucket, spec)
  local b = buckets[bucket]
  if not b then
    b = { s = {}, n = {}, bad = {}, changed = {}, want = nil, poisoned = false }
    buckets[bucket] = b
  end
  local missing
  local fields = spec.field
  for w = 1, spec.n do
    if b.s[fields[w]] == nil then
      missing = missing or {}
      missing[#missing + 1] = fields[w]
    end
  end
  if missing then
    local got = redis.pcall('HMGET', bucket, unpack(missing))
    if type(got) ~= 'table' or got.err ~= nil then
      -- Anything but a hash at the bucket's name (written by someone else) is dropped, and
      -- the bucket read as empty: it fails closed for one burst, then refills, never for good.
      redis.call('DEL', bucket)
      b.poisoned = true
      b.s, b.n, b.bad, b.changed = {}, {}, {}, {}
      for w = 1, spec.n do
        b.s[fields[w]] = false
      end
    else
      for i = 1, #missing do
        local field, v = missing[i], got[i]
        if v then
          local s, ns = parse(v)
          if s then
            b.s[field], b.n[field] = s, ns
          else
            b.s[field] = false
            b.bad[field] = true
          end
        else
          b.s[field] = false
        end
      end
    end
  end
  return b
end

-- Writes now + offset into a field of a bucket (false: removes it).
local function store(b, field, os, on)
  if os then
    b.s[field], b.n[field] = norm(now_s + os, now_n + on)
  else
    b.s[field] = false
  end
  b.bad[field] = nil
  b.changed[field] = true
end

-- Keeps a bucket until its emptiest window is full again (never shortening it, so that a
-- window another route still uses is not lost).
local function keep(b, ls, ln)
  local want = ls * 1000 + floor(ln / 1000000) + 1 + extra
  if not b.want or b.want < want then
    b.want = want
  end
end

local out = { now_s, now_n }
local o = 2

-- The offset of a window's TAT from now, within [0, burst], and whether it was clamped
-- (a TAT further ahead than one burst, a clock that stepped back, or unreadable).
local function offset(b, spec, w)
  local field = spec.field[w]
  local s = b.s[field]
  local ds, dn = 0, 0
  if s then
    ds, dn = norm(s - now_s, b.n[field] - now_n)
    if le(ds, dn, 0, 0) then
      ds, dn = 0, 0
    end
  elseif b.poisoned or b.bad[field] then
    return spec.bs[w], spec.bn[w], true
  end
  if not le(ds, dn, spec.bs[w], spec.bn[w]) then
    return spec.bs[w], spec.bn[w], true
  end
  return ds, dn, false
end

local function refund(b, spec)
  local seen = {}
  local ls, ln = 0, 0
  for w = 1, spec.n do
    local field = spec.field[w]
    local s = b.s[field]
    if s and not seen[field] then
      seen[field] = true
      local ds, dn = norm(s - now_s - spec.cs[w], b.n[field] - now_n - spec.cn[w])
      if le(spec.bs[w], spec.bn[w], ds, dn) then
        ds, dn = spec.bs[w], spec.bn[w]
      end
      if le(ds, dn, 0, 0) then
        store(b, field, false)
      else
        store(b, field, ds, dn)
        if le(ls, ln, ds, dn) then
          ls, ln = ds, dn
        end
      end
    end
  end
  if ls > 0 or ln > 0 then
    keep(b, ls, ln)
  end
end

local off_s, off_n, clamped = {}, {}, {}
local REPLAY = { ['1'] = 3, ['0'] = 4 }

-- A group of charges on one bucket and spec, tokens ARGV[first..last]: the windows read
-- once, then each decision in turn; once one is refused, every later one is (nothing
-- changed in between).
local function charges(b, spec, m, first, last)
  local n = spec.n
  for w = 1, n do
    off_s[w], off_n[w], clamped[w] = offset(b, spec, w)
    out[o + 1], out[o + 2] = off_s[w], off_n[w]
    o = o + 2
  end
  local allowed, refused = 0, false
  for i = first, last do
    local token = ARGV[i]
    local earlier = m and token ~= '' and answered(m, token)
    local status
    if earlier then
      status = REPLAY[earlier] or -1
    else
      status = 0
      if not refused then
        status = 1
        for w = 1, n do
          local ws, wn = norm(off_s[w] + spec.cs[w], off_n[w] + spec.cn[w])
          if not le(ws, wn, spec.bs[w], spec.bn[w]) then
            status = 0
          end
        end
        if status == 1 then
          allowed = allowed + 1
          for w = 1, n do
            off_s[w], off_n[w] = norm(off_s[w] + spec.cs[w], off_n[w] + spec.cn[w])
          end
        else
          refused = true
        end
      end
      if m and token ~= '' then
        answer_as(m, token, status == 1 and '1' or '0')
      end
    end
    o = o + 1
    out[o] = status
  end
  -- A full window needs no state: nothing is written for it. A window clamped on reading
  -- is stored so, so that the bucket refills from here rather than staying empty.
  local ls, ln = 0, 0
  for w = 1, n do
    if (allowed > 0 or clamped[w]) and (off_s[w] > 0 or off_n[w] > 0) then
      store(b, spec.field[w], off_s[w], off_n[w])
      if le(ls, ln, off_s[w], off_n[w]) then
        ls, ln = off_s[w], off_n[w]
      end
    end
  end
  if ls > 0 or ln > 0 then
    keep(b, ls, ln)
  end
end

local p = first_group
for g = 1, #KEYS / 2 do
  local mode, spec, k = ARGV[p + 1], specs[tonumber(ARGV[p + 2])], tonumber(ARGV[p + 3])
  local first, last = p + 4, p + 3 + k
  p = last
  local b = opened(KEYS[2 * g - 1], spec)
  local m = markers[KEYS[2 * g]]
  if mode == 'c' then
    charges(b, spec, m, first, last)
  else
    for _ = 1, spec.n do
      out[o + 1], out[o + 2] = 0, 0
      o = o + 2
    end
    for i = first, last do
      local token = ARGV[i]
      local marked = m and token ~= ''
      -- A refund with a token of its own (a retried give-back) is taken once.
      if not (marked and answered(m, token)) then
        refund(b, spec)
        if marked then
          answer_as(m, token, 'ok')
        end
      end
      o = o + 1
      out[o] = 2
    end
  end
end

-- The buckets first, then the answers: a call cut short charges rather than leave an
-- answer standing for a charge never made.
for bucket, b in pairs(buckets) do
  local set, gone = {}, {}
  for field in pairs(b.changed) do
    local s = b.s[field]
    if s then
      set[#set + 1] = field
      set[#set + 1] = string.format('%d:%d', s, b.n[field])
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
for name, m in pairs(markers) do
  if m.nchanged > 0 then
    local set = {}
    for token in pairs(m.changed) do
      set[#set + 1] = token
      set[#set + 1] = m.answers[token]
    end
    redis.call('HSET', name, unpack(set))
    -- Never shortened: a marker being settled is kept longer.
    if redis.call('PTTL', name) < marker_ms then
      redis.call('PEXPIRE', name, marker_ms)
    end
  end
end
return out
