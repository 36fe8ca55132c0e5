-- Apply hosts' cover entries (docs/protocol.md, "Cover entries"): once per round a host states which of the
-- agent VMs it asks did not answer (x), relative to its latest full listing (f, base round c). Redis vouches for
-- each listed VM once per listing (its record places it on that host, on the agent path) and keeps it "covered":
-- its last_round is COVERED, and the host's applied round stands for it (vmq.store.replies resolves it). Only
-- changes are written per round: the VMs falling silent get their real last answered round, those answering
-- again get COVERED back. So a round costs Redis O(hosts + changes), not O(VMs) (docs/performance.md).
-- The monitor checked each entry's round and nonce. An entry not newer than the host's applied round, or
-- relative to a listing Redis did not apply, changes nothing (and then its round is not marked finished). A
-- partial entry (calls still running) may be followed by more of the same round; only the final one marks the
-- round finished, after which that round is closed.
-- KEYS: last_round, last_seen, last_reply, attention, covers, owner, relay_rounds, relay_unasked
-- ARGV: vm key prefix, cover/pending/silent key prefixes, COVERED, rounds of finish marks kept, then 10 per entry:
--       host, round, arrival ms, base round, full ('1'/'0'),
--       listing (names separated by spaces), silent names, unasked names, saved answer documents ("<vm> <JSON>"
--       lines, built and size-checked by the monitor),
--       final ('1': it marks the round finished; '0': partial)
-- Returns {applied entries, stale entries, answers, {reason, count, first, ...}, {vm, round, arrival, ...} to heal}.
-- include: lib_vouch.lua
-- include: lib_refusals.lua
local vm_prefix, cover_prefix, pending_prefix, silent_prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local COVERED, kept = tonumber(ARGV[5]), tonumber(ARGV[6])
local applied, stale, answers = 0, 0, 0
local heal = {}
local newest = 0

local function words(text)
  local out, seen = {}, {}
  for name in string.gmatch(text, '%S+') do
    if not seen[name] then
      seen[name] = true
      out[#out + 1] = name
    end
  end
  return out, seen
end

local function covers_of(host)
  local state = redis.call('HGET', KEYS[5], host)
  if not state then return 0, 0, 0, true end
  local r, arrival, base, final = string.match(state, '^(%d+) (%d+) (%d+) ([01])$')
  return tonumber(r) or 0, tonumber(arrival) or 0, tonumber(base) or 0, final ~= '0'
end

local function score_of(vm)
  local s = redis.call('ZSCORE', KEYS[1], vm)
  if s then return tonumber(s) end
  return nil
end

-- The host stops vouching for vm: its last answered round becomes the host's last applied one.
local function release(vm, host, last_r, last_arrival)
  if redis.call('HGET', KEYS[6], vm) == host then
    redis.call('HDEL', KEYS[6], vm)
    local s = score_of(vm)
    if s and s >= COVERED then
      redis.call('ZADD', KEYS[1], 'XX', last_r, vm)
      if last_arrival > 0 then redis.call('ZADD', KEYS[2], 'GT', last_arrival, vm) end
    end
  end
  redis.call('SREM', cover_prefix .. host, vm)
  redis.call('SREM', silent_prefix .. host, vm)
end

local function apply(b)
  local host, r, arrival, base = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local full, listing, silent_text, unasked_text, params = ARGV[b + 4] == '1', ARGV[b + 5], ARGV[b + 6],
                                                           ARGV[b + 7], ARGV[b + 8]
  local final = ARGV[b + 9] == '1'
  local last_r, last_arrival, have_base, last_final = covers_of(host)
  if r < last_r or (r == last_r and last_final) then
    stale = stale + 1
    return
  end
  if r == last_r then  -- more of a round a partial entry began: what it held stands for the round before
    last_r = r - 1
  end
  if not full and base ~= have_base then
    reject('cover_base', host)  -- its listing never reached Redis: this round is not vouched for
    return
  end
  local cover_key, pending_key, silent_key = cover_prefix .. host, pending_prefix .. host, silent_prefix .. host
  local newly = {}   -- vm -> the round its previous owner last vouched for (covered by this entry first)
  local function take(vm)
    local previous = redis.call('HGET', KEYS[6], vm)
    if previous == host then
      redis.call('SADD', cover_key, vm)
      return
    end
    local since = last_r
    if previous then
      since = covers_of(previous)
      redis.call('SREM', cover_prefix .. previous, vm)
      redis.call('SREM', silent_prefix .. previous, vm)
    end
    redis.call('HSET', KEYS[6], vm, host)
    redis.call('SADD', cover_key, vm)
    newly[vm] = since
  end
  if full then
    local listed, is_listed = words(listing)
    for _, vm in ipairs(redis.call('SMEMBERS', cover_key)) do
      if not is_listed[vm] then release(vm, host, last_r, last_arrival) end
    end
    redis.call('DEL', pending_key)
    for _, vm in ipairs(listed) do
      local refused = vouch(vm_prefix .. vm, host)
      if refused then
        release(vm, host, last_r, last_arrival)
        redis.call('SADD', pending_key, vm)
        reject(refused, vm)
      else
        take(vm)
      end
    end
  else
    for _, vm in ipairs(redis.call('SMEMBERS', pending_key)) do
      if not vouch(vm_prefix .. vm, host) then
        redis.call('SREM', pending_key, vm)
        take(vm)
      end
    end
  end
  local silent, is_silent = words(silent_text)
  local unasked = words(unasked_text)
  for _, vm in ipairs(unasked) do  -- never asked: silent, and its silence is no evidence (relay_unasked)
    if not is_silent[vm] then
      is_silent[vm] = true
      silent[#silent + 1] = vm
    end
    if redis.call('HGET', vm_prefix .. vm, 'host') == host then
      redis.call('ZADD', KEYS[8], 'GT', r, vm)
    end
  end
  local still = {}   -- this entry's silent VMs that the host vouches for
  local function answered(vm)
    local s = score_of(vm)
    if s and s >= COVERED then return true end
    if s == nil or s < r then
      redis.call('ZADD', KEYS[1], COVERED, vm)
      redis.call('ZADD', KEYS[2], 'GT', arrival, vm)
      return true
    end
    still[#still + 1] = vm  -- this round is not newer than its mark (a restart's): not an answer yet
    return false
  end
  for _, vm in ipairs(redis.call('SMEMBERS', silent_key)) do
    if not is_silent[vm] and not newly[vm] and redis.call('HGET', KEYS[6], vm) == host then answered(vm) end
  end
  for _, vm in ipairs(silent) do
    if redis.call('HGET', KEYS[6], vm) == host then
      local s = score_of(vm)
      if s and s >= COVERED then  -- it answered up to the round its host (or its previous host) last vouched for
        local since = newly[vm] or last_r
        if since <= 0 then since = r - 1 end
        redis.call('ZADD', KEYS[1], 'XX', since, vm)
        if last_arrival > 0 and not newly[vm] then redis.call('ZADD', KEYS[2], 'GT', last_arrival, vm) end
      end
      still[#still + 1] = vm
    end
  end
  for vm, _ in pairs(newly) do
    if not is_silent[vm] then answered(vm) end
  end
  redis.call('DEL', silent_key)
  if #still > 0 then redis.call('SADD', silent_key, unpack(still)) end
  local now_silent = {}
  for _, vm in ipairs(still) do now_silent[vm] = true end
  -- VMs needing attention (unknown, faulty, restarting ...) that this host vouches answered: the monitor heals them.
  for _, vm in ipairs(redis.call('SINTER', cover_key, KEYS[4])) do
    if not now_silent[vm] and redis.call('HGET', KEYS[6], vm) == host then
      local s = score_of(vm)
      if s and s >= COVERED then
        heal[#heal + 1] = vm
        heal[#heal + 1] = r
        heal[#heal + 1] = arrival
      end
    end
  end
  -- State parameters: saved answer documents built by the monitor ("<vm> <document>" lines), for VMs this host
  -- vouches answered.
  for line in string.gmatch(params, '[^\n]+') do
    local space = string.find(line, ' ', 1, true)
    if space then
      local vm = string.sub(line, 1, space - 1)
      if not now_silent[vm] and redis.call('HGET', KEYS[6], vm) == host then
        redis.call('HSET', KEYS[3], vm, string.sub(line, space + 1))
      end
    end
  end
  local size = redis.call('SCARD', cover_key) - #still
  if final and size > 0 then answers = answers + size end  -- counted once per round: with its final entry
  if full then have_base = r end
  redis.call('HSET', KEYS[5], host, r .. ' ' .. arrival .. ' ' .. have_base .. ' ' .. (final and '1' or '0'))
  if final then
    redis.call('ZADD', KEYS[7], r, host .. '|' .. r)  -- the round is finished: its silence is evidence
    if r > newest then newest = r end
  end
  applied = applied + 1
end

for b = 7, #ARGV, 10 do
  apply(b)
end
if newest > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. (newest - kept))
end

return {applied, stale, answers, refusals(), heal}
