-- Decide and append a batch of commands for ONE partition, atomically per command.
-- Every precondition is checked before any write, so a refused command changes nothing.
-- Runs on Redis 6.2 and 7.x (Lua 5.1, effects replication).
--
-- KEYS[1] = partition stream, KEYS[2] = partition meta (epoch)
-- KEYS[1 + 2i], KEYS[2 + 2i] = conversation state hash, idempotency record of command i (1-based)
-- ARGV[1] = expected epoch
-- ARGV[2 + 11(i-1) ..] = op, conversation id, actor, idempotency key, fingerprint, target, aux,
--                        expected seq, envelope JSON tail, idempotency ttl ms, memo
--
-- Conversation hash fields: seq, creator, m:<user> (member), g:<message> (author, "~author" once
-- deleted), r:<user> (read marker), a:<user> (archived for that user).
-- Result per command: {1, seq, stream id} appended | {2, stored answer} idempotent replay
--                     | {0, reason, detail} refused.

local ARGS_PER_COMMAND = 11

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

-- Refusals a participant may get, once the conversation is known to exist and have `actor` in it.
local function decide(ck, op, actor, target, aux, seq)
  if op == 'create' then
    return nil
  elseif op == 'send' then
    if redis.call('HEXISTS', ck, 'g:' .. target) == 1 then return refuse('message-id-taken') end
    if aux ~= '' and redis.call('HEXISTS', ck, 'g:' .. aux) == 0 then
      return refuse('reply-target-not-found')
    end
  elseif op == 'edit' or op == 'delete' then
    local author = redis.call('HGET', ck, 'g:' .. target)
    if not author then return refuse('message-not-found') end
    if string.sub(author, 1, 1) == '~' then return refuse('message-deleted') end
    if author ~= actor then return refuse('not-the-author') end
  elseif op == 'add' then
    if redis.call('HEXISTS', ck, 'm:' .. target) == 1 then return refuse('already-a-participant') end
  elseif op == 'remove' then
    if redis.call('HEXISTS', ck, 'm:' .. target) == 0 then return refuse('participant-not-found') end
    local creator = redis.call('HGET', ck, 'creator')
    if target == creator then return refuse('creator-cannot-leave') end
    if target ~= actor and actor ~= creator then return refuse('removal-forbidden') end
  elseif op == 'read' then
    local up_to = tonumber(target)
    if up_to > tonumber(seq) then return refuse('read-beyond-end', seq) end
    local marker = redis.call('HGET', ck, 'r:' .. actor)
    if marker and up_to <= tonumber(marker) then return refuse('read-marker-not-advanced', marker) end
  elseif op == 'archive' then
    if redis.call('HEXISTS', ck, 'a:' .. actor) == 1 then return refuse('already-archived') end
  elseif op == 'unarchive' then
    if redis.call('HEXISTS', ck, 'a:' .. actor) == 0 then return refuse('not-archived') end
  else
    return refuse('unknown-operation', op)
  end
  return nil
end

local function apply(ck, op, actor, target, aux, seq)
  if op == 'create' then
    redis.call('HSET', ck, 'creator', actor, 'm:' .. actor, '1')
    for user in string.gmatch(target, '[^,]+') do
      redis.call('HSET', ck, 'm:' .. user, '1')
    end
  elseif op == 'send' then
    redis.call('HSET', ck, 'g:' .. target, actor)
  elseif op == 'delete' then
    redis.call('HSET', ck, 'g:' .. target, '~' .. actor)
  elseif op == 'add' then
    redis.call('HSET', ck, 'm:' .. target, '1')
  elseif op == 'remove' then
    redis.call('HDEL', ck, 'm:' .. target, 'a:' .. target)
  elseif op == 'read' then
    redis.call('HSET', ck, 'r:' .. actor, target)
  elseif op == 'archive' then
    redis.call('HSET', ck, 'a:' .. actor, '1')
  elseif op == 'unarchive' then
    redis.call('HDEL', ck, 'a:' .. actor)
  end
end

local function run(i)
  local base = 1 + ARGS_PER_COMMAND * (i - 1)
  local ck, ik = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local op, actor = ARGV[base + 1], ARGV[base + 3]
  local idem, fingerprint = ARGV[base + 4], ARGV[base + 5]
  local target, aux, expected = ARGV[base + 6], ARGV[base + 7], ARGV[base + 8]
  local tail, ttl_ms, memo = ARGV[base + 9], ARGV[base + 10], ARGV[base + 11]

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

  local seq = redis.call('HGET', ck, 'seq')
  if op == 'create' then
    -- Only the creator's own ids can collide: chosen ids live in the creator's namespace.
    if seq then return refuse('conversation-exists') end
  elseif not seq or redis.call('HEXISTS', ck, 'm:' .. actor) == 0 then
    -- One answer, before any other check, so a stranger cannot tell this from a missing conversation.
    return refuse('conversation-not-found')
  end
  if expected ~= '' and tonumber(expected) ~= tonumber(seq or '0') then
    return refuse('sequence-mismatch', seq or '0')
  end
  local refusal = decide(ck, op, actor, target, aux, seq)
  if refusal then return refusal end

  apply(ck, op, actor, target, aux, seq)
  local next_seq = tonumber(seq or '0') + 1
  redis.call('HSET', ck, 'seq', next_seq)
  local event = '{"seq":' .. next_seq .. ',' .. tail
  -- Never trimmed here: only what the archive holds may leave the stream (see README, Trimming).
  local id = redis.call('XADD', KEYS[1], '*', 'e', event)
  if idem ~= '' then
    redis.call('SET', ik, fingerprint .. '\n' .. next_seq .. '\n' .. id .. '\n' .. memo, 'PX', ttl_ms)
  end
  return {1, next_seq, id}
end

local results = {}
local count = (#ARGV - 1) / ARGS_PER_COMMAND
for i = 1, count do
  results[i] = run(i)
end
return results
