-- Presence across fanout processes, atomically: a user is online while they hold an unexpired connection.
-- KEYS[1] = expiry zset (member "<conn> <user>", score = expires_at ms), KEYS[2] = online hash (user -> 1),
-- KEYS[3] = last-seen hash (user -> ms). Per user, ARGV[2]..':c:'..user is a zset (conn -> expires_at ms);
-- every key shares the hash tag in ARGV[2], and so does the channel (SPUBLISH names it like a key).
-- ARGV: [1] op, [2] key prefix, [3] pub/sub channel, [4] ttl ms, [5] PUBLISH or SPUBLISH, then per op:
--   touch: conn, user, conn, user, ...  add or refresh connections for ttl; returns how many went online
--   leave: grace, conn, user, ...       forget connections; returns how many users went offline. With grace
--                                       (ms) > 0 each is kept until then instead (noting when it left, for
--                                       last-seen): a user back within it has no transition at all
--   sweep: limit                        forget at most `limit` expired connections; returns {seen, offline}
-- Transitions flip the online hash, so each is published exactly once, in order, as JSON
-- {"type":"presence","user_id":U,"online":B,"last_seen":ms|null}. Time is the server's (TIME).
local expiry, online, seen = KEYS[1], KEYS[2], KEYS[3]
local op, prefix, channel, ttl, publisher = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function publish(user, is_online, last_seen)
  local msg = {type = 'presence', user_id = user, online = is_online, last_seen = last_seen or cjson.null}
  redis.call(publisher, channel, cjson.encode(msg))
end

local function drop(user, conn)
  redis.call('ZREM', prefix .. ':c:' .. user, conn)
  redis.call('ZREM', expiry, conn .. ' ' .. user)
  redis.call('HDEL', prefix .. ':left', conn)
end

-- After a removal: purge the user's expired connections; offline when none is left and they were online.
local function settle(user, last_seen)
  local key = prefix .. ':c:' .. user
  for _, conn in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now)) do
    drop(user, conn)
  end
  if redis.call('ZCARD', key) == 0 and redis.call('HDEL', online, user) == 1 then
    redis.call('HSET', seen, user, last_seen)
    publish(user, false, last_seen)
    return 1
  end
  return 0
end

if op == 'touch' then
  local went = 0
  local expires = now + ttl
  for i = 6, #ARGV, 2 do
    local conn, user = ARGV[i], ARGV[i + 1]
    redis.call('ZADD', prefix .. ':c:' .. user, expires, conn)
    redis.call('ZADD', expiry, expires, conn .. ' ' .. user)
    if redis.call('HSET', online, user, 1) == 1 then
      publish(user, true, nil)
      went = went + 1
    end
  end
  return went
elseif op == 'leave' then
  local grace = tonumber(ARGV[6])
  local went = 0
  for i = 7, #ARGV, 2 do
    local conn, user = ARGV[i], ARGV[i + 1]
    if grace <= 0 then
      drop(user, conn)
      went = went + settle(user, now)
    elseif redis.call('ZSCORE', prefix .. ':c:' .. user, conn) then
      redis.call('ZADD', prefix .. ':c:' .. user, now + grace, conn)
      redis.call('ZADD', expiry, now + grace, conn .. ' ' .. user)
      redis.call('HSET', prefix .. ':left', conn, now)
    end
  end
  return went
elseif op == 'sweep' then
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[6]))
  local offline = 0
  for i = 1, #due, 2 do
    local member, expires = due[i], tonumber(due[i + 1])
    local sp = string.find(member, ' ', 1, true)
    local conn, user = string.sub(member, 1, sp - 1), string.sub(member, sp + 1)
    local left = tonumber(redis.call('HGET', prefix .. ':left', conn))
    drop(user, conn)
    offline = offline + settle(user, left or math.min(now, expires - ttl))
  end
  return {#due / 2, offline}
end
return redis.error_reply('unknown op ' .. tostring(op))
