-- Fluxa embedded queue, version 2: the blob a message points at, so the blob sweeper can tell
-- a referenced blob from an orphan without parsing message bodies.
ALTER TABLE queue_messages ADD COLUMN blob_key TEXT;
ALTER TABLE dead_letters ADD COLUMN blob_key TEXT;
CREATE INDEX queue_messages_blob_key ON queue_messages (blob_key) WHERE blob_key IS NOT NULL;
CREATE INDEX dead_letters_blob_key ON dead_letters (blob_key) WHERE blob_key IS NOT NULL;
