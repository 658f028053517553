-- Every event writes one archive row, so each index on it is paid at the log's full rate. The index on
-- (conversation_id, seq) was about 40% of the archive's Postgres CPU per row (BENCHMARKS.md) and no reader
-- uses it: readers go by partition and stream position (the primary key), and a conversation's history
-- lives in one partition, so a replay of one conversation scans that partition's range.
DROP INDEX IF EXISTS parley_store.event_archive_conversation;
