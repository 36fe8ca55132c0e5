-- Start one probe round atomically: number it, remember its nonce, schedule its deadline, publish it.
-- KEYS: round_seq, rounds, rounds_pending, probe_channel
-- ARGV: nonce, reply_timeout_ms, rounds_kept, wire_version
-- Returns {round, sent_ms}. Time is Redis' own clock, the same clock that stamps reply stream ids.
local t = redis.call('TIME')
local sent_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local round = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], round, ARGV[1] .. ':' .. sent_ms)
redis.call('ZADD', KEYS[3], sent_ms + tonumber(ARGV[2]), round)
local oldest = round - tonumber(ARGV[3])
if oldest > 0 then
  redis.call('HDEL', KEYS[2], oldest)
end
local msg = '{"v":' .. ARGV[4] .. ',"type":"probe","round":' .. round .. ',"nonce":"' .. ARGV[1]
  .. '","sent_ms":' .. sent_ms .. '}'
redis.call('PUBLISH', KEYS[4], msg)
return {round, sent_ms}
