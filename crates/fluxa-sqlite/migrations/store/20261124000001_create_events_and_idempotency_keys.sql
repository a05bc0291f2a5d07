-- Fluxa embedded store, version 1: persisted events and their idempotency records.

-- Seed invariant 1: an event_id is persisted at most once.
CREATE TABLE events (
    event_id        TEXT PRIMARY KEY NOT NULL,
    event_type      TEXT NOT NULL,
    source          TEXT,
    occurred_at     TEXT,               -- RFC 3339, normalised to UTC, precision kept
    payload         BLOB NOT NULL,      -- the exact payload bytes as ingested
    payload_sha256  TEXT NOT NULL,
    payload_size    INTEGER NOT NULL,
    payload_mode    TEXT NOT NULL CHECK (payload_mode IN ('INLINE', 'S3')),
    correlation_id  TEXT NOT NULL,
    received_at     INTEGER NOT NULL,   -- Unix milliseconds
    processed_at    INTEGER NOT NULL
) STRICT;

-- Seed invariant 2: one record per event id says who may process it and what happened.
CREATE TABLE idempotency_keys (
    event_id            TEXT PRIMARY KEY NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('processing', 'processed', 'failed')),
    payload_sha256      TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    lease_token         TEXT,
    lease_expires_at    INTEGER,        -- Unix milliseconds; a processing record past it may be taken over
    last_error_code     TEXT,
    last_error_message  TEXT,
    correlation_id      TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;

CREATE INDEX idempotency_keys_status ON idempotency_keys (status, lease_expires_at);
