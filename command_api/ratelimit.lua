-- Token buckets for a batch of users. KEYS[i] = bucket hash of user i.
-- ARGV[1] = refill per second, ARGV[2] = burst (capacity). Each call takes one token.
-- Returns per user: 0 when allowed, else milliseconds until a token is available.
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl_ms = math.ceil(burst / rate * 1000) + 1000
local out = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(state[1]), tonumber(state[2])
  if not tokens then
    tokens, ts = burst, now_ms
  end
  tokens = math.min(burst, tokens + (now_ms - ts) * rate / 1000)
  if tokens >= 1 then
    tokens = tokens - 1
    out[i] = 0
  else
    out[i] = math.ceil((1 - tokens) / rate * 1000)
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', now_ms)
  redis.call('PEXPIRE', key, ttl_ms)
end
return out
