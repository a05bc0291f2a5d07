-- Fluxa on PostgreSQL, queue part of the operator features (contract sections 4, 7, 8).
--
-- 1. The event's type travels with each message and each dead letter, so the DLQ can be
--    filtered by it without parsing bodies. Rows written before this migration keep NULL: their
--    type is only in their body, and a filter on event_type does not match them.
ALTER TABLE queue_messages ADD COLUMN event_type text;
ALTER TABLE dead_letters ADD COLUMN event_type text;

-- 2. DLQ listings run in (dead_lettered_at, message_id) order with keyset paging. One index per
--    filter, each ending in that order, lets a filtered page read only the rows it returns;
--    several filters at once use one of these and check the others row by row.
CREATE INDEX dead_letters_dead_lettered ON dead_letters (dead_lettered_at, message_id);
CREATE INDEX dead_letters_error_code ON dead_letters (error_code, dead_lettered_at, message_id);
CREATE INDEX dead_letters_error_class ON dead_letters (error_class, dead_lettered_at, message_id);
CREATE INDEX dead_letters_event_type ON dead_letters (event_type, dead_lettered_at, message_id);
DROP INDEX dead_letters_event_id;
CREATE INDEX dead_letters_event_id ON dead_letters (event_id, dead_lettered_at, message_id);

-- 3. Counters, so that `depth` (the /metrics gauges) never counts a whole table. Statement
--    triggers with transition tables add each statement's rows at once (one counter update per
--    batch, not per row). Every backend writes only its own slot (pg_backend_pid() % 8), so
--    concurrent writers mostly touch different rows and readers add the slots up.
--
--    Deadlock freedom: a slot's row in queue_message_counts is the slot's lock. Every trigger
--    takes it before any other counter row of the slot (the DLQ triggers lock it explicitly),
--    and a transaction only ever uses its own backend's slot. So a transaction waiting for a
--    counter row never holds one someone else needs first. (One row per error code shared by
--    all backends could deadlock: a receive that dead-letters locks its queue slot then the
--    `retries_exhausted` row, while a redrive locks that row then its own queue slot.)
CREATE TABLE queue_message_counts (
    slot    integer PRIMARY KEY,
    n       bigint NOT NULL
);

-- Rows whose count falls to 0 stay (a handful of codes times 8 slots); readers skip them.
CREATE TABLE dead_letter_counts (
    slot        integer NOT NULL,
    error_code  text NOT NULL,
    n           bigint NOT NULL,
    PRIMARY KEY (slot, error_code)
);

-- Statements that changed no row (a receive with nothing exhausted, a stale receipt) return at
-- once, so they take no counter lock.
CREATE FUNCTION fluxa_count_inserted_messages() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n_rows bigint;
BEGIN
    SELECT COUNT(*) INTO n_rows FROM changed;
    IF n_rows > 0 THEN
        UPDATE queue_message_counts SET n = n + n_rows WHERE slot = pg_backend_pid() % 8;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION fluxa_count_deleted_messages() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n_rows bigint;
BEGIN
    SELECT COUNT(*) INTO n_rows FROM changed;
    IF n_rows > 0 THEN
        UPDATE queue_message_counts SET n = n - n_rows WHERE slot = pg_backend_pid() % 8;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION fluxa_count_inserted_dead_letters() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_slot integer := pg_backend_pid() % 8;
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        PERFORM 1 FROM queue_message_counts WHERE slot = my_slot FOR NO KEY UPDATE;
        INSERT INTO dead_letter_counts (slot, error_code, n)
            SELECT my_slot, error_code, COUNT(*) FROM changed GROUP BY error_code
            ON CONFLICT (slot, error_code) DO UPDATE SET n = dead_letter_counts.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION fluxa_count_deleted_dead_letters() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_slot integer := pg_backend_pid() % 8;
BEGIN
    IF EXISTS (SELECT 1 FROM changed) THEN
        PERFORM 1 FROM queue_message_counts WHERE slot = my_slot FOR NO KEY UPDATE;
        -- An upsert, not an UPDATE: the rows may have been counted in another slot.
        INSERT INTO dead_letter_counts (slot, error_code, n)
            SELECT my_slot, error_code, -COUNT(*) FROM changed GROUP BY error_code
            ON CONFLICT (slot, error_code) DO UPDATE SET n = dead_letter_counts.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER queue_messages_counted_on_insert AFTER INSERT ON queue_messages
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION fluxa_count_inserted_messages();
CREATE TRIGGER queue_messages_counted_on_delete AFTER DELETE ON queue_messages
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION fluxa_count_deleted_messages();
CREATE TRIGGER dead_letters_counted_on_insert AFTER INSERT ON dead_letters
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION fluxa_count_inserted_dead_letters();
CREATE TRIGGER dead_letters_counted_on_delete AFTER DELETE ON dead_letters
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION fluxa_count_deleted_dead_letters();

-- TRUNCATE would bypass the counters; nothing in Fluxa truncates these tables, and an operator
-- who does must truncate the counters with them (then re-run the initialisation below).

-- Start from the rows already there. The ALTER TABLEs above hold both tables' exclusive locks
-- until this migration commits, so no row can slip in between the counts and the triggers.
INSERT INTO queue_message_counts (slot, n) SELECT slot, 0 FROM generate_series(0, 7) AS slot;
UPDATE queue_message_counts SET n = (SELECT COUNT(*) FROM queue_messages) WHERE slot = 0;
INSERT INTO dead_letter_counts (slot, error_code, n)
    SELECT 0, error_code, COUNT(*) FROM dead_letters GROUP BY error_code;
