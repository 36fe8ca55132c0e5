-- What vouching for relayed answers needs of many VMs, in one reply (vmq.store.vms.RedisVms.placements).
-- KEYS: vm_hash, ...
-- Returns per key, flattened: state, host, probe_path_set, probe_path_detected (nil when unset).
local out = {}
for i = 1, #KEYS do
  local row = redis.call('HMGET', KEYS[i], 'state', 'host', 'probe_path_set', 'probe_path_detected')
  for j = 1, 4 do
    out[#out + 1] = row[j]
  end
end
return out
