"""The Lua scripts behind the shared counters (redis_counters.py).

Each check is one script: Redis runs it atomically, so two nodes can never both take the
last unit, and the time is Redis's own (``TIME``), never a node's clock. Every key gets its
expiry in the same script that writes it, so nothing outlives its window.
"""

# Microseconds (rates) and milliseconds (leases, logins) from Redis's clock. Before Redis
# 5, a script that reads TIME may only write once it replicates its effects, not itself.
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
"""

# A rate window is a hash of fixed slots: field k counts the units reserved between k*width
# and (k+1)*width; they leave the window ``span`` after the slot ends (never too early).
# Field t is the sum of the slots, field o the oldest slot that may still be there: slots
# leave in order, so a check reads only those that left since the last check, never the
# whole window (a user sending all the time fills all 60 slots of the minute: reading
# them all cost Redis 0.7 us a slot, a check 4 times as much).
_LIVE = """
local spans = {3600000000, 60000000}
local function live(i, width)
  local key, span = KEYS[i], spans[i]
  local meta = redis.call('HMGET', key, 't', 'o')
  local total = tonumber(meta[1])
  if not total then return 0 end
  local first = math.floor((now_us - span) / width)  -- the oldest slot in the window
  local oldest = tonumber(meta[2]) or first
  if oldest >= first then return total end
  local gone, dropped = {}, 0
  if first - oldest > 2 * tonumber(ARGV[1]) then  -- long unchecked: read them all once
    local h = redis.call('HGETALL', key)
    for j = 1, #h, 2 do
      local k = tonumber(h[j])
      if k and k < first then
        gone[#gone + 1] = h[j]
        dropped = dropped + tonumber(h[j + 1])
      end
    end
  else
    for k = oldest, first - 1 do
      local f = string.format('%d', k)
      local c = redis.call('HGET', key, f)
      if c then gone[#gone + 1] = f; dropped = dropped + tonumber(c) end
    end
  end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  total = total - dropped
  redis.call('HSET', key, 't', total, 'o', first)
  return total
end
local function slot(i)
  return string.format('%d', math.floor(now_us / (spans[i] / tonumber(ARGV[1]))))
end
-- A new slot sets the key's expiry: one window and one slot from now covers it (and
-- every slot before it), so the other units of the slot need not.
local function count(i, k, n)
  if redis.call('HINCRBY', KEYS[i], k, n) == n then
    local width = spans[i] / tonumber(ARGV[1])
    redis.call('PEXPIRE', KEYS[i], math.ceil((spans[i] + width) / 1000) + 1000)
  end
  if redis.call('HINCRBY', KEYS[i], 't', n) == n then redis.call('HSETNX', KEYS[i], 'o', k) end
end
"""

# KEYS: hour, minute; ARGV: slots, n, hour limit, minute limit. A window whose limit is 0
# is not counted at all (a per-minute limit turned on later counts from then on).
# {1, hour slot, minute slot ('' when not counted), Redis's time in us}, or
# {0, window (1 hour, 2 minute), seconds to wait}.
RATE_RESERVE = _NOW + _LIVE + """
local n = tonumber(ARGV[2])
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4])}
local worst, wait = 0, -1
for i = 1, 2 do
  if limits[i] > 0 then
    local width = spans[i] / tonumber(ARGV[1])
    local total = live(i, width)
    if total + n > limits[i] then  -- when the oldest units leave, enough room
      local h, slots = redis.call('HGETALL', KEYS[i]), {}
      for j = 1, #h, 2 do
        local k = tonumber(h[j])
        if k then slots[#slots + 1] = {k, tonumber(h[j + 1])} end
      end
      table.sort(slots, function(a, b) return a[1] < b[1] end)
      local need, freed, w = total + n - limits[i], 0, spans[i]
      for _, s in ipairs(slots) do
        freed = freed + s[2]
        if freed >= need then w = (s[1] + 1) * width + spans[i] - now_us; break end
      end
      if w > wait then worst, wait = i, w end
    end
  end
end
if worst > 0 then return {0, worst, math.ceil(wait / 1000000)} end
local result = {1}
for i = 1, 2 do
  local k = ''
  if limits[i] > 0 then
    k = slot(i)
    count(i, k, n)
  end
  result[#result + 1] = k
end
result[#result + 1] = now_us
return result
"""

# KEYS: hour, minute; ARGV: slots, units to count now in the hour and in the minute window
# (a commit; 0: a release), then (hour slot, minute slot, n) for each reservation to give
# back ('' for a window it was not counted in).
RATE_GIVE_BACK = _NOW + _LIVE + """
for j = 4, #ARGV, 3 do
  local n = tonumber(ARGV[j + 2])
  for i = 1, 2 do
    local k = ARGV[j + i - 1]
    local c = k ~= '' and redis.call('HGET', KEYS[i], k)
    if c then
      local back = math.min(tonumber(c), n)
      if tonumber(c) > back then redis.call('HSET', KEYS[i], k, tonumber(c) - back)
      else redis.call('HDEL', KEYS[i], k) end
      redis.call('HINCRBY', KEYS[i], 't', -back)
    end
  end
end
for i = 1, 2 do
  local n = tonumber(ARGV[i + 1])
  if n > 0 then count(i, slot(i), n) end
end
return 1
"""

# Connection leases: a sorted set per address or user, member = node:ticket, score = the
# time the lease expires unless its node renews it (every node renews its own).
# KEYS: the set; ARGV: limit (0: none), member, lease ms. {1, count} or {0, count}.
LEASE_TAKE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local held = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[1])
if limit > 0 and held >= limit and not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return {0, held}
end
local ms = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now_ms + ms, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ms)
return {1, redis.call('ZCARD', KEYS[1])}
"""

# KEYS: sets, one per member; ARGV: lease ms, members. Renews (or puts back, after Redis
# lost them while down) the leases of one node's open connections.
LEASE_RENEW = _NOW + """
local ms = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now_ms + ms, ARGV[i + 1])
  if redis.call('PTTL', KEYS[i]) < ms then redis.call('PEXPIRE', KEYS[i], ms) end
end
return #KEYS
"""

# KEYS: sets; ARGV: members.
LEASE_DROP = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i]) end
return 1
"""

# Failed logins: a sorted set per address key and per username, member = other\nsequence,
# score = the time in ms; the address's block is a key that expires with it.
_RECENT = """
local function recent(key, window, cap, member)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms - window)
  if member then
    redis.call('ZADD', key, now_ms, member)
    redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
    redis.call('PEXPIRE', key, window)
  end
  return redis.call('ZCARD', key)
end
local function others(key)
  local seen, n = {}, 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local o = string.match(m, '^(.*)\\n')
    if o and not seen[o] then seen[o] = true; n = n + 1 end
  end
  return n
end
"""

# KEYS: address set, address block; ARGV: window ms. {1, 0} when blocked, else {0, failures}.
LOGIN_CHECK = _NOW + _RECENT + """
if redis.call('PTTL', KEYS[2]) > 0 then return {1, 0} end
return {0, recent(KEYS[1], tonumber(ARGV[1]), 0, nil)}
"""

# KEYS: address set, address block, user set, sequence; ARGV: window ms, block_after,
# block ms, user cap, user, address key, alert threshold.
# {address failures, 1 if now blocked, user failures, addresses (at the alert, else 0)}.
LOGIN_FAILED = _NOW + _RECENT + """
local seq = redis.call('INCR', KEYS[4])
local window, block_after = tonumber(ARGV[1]), tonumber(ARGV[2])
local count = recent(KEYS[1], window, block_after, ARGV[5] .. '\\n' .. seq)
local blocked = 0
if count >= block_after then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', math.max(1, tonumber(ARGV[3])))
  blocked = 1
end
local users = recent(KEYS[3], window, tonumber(ARGV[4]), ARGV[6] .. '\\n' .. seq)
local addresses = 0
if users == tonumber(ARGV[7]) then addresses = others(KEYS[3]) end
return {count, blocked, users, addresses}
"""

# KEYS: address set, user set; ARGV: user, address key. Forgives the user's own failures
# from that address.
LOGIN_FORGIVE = """
local function forgive(key, other)
  local prefix = other .. '\\n'
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(m, 1, #prefix) == prefix then redis.call('ZREM', key, m) end
  end
end
forgive(KEYS[1], ARGV[1])
forgive(KEYS[2], ARGV[2])
return 1
"""

# Quotas: one hash per (user or account, day or month) holding the calendar period it
# counts (p: 2026-12-06 or 2026-12, in UTC by Redis's clock), the messages counted in it
# (u), the highest warning threshold reported (w), and the open transactions' places
# (o:<node>:<n> = the time in ms their lease ends). A hash whose p is past starts again
# from 0 (its open places kept), so nothing carries over into a new period. The expiry is
# set here too: the end of the period plus the lease.
_QUOTA = """
local sec = tonumber(t[1])
local days = math.floor(sec / 86400)
local function civil(n)
  local z = n + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local y, m, d = civil(days)
local periods = {
  d = {string.format('%04d-%02d-%02d', y, m, d), (days + 1) * 86400000},
  m = {string.format('%04d-%02d', y, m),
       days_from_civil(m == 12 and y + 1 or y, m == 12 and 1 or m + 1, 1) * 86400000},
}
local function state(key, pid)
  local h = redis.call('HGETALL', key)
  local f, held, stale = {}, 0, {}
  for i = 1, #h, 2 do
    f[h[i]] = h[i + 1]
    if string.sub(h[i], 1, 2) == 'o:' then
      if tonumber(h[i + 1]) <= now_ms then stale[#stale + 1] = h[i] else held = held + 1 end
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if f['p'] ~= pid then
    redis.call('HSET', key, 'p', pid, 'u', 0, 'w', 0)
    return 0, 0, held
  end
  return tonumber(f['u'] or 0), tonumber(f['w'] or 0), held
end
"""

# KEYS: the quotas' hashes; ARGV: member, lease ms, then per key its period (d or m) and
# limit. All or none: {1, (period id, used) per key}, or {0, index of the quota used up,
# used, period id, 1 if this refusal is the first report of its messages filling it}.
QUOTA_RESERVE = _NOW + _QUOTA + """
local lease = tonumber(ARGV[2])
local result = {1}
for i = 1, #KEYS do
  local period = periods[ARGV[2 * i + 1]]
  local used, warned, held = state(KEYS[i], period[1])
  if used + held >= tonumber(ARGV[2 * i + 2]) then
    local first = 0
    if warned < 100 and used >= tonumber(ARGV[2 * i + 2]) then
      redis.call('HSET', KEYS[i], 'w', 100); first = 1
    end
    redis.call('PEXPIREAT', KEYS[i], period[2] + lease)
    return {0, i, used, period[1], first}
  end
  result[#result + 1] = period[1]
  result[#result + 1] = used
end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'o:' .. ARGV[1], now_ms + lease)
  redis.call('PEXPIREAT', KEYS[i], periods[ARGV[2 * i + 1]][2] + lease)
end
return result
"""

# KEYS: the quotas' hashes; ARGV: member, lease ms, then per key its period and limit.
# The message counts (in the period of now) and its places are given up; per key
# {used, threshold newly reached (80, 90, 100) or 0, period id}.
QUOTA_COMMIT = _NOW + _QUOTA + """
local lease = tonumber(ARGV[2])
local result = {}
for i = 1, #KEYS do
  local period = periods[ARGV[2 * i + 1]]
  local limit = tonumber(ARGV[2 * i + 2])
  local used, warned = state(KEYS[i], period[1])
  redis.call('HDEL', KEYS[i], 'o:' .. ARGV[1])
  used = used + 1
  local reached = 0
  for _, percent in ipairs({80, 90, 100}) do
    if used * 100 >= limit * percent and percent > warned then reached = percent end
  end
  redis.call('HSET', KEYS[i], 'u', used)
  if reached > 0 then redis.call('HSET', KEYS[i], 'w', reached) end
  redis.call('PEXPIREAT', KEYS[i], period[2] + lease)
  result[#result + 1] = used
  result[#result + 1] = reached
  result[#result + 1] = period[1]
end
return result
"""

# KEYS: the quotas' hashes; ARGV: per key its period. Read only (mailrelay-admin
# explain): per key {period id, used, open places}.
QUOTA_USAGE = _NOW + _QUOTA.split("local function state", 1)[0] + """
local result = {}
for i = 1, #KEYS do
  local pid = periods[ARGV[i]][1]
  local h = redis.call('HGETALL', KEYS[i])
  local f, held = {}, 0
  for j = 1, #h, 2 do
    f[h[j]] = h[j + 1]
    if string.sub(h[j], 1, 2) == 'o:' and tonumber(h[j + 1]) > now_ms then held = held + 1 end
  end
  result[#result + 1] = pid
  result[#result + 1] = f['p'] == pid and tonumber(f['u'] or 0) or 0
  result[#result + 1] = held
end
return result
"""

# KEYS: the quotas' hashes; ARGV: member. An aborted transaction gives its places back.
QUOTA_RELEASE = """
for i = 1, #KEYS do redis.call('HDEL', KEYS[i], 'o:' .. ARGV[1]) end
return 1
"""
