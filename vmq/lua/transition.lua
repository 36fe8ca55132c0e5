-- Compare-and-set one VM's state, bump its generation, keep the attention set, append the audit event.
-- KEYS: vm_hash, events, attention, restarts
-- ARGV: vm, from_states (comma list), to_state, now_ms, expected_generation ('' = any),
--       count_restart ('1'/'0'), events_maxlen, restart_window_ms, n_fields, field/value pairs...,
--       then event field/value pairs to the end.
-- Returns {1, old_state, new_generation} on success, {0, current_state, generation} when refused.
local vm_key, events, attention, restarts = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local vm, to_state, now_ms = ARGV[1], ARGV[3], ARGV[4]
local state = redis.call('HGET', vm_key, 'state') or 'unknown'
local gen = tonumber(redis.call('HGET', vm_key, 'generation') or '0')
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return {0, state, gen} end
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= gen then return {0, state, gen} end
-- A restart a host worker has claimed is under way: a reply must not close it behind the worker's back,
-- until the claim's hold ends (claim.lua): after that the worker is presumed dead, and a reply heals.
if state == 'restarting' and to_state == 'healthy' then
  local claim = redis.call('HGET', vm_key, 'claim')
  local until_ms = tonumber(redis.call('HGET', vm_key, 'claim_until_ms') or '')
  if claim and claim ~= '' and (not until_ms or tonumber(now_ms) < until_ms) then return {0, state, gen} end
end
gen = gen + 1
redis.call('HSET', vm_key, 'state', to_state, 'generation', gen, 'state_since_ms', now_ms, 'claim', '')
local n = tonumber(ARGV[9])
local i = 10
for _ = 1, n do
  redis.call('HSET', vm_key, ARGV[i], ARGV[i + 1])
  i = i + 2
end
if to_state == 'healthy' then
  redis.call('SREM', attention, vm)
else
  redis.call('SADD', attention, vm)
end
if ARGV[6] == '1' then
  redis.call('ZADD', restarts, now_ms, gen .. ':' .. now_ms)
  redis.call('ZREMRANGEBYSCORE', restarts, '-inf', '(' .. (tonumber(now_ms) - 2 * tonumber(ARGV[8])))
end
local event = {'from', state, 'to', to_state, 'generation', tostring(gen)}
while i <= #ARGV do
  table.insert(event, ARGV[i])
  table.insert(event, ARGV[i + 1])
  i = i + 2
end
redis.call('XADD', events, 'MAXLEN', '~', ARGV[7], '*', unpack(event))
return {1, state, gen}
