-- The fold refuses a second message with the same id in a conversation (FoldError), so this constraint
-- only repeated that check, at about a quarter of a message row's Postgres CPU (BENCHMARKS.md); no query
-- looks messages up by id.
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_conversation_id_message_id_key;
