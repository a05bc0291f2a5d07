-- Fluxa embedded store, version 2: operator features (issue 9).
--
-- 1. An idempotency record may be 'erased': the tombstone an operator's erasure leaves, so a
--    late redelivery can never store the event again (contract section 8). SQLite cannot alter
--    a CHECK constraint, so the table is rebuilt with its rows and its index, inside this
--    migration's transaction (sqlx runs each migration in one).
-- 2. Indexes that serve every filter combination of the event listing (contract section 2) in
--    its (received_at, event_id) order, so a page never sorts and never scans the table, and
--    the retention pruner's oldest-first batches.

CREATE TABLE idempotency_keys_v2 (
    event_id            TEXT PRIMARY KEY NOT NULL,
    status              TEXT NOT NULL
                        CHECK (status IN ('processing', 'processed', 'failed', 'erased')),
    payload_sha256      TEXT,           -- NULL once erased: no trace of the payload is kept
    attempts            INTEGER NOT NULL DEFAULT 0,
    lease_token         TEXT,
    lease_expires_at    INTEGER,        -- Unix milliseconds; a processing record past it may be taken over
    last_error_code     TEXT,
    last_error_message  TEXT,
    correlation_id      TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;

INSERT INTO idempotency_keys_v2
    (event_id, status, payload_sha256, attempts, lease_token, lease_expires_at,
     last_error_code, last_error_message, correlation_id, created_at, updated_at)
SELECT event_id, status, payload_sha256, attempts, lease_token, lease_expires_at,
       last_error_code, last_error_message, correlation_id, created_at, updated_at
FROM idempotency_keys;

DROP TABLE idempotency_keys;
ALTER TABLE idempotency_keys_v2 RENAME TO idempotency_keys;

CREATE INDEX idempotency_keys_status ON idempotency_keys (status, lease_expires_at);

-- The idempotency pruner deletes the oldest records first, in two ranges (see the store's
-- `prune_idempotency`): every record older than the oldest stored event, and the records that
-- never have an event row (all but 'processed') up to the cut-off. Neither walks over the
-- processed records whose events are still stored, however many there are.
CREATE INDEX idempotency_keys_updated ON idempotency_keys (updated_at);
CREATE INDEX idempotency_keys_unprocessed_updated ON idempotency_keys (updated_at)
    WHERE status <> 'processed';

-- The listing: one index per filter combination, each ending in the page order, so that the
-- equality filters pin a prefix and `since`, `until` and the cursor bound one range of it.
-- The first also serves the events pruner (oldest received first).
CREATE INDEX events_received ON events (received_at, event_id);
CREATE INDEX events_type_received ON events (event_type, received_at, event_id);
CREATE INDEX events_source_received ON events (source, received_at, event_id);
CREATE INDEX events_type_source_received ON events (event_type, source, received_at, event_id);
