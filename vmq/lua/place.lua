-- Place one VM's record after one host's domain listing: atomic, so two hosts listing the same domain at
-- the same moment cannot overwrite each other with what they read before the other wrote.
-- KEYS: vm_hash
-- ARGV: host, status, uuid, reason, now_ms, active statuses (comma list),
--       heartbeat key prefix, heartbeat key suffix (prefix .. host .. suffix exists while the host lives),
--       paused reasons of a live migration (comma list: libvirt's "migration", "postcopy", ...),
--       listed_us (Redis time in µs before this host listed its domains; 0: unknown)
-- status 'absent' means the domain vanished from this host's listing: only the host the record names
-- marks it absent. An inactive domain (shut off, crashed) never takes the record from another live host
-- that has the domain defined, nor from a gone host where it was last seen active: the host where it is active keeps the VM, and two stale definitions do not
-- take it from each other in turn. An active domain takes the record (that is how a move is seen), except one
-- paused by a live migration: the destination's copy while memory is copied in, the source's at the switch-over;
-- it claims only like an inactive one, so a migration moves the record once, when the destination runs.
-- A listing taken before another host last placed the record never moves it back (placed_us): at a
-- switch-over, the source's listing from just before it can land after the destination's.
-- Returns {written, previous_host, migrated, started}, the flags 1 or 0; started means booted_at_ms = now_ms.
local vm_key, host, status, uuid, reason, now_ms = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local active, migrating = {}, {}
for s in string.gmatch(ARGV[6], '[^,]+') do
  active[s] = true
end
for r in string.gmatch(ARGV[9] or '', '[^,]+') do
  migrating[r] = true
end
local claims = active[status] and not (status == 'paused' and migrating[reason])
local owner = redis.call('HGET', vm_key, 'host') or ''
local old_status = redis.call('HGET', vm_key, 'domain_status') or 'absent'
local booted = redis.call('HGET', vm_key, 'booted_at_ms') or ''

if status == 'absent' then
  if owner == host and old_status ~= 'absent' then
    redis.call('HSET', vm_key, 'domain_status', status, 'domain_reason', reason)
    return {1, owner, 0, 0}
  end
  return {0, owner, 0, 0}
end

local elsewhere = owner ~= '' and owner ~= host
local listed_us = tonumber(ARGV[10] or '0') or 0
if elsewhere and listed_us > 0 and listed_us < (tonumber(redis.call('HGET', vm_key, 'placed_us') or '0') or 0) then
  return {0, owner, 0, 0}
end
-- Nor does an inactive definition take a VM that was active on its host when that host went silent: the host
-- may be cut off, not off, and the VM still running there (issue 18); it stays there, `unreachable`, until it is
-- seen active somewhere or its host answers again.
if not claims and elsewhere and old_status ~= 'absent'
    and (redis.call('EXISTS', ARGV[7] .. owner .. ARGV[8]) == 1 or (not active[status] and active[old_status])) then
  return {0, owner, 0, 0}
end

-- A move of a VM that ran before; a never-started definition claimed first at startup is no migration.
local migrated = (elsewhere and active[status] and booted ~= '') and 1 or 0
local started = (active[status] and not active[old_status]) and 1 or 0
if owner ~= host or old_status ~= status then
  redis.call('HSET', vm_key, 'host', host, 'domain_uuid', uuid, 'domain_status', status, 'domain_reason', reason)
  if listed_us > 0 then
    redis.call('HSET', vm_key, 'placed_us', ARGV[10])  -- the text: Lua would print the number as 1.79e+15
  end
  if started == 1 then
    -- boot grace counts from the first sight of a started domain
    redis.call('HSET', vm_key, 'booted_at_ms', now_ms)
  end
elseif uuid ~= '' then
  redis.call('HSET', vm_key, 'domain_reason', reason)
end
return {1, owner, migrated, started}
