-- Decide and append a batch of commands for ONE partition, atomically per command.
-- The rules it applies are specified once, in Python: command_api/rules.py (`decide`); this script is
-- their atomic executor, checked against them (tests/test_commands_rules_script.py).
-- Every precondition is checked before any write, so a refused command changes nothing.
-- Runs on Redis 6.2 and 7.x (Lua 5.1, effects replication).
--
-- KEYS[1] = partition stream, KEYS[2] = partition meta (epoch)
-- KEYS[1 + 2i], KEYS[2 + 2i] = conversation state hash, idempotency record of command i (1-based)
-- ARGV[1] = expected epoch, ARGV[2] = idempotency ttl ms
-- Then per command: op, n, actor, idempotency key, fingerprint, expected seq, envelope JSON tail, memo,
-- and the n arguments of its operation, named in OPERATIONS (command_api/append.py sends them so).
--
-- Conversation hash fields: seq, creator, m:<user> (member), r:<user> (read marker), a:<user>
-- (archived for that user), u:<user> (the author's ordinal, kept once they first post), n (ordinals
-- given), k (messages in buckets), b (buckets, 1 when absent), v = 2 (created with buckets: no g: field).
-- Messages live in buckets, hashes named <conversation hash>#<bucket> in the same slot: field = the
-- message field (command_api/statekeys.py; its last 3 bytes are its hash), value = the author's
-- ordinal, negated once deleted. Buckets split one at a time (linear hashing) so each stays a small
-- listpack. Written before buckets: g:<message> = author, "~author" once deleted, in the conversation
-- hash (still read, never written for a new message).
-- Result per command: {1, seq, stream id} appended | {2, stored answer} idempotent replay
--                     | {0, reason, detail} refused.

local HEADER = 8
-- Each operation's own arguments, in order; `create` takes one per participant instead.
local OPERATIONS = {
  create = {},
  send = {'message_id', 'message_field', 'reply_to', 'reply_field'},
  edit = {'message_id', 'message_field'},
  delete = {'message_id', 'message_field'},
  add = {'user_id'},
  remove = {'user_id'},
  read = {'up_to_seq'},
  archive = {},
  unarchive = {},
}
local MESSAGES_PER_BUCKET = 48  -- mean load that triggers a split; well under the listpack limit (128)
local MAX_BUCKETS = 16777216    -- 2^24: the message hash has 24 bits
local CHUNK = 1000              -- fields per HSET/HDEL when moving (Lua's unpack has a stack limit)

local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  return {{0, 'log-missing', ''}}
end
if epoch ~= ARGV[1] then
  return {{0, 'epoch-changed', epoch}}
end

local function refuse(reason, detail)
  return {0, reason, detail or ''}
end

local function field_hash(field)
  local a, b, c = string.byte(field, -3, -1)
  return (a * 256 + b) * 256 + c
end

-- The largest power of two not above `buckets`.
local function level(buckets)
  local low = 1
  while low * 2 <= buckets do low = low * 2 end
  return low
end

-- The bucket key of `field` among the conversation's buckets (statekeys.bucket_of says the same).
local function bucket_key(c, field)
  local low = level(c.buckets)
  local h = field_hash(field)
  local bucket = h % (low * 2)
  if bucket >= c.buckets then bucket = h % low end
  return c.key .. '#' .. bucket
end

-- A message's author state: its bucket's value (an ordinal) and true, or a legacy g: value and false.
local function message_state(c, field, message_id)
  local author = redis.call('HGET', bucket_key(c, field), field)
  if author or not c.legacy then return author, true end
  return redis.call('HGET', c.key, 'g:' .. message_id), false
end

local function move(from, to, entries)
  for first = 1, #entries, 2 * CHUNK do
    local pairs_, fields = {}, {}
    for i = first, math.min(first + 2 * CHUNK - 1, #entries), 2 do
      pairs_[#pairs_ + 1] = entries[i]
      pairs_[#pairs_ + 1] = entries[i + 1]
      fields[#fields + 1] = entries[i]
    end
    redis.call('HSET', to, unpack(pairs_))
    redis.call('HDEL', from, unpack(fields))
  end
end

-- Split the next bucket in turn: its messages whose hash names the new bucket move there.
local function split(c)
  local low = level(c.buckets)
  local from = c.key .. '#' .. (c.buckets - low)
  local entries = redis.call('HGETALL', from)
  local moving = {}
  for i = 1, #entries, 2 do
    if field_hash(entries[i]) % (low * 2) == c.buckets then
      moving[#moving + 1] = entries[i]
      moving[#moving + 1] = entries[i + 1]
    end
  end
  move(from, c.key .. '#' .. c.buckets, moving)
  redis.call('HSET', c.key, 'b', c.buckets + 1)
end

-- The message count `k` is written with the sequence, after apply.
local function add_message(c, field, ordinal)
  redis.call('HSET', bucket_key(c, field), field, ordinal)
  c.messages = c.messages + 1
  if c.messages > MESSAGES_PER_BUCKET * c.buckets and c.buckets < MAX_BUCKETS then split(c) end
end

-- Refusals a participant may get, once the conversation is known to exist and have `actor` in it.
local function decide(c, op, actor, a)
  local ck = c.key
  if op == 'create' then
    return nil
  elseif op == 'send' then
    if message_state(c, a.message_field, a.message_id) then return refuse('message-id-taken') end
    if a.reply_field ~= '' and not message_state(c, a.reply_field, a.reply_to) then
      return refuse('reply-target-not-found')
    end
  elseif op == 'edit' or op == 'delete' then
    local author, ordinal = message_state(c, a.message_field, a.message_id)
    if not author then return refuse('message-not-found') end
    local first = string.sub(author, 1, 1)
    if first == '-' or first == '~' then return refuse('message-deleted') end
    if ordinal then
      -- An actor who never posted has no ordinal (nil), so matches no message's.
      if author ~= c.ordinal then return refuse('not-the-author') end
    elseif author ~= actor then
      return refuse('not-the-author')
    end
  elseif op == 'add' then
    if redis.call('HEXISTS', ck, 'm:' .. a.user_id) == 1 then return refuse('already-a-participant') end
  elseif op == 'remove' then
    local user = a.user_id
    if redis.call('HEXISTS', ck, 'm:' .. user) == 0 then return refuse('participant-not-found') end
    local creator = redis.call('HGET', ck, 'creator')
    if user == creator then return refuse('creator-cannot-leave') end
    if user ~= actor and actor ~= creator then return refuse('removal-forbidden') end
  elseif op == 'read' then
    local up_to = tonumber(a.up_to_seq)
    if up_to > tonumber(c.seq) then return refuse('read-beyond-end', c.seq) end
    local marker = redis.call('HGET', ck, 'r:' .. actor)
    if marker and up_to <= tonumber(marker) then return refuse('read-marker-not-advanced', marker) end
  elseif op == 'archive' then
    if redis.call('HEXISTS', ck, 'a:' .. actor) == 1 then return refuse('already-archived') end
  elseif op == 'unarchive' then
    if redis.call('HEXISTS', ck, 'a:' .. actor) == 0 then return refuse('not-archived') end
  end
  return nil
end

local function apply(c, op, actor, a)
  local ck = c.key
  if op == 'create' then
    -- At most 1,001 members (bodies.MAX_PARTICIPANTS): one HSET, well within unpack's limit (8,000).
    local fields = {'creator', actor, 'v', '2', 'm:' .. actor, '1'}
    for _, user in ipairs(a.participants) do
      fields[#fields + 1] = 'm:' .. user
      fields[#fields + 1] = '1'
    end
    redis.call('HSET', ck, unpack(fields))
  elseif op == 'send' then
    local ordinal = c.ordinal
    if not ordinal then
      ordinal = redis.call('HINCRBY', ck, 'n', 1)
      redis.call('HSET', ck, 'u:' .. actor, ordinal)
    end
    add_message(c, a.message_field, ordinal)
  elseif op == 'delete' then
    local author, ordinal = message_state(c, a.message_field, a.message_id)
    if ordinal then
      redis.call('HSET', bucket_key(c, a.message_field), a.message_field, '-' .. author)
    else
      redis.call('HSET', ck, 'g:' .. a.message_id, '~' .. actor)
    end
  elseif op == 'add' then
    redis.call('HSET', ck, 'm:' .. a.user_id, '1')
  elseif op == 'remove' then
    redis.call('HDEL', ck, 'm:' .. a.user_id, 'a:' .. a.user_id)
  elseif op == 'read' then
    redis.call('HSET', ck, 'r:' .. actor, a.up_to_seq)
  elseif op == 'archive' then
    redis.call('HSET', ck, 'a:' .. actor, '1')
  elseif op == 'unarchive' then
    redis.call('HDEL', ck, 'a:' .. actor)
  end
end

-- The named arguments of the operation whose n arguments start at ARGV[at].
local function arguments(op, at, n)
  local a = {}
  if op == 'create' then
    a.participants = {}
    for j = 0, n - 1 do a.participants[j + 1] = ARGV[at + j] end
  else
    for j, name in ipairs(OPERATIONS[op]) do a[name] = ARGV[at + j - 1] end
  end
  return a
end

local function run(i, at, ttl_ms)
  local ck, ik = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local op, n, actor = ARGV[at], tonumber(ARGV[at + 1]), ARGV[at + 2]
  local idem, fingerprint, expected = ARGV[at + 3], ARGV[at + 4], ARGV[at + 5]
  local tail, memo = ARGV[at + 6], ARGV[at + 7]
  if not OPERATIONS[op] then return refuse('unknown-operation', op) end
  local a = arguments(op, at + HEADER, n)

  if idem ~= '' then
    local record = redis.call('GET', ik)
    if record then
      local cut = string.find(record, '\n', 1, true)
      if string.sub(record, 1, cut - 1) ~= fingerprint then
        return refuse('idempotency-key-reused')
      end
      return {2, string.sub(record, cut + 1)}
    end
  end

  local state = redis.call('HMGET', ck, 'seq', 'm:' .. actor, 'b', 'v', 'u:' .. actor, 'k')
  local seq = state[1]
  local c = {
    key = ck, seq = seq, buckets = tonumber(state[3] or '1'), legacy = not state[4], ordinal = state[5],
    messages = tonumber(state[6] or '0'),
  }
  local messages = c.messages
  if op == 'create' then
    -- Only the creator's own ids can collide: chosen ids live in the creator's namespace.
    if seq then return refuse('conversation-exists') end
  elseif not seq or not state[2] then
    -- One answer, before any other check, so a stranger cannot tell this from a missing conversation.
    return refuse('conversation-not-found')
  end
  if expected ~= '' and tonumber(expected) ~= tonumber(seq or '0') then
    return refuse('sequence-mismatch', seq or '0')
  end
  local refusal = decide(c, op, actor, a)
  if refusal then return refusal end

  apply(c, op, actor, a)
  local next_seq = tonumber(seq or '0') + 1
  if c.messages ~= messages then
    redis.call('HSET', ck, 'seq', next_seq, 'k', c.messages)
  else
    redis.call('HSET', ck, 'seq', next_seq)
  end
  local event = '{"seq":' .. next_seq .. ',' .. tail
  -- Never trimmed here: only what the archive holds may leave the stream (see README, Trimming).
  local id = redis.call('XADD', KEYS[1], '*', 'e', event)
  if idem ~= '' then
    redis.call('SET', ik, fingerprint .. '\n' .. next_seq .. '\n' .. id .. '\n' .. memo, 'PX', ttl_ms)
  end
  return {1, next_seq, id}
end

local results = {}
local at, i = 3, 1
while at <= #ARGV do
  results[i] = run(i, at, ARGV[2])
  at = at + HEADER + tonumber(ARGV[at + 1])
  i = i + 1
end
return results
