-- Apply hosts' compact agent batches (docs/protocol.md, "Relayed answers"): each names the agent VMs of one
-- host that answered one round, every one arriving with the batch. The monitor checked each batch's round and
-- nonce; this script vouches for each VM (its record exists, places it on that host and on the agent path) and
-- records liveness as the monitor does for any answer (a round newer than the VM's last), without one Python
-- object per VM (docs/performance.md, "The relayed paths"). Idempotent: ZADD GT never goes back.
-- KEYS: last_round, last_seen, last_reply, attention
-- ARGV: vm key prefix, wire version and largest size (bytes) of the saved answer documents, then 5 per batch:
--       host, round, arrival ms, VM names separated by spaces, state params ('' or a JSON object vm -> params)
-- Returns {accepted, not newer, {reason, count, first vm, ...}, {vm, round, arrival, ...} of VMs in attention}.
-- include: lib_vouch.lua
-- include: lib_refusals.lua
local prefix, version, max_doc = ARGV[1], ARGV[2], tonumber(ARGV[3])
local accepted, stale = 0, 0
local heal = {}     -- vm, round, arrival of VMs in attention that answered
-- VMs needing attention (not healthy): usually few, read once; when many, asked per VM.
local attention_size = redis.call('SCARD', KEYS[4])
local attention = nil
if attention_size > 0 and attention_size <= 5000 then
  attention = {}
  for _, vm in ipairs(redis.call('SMEMBERS', KEYS[4])) do attention[vm] = true end
end
local function needs_attention(vm)
  if attention_size == 0 then return false end
  if attention then return attention[vm] == true end
  return redis.call('SISMEMBER', KEYS[4], vm) == 1
end
local CHUNK = 1000

for b = 4, #ARGV, 5 do
  local host, round, arrival, names, params = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local r = tonumber(round)
  local vouched, listed, count = {}, {}, 0
  for vm in string.gmatch(names, '%S+') do
    local refused = vouch(prefix .. vm, host)
    if refused then
      reject(refused, vm)
    elseif not vouched[vm] then
      vouched[vm] = true
      count = count + 1
      listed[count] = vm
    end
  end
  -- Only an answer to a round newer than the VM's last answered one counts (as on every path): a batch
  -- written twice, or an older round's, moves nothing.
  for start = 1, count, CHUNK do
    local stop = math.min(start + CHUNK - 1, count)
    local stored = redis.call('ZMSCORE', KEYS[1], unpack(listed, start, stop))
    local rounds, seen, n = {}, {}, 0
    for i = start, stop do
      local vm = listed[i]
      local last = stored[i - start + 1]
      if not last or tonumber(last) < r then
        rounds[n + 1], rounds[n + 2] = round, vm
        seen[n + 1], seen[n + 2] = arrival, vm
        n = n + 2
        if needs_attention(vm) then
          heal[#heal + 1] = vm
          heal[#heal + 1] = r
          heal[#heal + 1] = tonumber(arrival)
        end
      else
        vouched[vm] = nil
      end
    end
    if n > 0 then
      redis.call('ZADD', KEYS[1], 'GT', unpack(rounds, 1, n))
      redis.call('ZADD', KEYS[2], 'GT', unpack(seen, 1, n))
    end
    accepted = accepted + n / 2
    stale = stale + (stop - start + 1) - n / 2
  end
  if params ~= '' then
    local ok, by_vm = pcall(cjson.decode, params)
    if not ok or type(by_vm) ~= 'table' then
      reject('malformed', '')
    else
      for vm, p in pairs(by_vm) do
        if vouched[vm] and type(p) == 'table' then
          local doc = cjson.encode({v = tonumber(version), vm = vm, round = r, via = 'agent', host = host,
                                    params = p})
          if #doc <= max_doc then
            redis.call('HSET', KEYS[3], vm, doc)
          else
            reject('oversized', vm)
          end
        end
      end
    end
  end
end

return {accepted, stale, refusals(), heal}
