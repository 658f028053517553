-- What the fanout reads of the archive (realtime_fanout/archive.py), so that the store's tables can change
-- without breaking it silently: every archived entry, and whether the fold refused it (a dead letter not
-- re-driven; events/admission.py is the rule both apply), so history never serves what live never sent.
CREATE VIEW parley_store.archived_events AS
SELECT a.epoch, a.partition, a.stream_id, a.stream_ms, a.stream_seq, a.conversation_id, a.seq, a.type,
       a.actor, a.data,
       EXISTS (SELECT 1 FROM parley_store.dead_letters d
               WHERE d.epoch = a.epoch AND d.partition = a.partition AND d.stream_id = a.stream_id
                 AND d.redriven_at IS NULL) AS refused
FROM parley_store.event_archive a;
