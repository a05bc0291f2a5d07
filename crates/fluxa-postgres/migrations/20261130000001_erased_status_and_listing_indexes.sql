-- Fluxa on PostgreSQL, version 3 (the store's part of issue 9, operator features).
--
-- 1. An idempotency record may be 'erased': the tombstone an operator's erasure leaves, so a
--    late redelivery can never store the event again (contract section 8). The new CHECK
--    admits every row the old one did.
-- 2. Indexes that serve every filter combination of the event listing (contract section 2) in
--    its (received_at, event_id) order, so a page never sorts and never scans the table, and
--    the retention pruner's oldest-first batches.
--
-- Plain CREATE INDEX (sqlx runs each migration in a transaction, which CONCURRENTLY cannot
-- use): on a large events table this holds writes to it until the indexes are built.

ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_status_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_status_check
    CHECK (status IN ('processing', 'processed', 'failed', 'erased'));

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
