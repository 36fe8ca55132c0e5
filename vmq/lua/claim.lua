-- Claim one restart attempt for a host worker: the per-incident idempotency key.
-- KEYS: vm_hash
-- ARGV: generation, claimant, incident, hold_ms (optional)
-- Returns 1 when this caller may act, 0 when the attempt is closed, changed or already claimed.
-- With hold_ms, the claim keeps replies from closing the attempt only until Redis time + hold_ms
-- (claim_until_ms): a worker that dies after claiming must not leave the VM `restarting` for ever.
local state = redis.call('HGET', KEYS[1], 'state')
local gen = redis.call('HGET', KEYS[1], 'generation')
local incident = redis.call('HGET', KEYS[1], 'incident') or ''
local claim = redis.call('HGET', KEYS[1], 'claim') or ''
if state ~= 'restarting' or gen ~= ARGV[1] or incident ~= ARGV[3] or claim ~= '' then
  return 0
end
redis.call('HSET', KEYS[1], 'claim', ARGV[2])
local hold = tonumber(ARGV[4] or '')
if hold then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'claim_until_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + hold)
else
  redis.call('HDEL', KEYS[1], 'claim_until_ms')
end
return 1
