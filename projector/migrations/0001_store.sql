-- The durable store, never rebuilt: the event archive (history of record), dead letters, leases.
CREATE TABLE parley_store.event_archive (
    epoch           text        NOT NULL,
    partition       int         NOT NULL,
    stream_id       text        NOT NULL,
    stream_ms       bigint      NOT NULL,
    stream_seq      bigint      NOT NULL,
    event_id        text        NOT NULL,
    conversation_id text        NOT NULL,
    seq             bigint      NOT NULL,
    type            text        NOT NULL,
    actor           text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    data            bytea       NOT NULL,
    PRIMARY KEY (epoch, partition, stream_ms, stream_seq)
);
CREATE INDEX event_archive_conversation ON parley_store.event_archive (conversation_id, seq);

-- Immutable: rows are only ever inserted.
CREATE FUNCTION parley_store.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'parley_store.event_archive is append-only (% refused)', TG_OP;
END $$;
CREATE TRIGGER event_archive_immutable BEFORE UPDATE OR DELETE ON parley_store.event_archive
    FOR EACH ROW EXECUTE FUNCTION parley_store.refuse_change();
CREATE TRIGGER event_archive_no_truncate BEFORE TRUNCATE ON parley_store.event_archive
    FOR EACH STATEMENT EXECUTE FUNCTION parley_store.refuse_change();

CREATE TABLE parley_store.dead_letters (
    id          bigserial   PRIMARY KEY,
    epoch       text        NOT NULL,
    partition   int         NOT NULL,
    stream_id   text        NOT NULL,
    data        bytea       NOT NULL,
    error       text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    redriven_at timestamptz,
    attempts    int         NOT NULL DEFAULT 1,
    UNIQUE (epoch, partition, stream_id)
);

CREATE TABLE parley_store.leases (
    partition  int         PRIMARY KEY,
    owner      text        NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Workers announce themselves so a newcomer gets its share of partitions.
CREATE TABLE parley_store.workers (
    owner   text        PRIMARY KEY,
    seen_at timestamptz NOT NULL
);
