-- Shared by the scripts that include it (`-- include: lib_vouch.lua`, vmq.store.client.load_lua): the probe path
-- in force of a VM record, and vouching for a VM a host relayed.

-- The path in force from a record's fields: `vmq path`'s, else the libvirt metadata's, else the detected one
-- (as vmq.model.VmRecord.probe_path); false when none is set (the redis path).
local function path_in_force(path_set, intent_path, detected)
  if path_set and path_set ~= '' then return path_set end
  if intent_path and intent_path ~= '' then return intent_path end
  if detected and detected ~= '' then return detected end
  return false
end

-- Why the record at vm_key does not place its VM on host on the agent path: 'unknown_vm', 'wrong_host',
-- 'wrong_path'; nil when it does.
local function vouch(vm_key, host)
  local row = redis.call('HMGET', vm_key, 'host', 'probe_path_set', 'intent.probe_path', 'probe_path_detected')
  local placed = row[1]
  if placed == host and path_in_force(row[2], row[3], row[4]) == 'agent' then return nil end
  if not placed and not row[2] and not row[3] and not row[4] and redis.call('EXISTS', vm_key) == 0 then
    return 'unknown_vm'
  end
  if placed ~= host then return 'wrong_host' end
  return 'wrong_path'
end
