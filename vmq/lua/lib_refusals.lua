-- Shared by the scripts that include it (`-- include: lib_refusals.lua`, vmq.store.client.load_lua): refusals
-- counted by reason, each with the first VM (or host) it was about, returned flat in the order first seen.
local refusal_counts, refusal_order = {}, {}

local function reject(reason, first)
  local seen = refusal_counts[reason]
  if seen == nil then
    refusal_counts[reason] = {1, first}
    refusal_order[#refusal_order + 1] = reason
  else
    seen[1] = seen[1] + 1
  end
end

-- {reason, count, first, ...}
local function refusals()
  local flat = {}
  for _, reason in ipairs(refusal_order) do
    flat[#flat + 1] = reason
    flat[#flat + 1] = refusal_counts[reason][1]
    flat[#flat + 1] = refusal_counts[reason][2]
  end
  return flat
end
