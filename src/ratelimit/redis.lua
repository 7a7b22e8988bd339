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

-- Writes now + offset into a field of a bucket.
local function store(bucket, field, os, on)
  local s, ns = add(now_s, now_n, os, on)
  redis.call('HSET', bucket, field, string.format('%d:%d', s, ns))
end

-- Keeps a bucket until its emptiest window is full again (never shortening it, so that a
-- window another route still uses is not lost).
local function keep(bucket, ls, ln)
  local want = ls * 1000 + math.floor(ln / 1000000) + 1 + extra
  if redis.call('PTTL', bucket) < want then
    redis.call('PEXPIRE', bucket, want)
  end
end

-- One decision on `bucket`, its windows read from ARGV starting after index `at`.
local function decide(bucket, marker, mode, n, at)
  if mode == 'c' then
    local prior = redis.pcall('GET', marker)
    if type(prior) == 'string' then
      return prior
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

  -- Anything but a hash at the bucket's name (written by someone else) is dropped, and the
  -- bucket read as empty: it fails closed for one burst, then refills, never for good.
  local stored = redis.pcall('HMGET', bucket, unpack(fields))
  local poisoned = type(stored) ~= 'table' or stored.err ~= nil
  if poisoned then
    redis.call('DEL', bucket)
    stored = {}
  end

  -- A refund with a marker of its own (a retried give-back) is taken once.
  local marked = mode == 'r' and marker ~= bucket
  if marked then
    local prior = redis.pcall('GET', marker)
    if type(prior) == 'string' then
      return prior
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
          redis.call('HDEL', bucket, fields[i])
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
    if marked then
      redis.call('SET', marker, 'ok', 'PX', marker_ms)
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
  redis.call('SET', marker, answer, 'PX', marker_ms)
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
return answers
