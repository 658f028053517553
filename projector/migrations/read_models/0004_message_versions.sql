-- The bodies edits replaced, so that a participant who left before an edit keeps seeing (and finding)
-- the body as they saw it, never text written after they left (projector/views.py is the rule). Only
-- edits write here; a deletion clears the bodies of its message's versions. Edits made before this
-- migration have no versions until a rebuild (`python -m projector rebuild`) folds them again.
CREATE TABLE message_versions (
    conversation_id text   NOT NULL,
    seq             bigint NOT NULL,
    until_seq       bigint NOT NULL, -- the edit that replaced this body
    body            text,            -- NULL once the message is deleted
    edited_at       timestamptz,     -- when this body was set; NULL: the original
    PRIMARY KEY (conversation_id, seq, until_seq)
);
-- No full-text index here: only a reader who left a conversation (or was out during an edit) ever sees
-- an old version, so search reads the versions of just those conversations, by primary key, and
-- tokenizes them then; an indexed tsvector cost every edit about 10% more Postgres time (BENCHMARKS.md).
