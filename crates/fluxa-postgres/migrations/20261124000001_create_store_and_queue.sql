-- Fluxa on PostgreSQL, version 1: the store (events, idempotency_keys) and the queue
-- (queue_messages, dead_letters) in one database shared by every replica.

-- Seed invariant 1: an event_id is persisted at most once.
CREATE TABLE events (
    event_id        text PRIMARY KEY,
    event_type      text NOT NULL,
    source          text,
    occurred_at     timestamptz,
    -- bytea, not jsonb: jsonb re-formats, and the payload must come back byte for byte.
    payload         bytea NOT NULL,
    payload_sha256  text NOT NULL,
    payload_size    bigint NOT NULL,
    payload_mode    text NOT NULL CHECK (payload_mode IN ('INLINE', 'S3')),
    correlation_id  text NOT NULL,
    received_at     timestamptz NOT NULL,
    processed_at    timestamptz NOT NULL
);

-- Seed invariant 2: one record per event id says who may process it and what happened.
CREATE TABLE idempotency_keys (
    event_id            text PRIMARY KEY,
    status              text NOT NULL CHECK (status IN ('processing', 'processed', 'failed')),
    payload_sha256      text,
    attempts            integer NOT NULL DEFAULT 0,
    lease_token         text,
    lease_expires_at    timestamptz,
    last_error_code     text,
    last_error_message  text,
    correlation_id      text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_processing ON idempotency_keys (lease_expires_at)
    WHERE status = 'processing';

CREATE TABLE queue_messages (
    seq                 bigserial PRIMARY KEY,
    message_id          text NOT NULL UNIQUE,
    body                bytea NOT NULL,
    event_id            text,
    correlation_id      text,
    enqueued_at         timestamptz NOT NULL,
    visible_at          timestamptz NOT NULL,
    receive_count       integer NOT NULL DEFAULT 0,
    receipt             text,
    first_failure_at    timestamptz,
    last_failure_at     timestamptz,
    last_error_code     text,
    last_error_message  text
);

CREATE INDEX queue_messages_visible ON queue_messages (visible_at, seq);

CREATE TABLE dead_letters (
    seq                 bigserial PRIMARY KEY,
    message_id          text NOT NULL UNIQUE,
    body                bytea NOT NULL,
    event_id            text,
    correlation_id      text,
    error_class         text NOT NULL CHECK (error_class IN ('permanent', 'retries_exhausted')),
    error_code          text NOT NULL,
    error_message       text NOT NULL,
    receive_count       integer NOT NULL,
    enqueued_at         timestamptz NOT NULL,
    first_failure_at    timestamptz NOT NULL,
    last_failure_at     timestamptz NOT NULL,
    dead_lettered_at    timestamptz NOT NULL
);

CREATE INDEX dead_letters_event_id ON dead_letters (event_id);
