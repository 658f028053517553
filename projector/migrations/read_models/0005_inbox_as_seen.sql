-- The inbox lists each conversation as its user sees it (projector/views.py `listed`): the latest message
-- they saw, how many of those are not deleted, and activity they saw, never what happened while they
-- were out (or before they joined). These columns are per user so that the common case (the latest
-- message was sent in the user's current span) reads the conversation row as before.
ALTER TABLE inbox ADD COLUMN joined_seq bigint,
                  ADD COLUMN message_count int NOT NULL DEFAULT 0,
                  ADD COLUMN last_message_seq bigint;
UPDATE inbox i SET joined_seq = s.joined_seq
FROM (SELECT conversation_id, user_id, max(joined_seq) AS joined_seq FROM memberships GROUP BY 1, 2) s
WHERE s.conversation_id = i.conversation_id AND s.user_id = i.user_id;
UPDATE inbox i SET joined_seq = 0 WHERE joined_seq IS NULL;
ALTER TABLE inbox ALTER COLUMN joined_seq SET NOT NULL;
UPDATE inbox i SET message_count = v.n, last_message_seq = v.last
FROM (SELECT s.conversation_id, s.user_id, count(*) FILTER (WHERE m.deleted_at IS NULL) AS n,
             max(m.seq) AS last
      FROM memberships s JOIN messages m ON m.conversation_id = s.conversation_id AND m.seq > s.joined_seq
           AND (s.left_seq IS NULL OR m.seq < s.left_seq)
      GROUP BY 1, 2) v
WHERE v.conversation_id = i.conversation_id AND v.user_id = i.user_id;
-- Activity of users who joined after the creation or came back: the creation, the messages they saw and
-- their additions (timed here by their stream id; a rebuild uses the events' own times).
UPDATE inbox i SET last_activity_at = greatest(c.created_at, a.joined_at, (
        SELECT max(m.sent_at) FROM memberships s JOIN messages m ON m.conversation_id = s.conversation_id
        AND m.seq > s.joined_seq AND (s.left_seq IS NULL OR m.seq < s.left_seq)
        WHERE s.conversation_id = i.conversation_id AND s.user_id = i.user_id))
FROM conversations c, (
    SELECT s.conversation_id, s.user_id,
           max(to_timestamp(split_part(s.joined_stream_id, '-', 1)::bigint / 1000.0))
               FILTER (WHERE s.joined_seq > f.first_seq) AS joined_at
    FROM memberships s
    JOIN (SELECT conversation_id, min(joined_seq) AS first_seq FROM memberships GROUP BY 1) f USING (conversation_id)
    GROUP BY 1, 2 HAVING count(*) > 1 OR min(s.joined_seq) > min(f.first_seq)) a
WHERE c.conversation_id = i.conversation_id AND a.conversation_id = i.conversation_id AND a.user_id = i.user_id;
