-- Advance an answer stream's cursor for one ingested batch, fenced by the judge lock.
-- KEYS: judge_lock, the stream's cursor, stats
-- ARGV: lock token ('' when the caller holds no lock: no fence), cursor, entries read, the stats field
--       counting entries read (replies_read, relayed_read)
-- Returns 1, or 0 (nothing written) when the lock is not held with this token: the caller's lease ran out
-- and another judge may be reading the same entries. Only the holder moves the cursor and counts entries
-- read, so the count that tells replies trimmed unread (vmq/store/replies.py) is never inflated by two
-- readers of the same entries, and the cursor never goes back.
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[4] or 'replies_read', ARGV[3])
return 1
