-- Read models; run with search_path set to the target schema (the live one is `parley`).
CREATE TABLE checkpoints (
    partition      int         PRIMARY KEY,
    epoch          text,
    stream_id      text        NOT NULL DEFAULT '0-0',
    events_applied bigint      NOT NULL DEFAULT 0,
    version        bigint      NOT NULL DEFAULT 0, -- bumped by every write, so a stale cache is detected
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    conversation_id      text        PRIMARY KEY,
    title                text        NOT NULL,
    created_by           text        NOT NULL,
    created_at           timestamptz NOT NULL,
    last_seq             bigint      NOT NULL,
    last_activity_at     timestamptz NOT NULL,
    message_count        int         NOT NULL,
    last_message_id      text,
    last_message_seq     bigint,
    last_message_author  text,
    last_message_preview text
);

CREATE TABLE memberships (
    conversation_id  text   NOT NULL,
    user_id          text   NOT NULL,
    joined_seq       bigint NOT NULL,
    joined_stream_id text   NOT NULL,
    left_seq         bigint,
    left_stream_id   text,
    PRIMARY KEY (conversation_id, user_id, joined_seq)
);
CREATE INDEX memberships_user ON memberships (user_id, conversation_id);

CREATE TABLE messages (
    conversation_id text        NOT NULL,
    seq             bigint      NOT NULL,
    message_id      text        NOT NULL,
    author          text        NOT NULL,
    body            text,
    reply_to        text,
    state           text        NOT NULL CHECK (state IN ('sent', 'edited', 'deleted')),
    sent_at         timestamptz NOT NULL,
    edited_at       timestamptz,
    deleted_at      timestamptz,
    search          tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(body, ''))) STORED,
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, message_id),
    CHECK ((state = 'deleted') = (body IS NULL))
);
CREATE INDEX messages_search ON messages USING gin (search);

-- One row per (user, conversation) the user ever joined: read marker, unread count, archived, inbox order.
CREATE TABLE inbox (
    user_id          text        NOT NULL,
    conversation_id  text        NOT NULL,
    read_seq         bigint      NOT NULL,
    unread_count     int         NOT NULL,
    archived         boolean     NOT NULL,
    is_member        boolean     NOT NULL,
    last_activity_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);
CREATE INDEX inbox_order ON inbox (user_id, last_activity_at DESC, conversation_id DESC) WHERE is_member;
CREATE INDEX inbox_conversation ON inbox (conversation_id);

CREATE VIEW event_archive AS SELECT * FROM parley_store.event_archive;
