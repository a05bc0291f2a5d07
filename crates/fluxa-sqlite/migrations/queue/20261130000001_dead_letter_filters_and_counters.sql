-- Fluxa embedded queue, version 3: operator features (contract sections 4, 7, 8).
--
-- 1. The event's type travels with each message and each dead letter, so the DLQ can be
--    filtered by it without parsing bodies. Rows written before this migration keep NULL: their
--    type is only in their body, and a filter on event_type does not match them.
ALTER TABLE queue_messages ADD COLUMN event_type TEXT;
ALTER TABLE dead_letters ADD COLUMN event_type TEXT;

-- 2. DLQ listings run in (dead_lettered_at, message_id) order with keyset paging. One index per
--    filter, each ending in that order, lets a filtered page read only the rows it returns;
--    several filters at once use one of these and check the others row by row.
CREATE INDEX dead_letters_dead_lettered ON dead_letters (dead_lettered_at, message_id);
CREATE INDEX dead_letters_error_code ON dead_letters (error_code, dead_lettered_at, message_id);
CREATE INDEX dead_letters_error_class ON dead_letters (error_class, dead_lettered_at, message_id);
CREATE INDEX dead_letters_event_type ON dead_letters (event_type, dead_lettered_at, message_id);
DROP INDEX dead_letters_event_id;
CREATE INDEX dead_letters_event_id ON dead_letters (event_id, dead_lettered_at, message_id);

-- 3. Counters, so that `depth` (the /metrics gauges) never counts a whole table. Triggers keep
--    them exact in the same transaction as every write. SQLite has one writer at a time, so a
--    single row per counter is never contended.
CREATE TABLE queue_message_count (
    id  INTEGER PRIMARY KEY CHECK (id = 0),
    n   INTEGER NOT NULL
) STRICT;

-- Rows whose count falls to 0 stay (there are only a handful of error codes); readers skip them.
CREATE TABLE dead_letter_counts (
    error_code  TEXT PRIMARY KEY,
    n           INTEGER NOT NULL
) STRICT;

CREATE TRIGGER queue_messages_counted_on_insert AFTER INSERT ON queue_messages
BEGIN
    UPDATE queue_message_count SET n = n + 1;
END;

CREATE TRIGGER queue_messages_counted_on_delete AFTER DELETE ON queue_messages
BEGIN
    UPDATE queue_message_count SET n = n - 1;
END;

CREATE TRIGGER dead_letters_counted_on_insert AFTER INSERT ON dead_letters
BEGIN
    INSERT INTO dead_letter_counts (error_code, n) VALUES (NEW.error_code, 1)
        ON CONFLICT (error_code) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER dead_letters_counted_on_delete AFTER DELETE ON dead_letters
BEGIN
    UPDATE dead_letter_counts SET n = n - 1 WHERE error_code = OLD.error_code;
END;

-- Start from the rows already there (the migration holds the write lock, so none can slip in
-- between the count and the triggers).
INSERT INTO queue_message_count (id, n) SELECT 0, COUNT(*) FROM queue_messages;
INSERT INTO dead_letter_counts (error_code, n)
    SELECT error_code, COUNT(*) FROM dead_letters GROUP BY error_code;
