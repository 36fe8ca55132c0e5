-- Claim one restart attempt for a host worker: the per-incident idempotency key.
-- KEYS: vm_hash
-- ARGV: generation, claimant, incident
-- Returns 1 when this caller may act, 0 when the attempt is closed, changed or already claimed.
local state = redis.call('HGET', KEYS[1], 'state')
local gen = redis.call('HGET', KEYS[1], 'generation')
local incident = redis.call('HGET', KEYS[1], 'incident') or ''
local claim = redis.call('HGET', KEYS[1], 'claim') or ''
if state ~= 'restarting' or gen ~= ARGV[1] or incident ~= ARGV[3] or claim ~= '' then
  return 0
end
redis.call('HSET', KEYS[1], 'claim', ARGV[2])
return 1
