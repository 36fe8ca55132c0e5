-- Take VMs out of their host's cover (docs/protocol.md, "Cover entries") and give each the last answered round
-- its host vouched for, or the given mark: a restart, or an answer on another path, starts its own account. The
-- host's next entry asks Redis to vouch for them again (its pending set), so a VM its host still asks is covered
-- again from its next answer to a round newer than that.
-- KEYS: last_round, last_seen, covers, owner
-- ARGV: pending key prefix, cover key prefix, silent key prefix, COVERED, mark ('' : the host's round), vm ...
-- Returns the number of VMs released.
local pending_prefix, cover_prefix, silent_prefix = ARGV[1], ARGV[2], ARGV[3]
local COVERED, mark = tonumber(ARGV[4]), ARGV[5]
local released = 0
for i = 6, #ARGV do
  local vm = ARGV[i]
  local host = redis.call('HGET', KEYS[4], vm)
  if host then
    redis.call('HDEL', KEYS[4], vm)
    redis.call('SREM', cover_prefix .. host, vm)
    redis.call('SREM', silent_prefix .. host, vm)
    redis.call('SADD', pending_prefix .. host, vm)
    local state = redis.call('HGET', KEYS[3], host) or ''
    local r, arrival = string.match(state, '^(%d+) (%d+) ')
    local s = redis.call('ZSCORE', KEYS[1], vm)
    if mark == '' and s and tonumber(s) >= COVERED then
      redis.call('ZADD', KEYS[1], 'XX', tonumber(r) or 0, vm)
      if arrival then redis.call('ZADD', KEYS[2], 'GT', tonumber(arrival), vm) end
    end
    released = released + 1
  end
  if mark ~= '' then redis.call('ZADD', KEYS[1], tonumber(mark), vm) end
end
return released
