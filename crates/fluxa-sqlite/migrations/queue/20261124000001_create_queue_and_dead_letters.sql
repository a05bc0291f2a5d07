-- Fluxa embedded queue, version 1: SQS semantics on SQLite.

CREATE TABLE queue_messages (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id          TEXT NOT NULL UNIQUE,
    body                BLOB NOT NULL,
    event_id            TEXT,
    correlation_id      TEXT,
    enqueued_at         INTEGER NOT NULL,   -- Unix milliseconds
    visible_at          INTEGER NOT NULL,   -- hidden until then (visibility timeout or retry delay)
    receive_count       INTEGER NOT NULL DEFAULT 0,
    receipt             TEXT,               -- current receive's receipt; stale receipts settle nothing
    first_failure_at    INTEGER,
    last_failure_at     INTEGER,
    last_error_code     TEXT,
    last_error_message  TEXT
) STRICT;

CREATE INDEX queue_messages_visible ON queue_messages (visible_at, seq);

CREATE TABLE dead_letters (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id          TEXT NOT NULL UNIQUE,
    body                BLOB NOT NULL,
    event_id            TEXT,
    correlation_id      TEXT,
    error_class         TEXT NOT NULL CHECK (error_class IN ('permanent', 'retries_exhausted')),
    error_code          TEXT NOT NULL,
    error_message       TEXT NOT NULL,
    receive_count       INTEGER NOT NULL,
    enqueued_at         INTEGER NOT NULL,
    first_failure_at    INTEGER NOT NULL,
    last_failure_at     INTEGER NOT NULL,
    dead_lettered_at    INTEGER NOT NULL
) STRICT;

CREATE INDEX dead_letters_event_id ON dead_letters (event_id);
