-- What the fanout's unread seed reads (realtime_fanout/unreadseed.py), owned here so that the read models
-- can change without breaking it silently. `unread_messages` is the inbox's unread count message by
-- message: by someone else, not deleted, after the user's read marker, sent during one of their spans
-- (events/membership.py `covers`: joined_seq <= seq <= left_seq; tests/test_visibility_agreement.py checks it).
CREATE VIEW read_markers AS
SELECT user_id, conversation_id, read_seq FROM inbox;

CREATE VIEW unread_messages AS
SELECT i.user_id, m.conversation_id, m.message_id, m.seq
FROM inbox i JOIN messages m ON m.conversation_id = i.conversation_id AND m.seq > i.read_seq
WHERE m.author <> i.user_id AND m.deleted_at IS NULL
  AND EXISTS (SELECT 1 FROM memberships s
              WHERE s.conversation_id = m.conversation_id AND s.user_id = i.user_id
                AND s.joined_seq <= m.seq AND (s.left_seq IS NULL OR m.seq <= s.left_seq));
