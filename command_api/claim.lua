-- Claim a user's Idempotency-Key for one request, across every partition (one key, any slot).
-- The key stays bound to the fingerprint of the first request that reached the log with it.
-- Runs on Redis 6.2 and 7.x (6.2 refuses SET NX GET, hence a script).
--
-- KEYS[1] = the user's claim on the key; ARGV[1] = fingerprint, ARGV[2] = ttl ms
-- Result: 1 the key is this request's (a first use, or a retry of the same request) | 0 another's.

local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if held == ARGV[1] then return 1 end
return 0
