-- rowsync: each table's progress row records the mapping it was copied with (the entry of
-- SYNC_CONFIG's file: target, filter, columns, key; NULL for a same-named table). When the file
-- says something else at the next start or reload, rowsync reads every row of the source again,
-- so rows already in the target follow the new mapping too.
--   psql "$TARGET_DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/006_progress_mapping.sql

ALTER TABLE rowsync_progress ADD COLUMN IF NOT EXISTS mapping text;
