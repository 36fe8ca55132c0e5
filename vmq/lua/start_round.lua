-- Start one probe round atomically: number it, remember its nonce, schedule its deadline, publish it.
-- KEYS: round_seq, rounds, rounds_pending, probe_channel, stats
-- ARGV: nonce, reply_timeout_ms, rounds_kept, wire_version, min_gap_ms
-- Returns {round, sent_ms, 1}. Time is Redis' own clock, the same clock that stamps reply stream ids.
-- A second beat is made harmless here: when min_gap_ms > 0 and the latest round went out less than that
-- long ago (by this clock), nothing is written or published and {latest_round, its sent_ms, 0} is returned.
local t = redis.call('TIME')
local sent_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local min_gap = tonumber(ARGV[5] or '0')
if min_gap > 0 then
  local last = redis.call('GET', KEYS[1])
  local prev = last and redis.call('HGET', KEYS[2], last)
  local prev_ms = prev and tonumber(string.match(prev, ':(%d+)$'))
  -- A clock that went backwards (a failover to a node behind) never blocks rounds.
  if prev_ms and sent_ms >= prev_ms and sent_ms - prev_ms < min_gap then
    redis.call('HINCRBY', KEYS[5], 'rounds_duplicate', 1)
    return {tonumber(last), prev_ms, 0}
  end
end
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
return {round, sent_ms, 1}
