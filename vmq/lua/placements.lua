-- What vouching for relayed answers needs of many VMs, in one reply (vmq.store.vms.RedisVms.placements).
-- KEYS: vm_hash, ...
-- Returns per key, flattened: state, host, the probe path in force (`vmq path`, else the libvirt metadata's,
-- else the detected one; nil when none is set: redis).
-- include: lib_vouch.lua
local out = {}
for i = 1, #KEYS do
  local row = redis.call('HMGET', KEYS[i], 'state', 'host', 'probe_path_set', 'intent.probe_path',
                         'probe_path_detected')
  out[#out + 1] = row[1]
  out[#out + 1] = row[2]
  out[#out + 1] = path_in_force(row[3], row[4], row[5])
end
return out
