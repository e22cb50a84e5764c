-- rowsync: `rowsync repair` records its runs in sync_runs too (kind 'repair': created = rows that
-- were missing in the target, updated = rows that differed, deleted = extra rows, failed = rows
-- that still differ after the repair).
--   psql "$TARGET_DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/005_sync_runs_repair.sql

ALTER TABLE sync_runs DROP CONSTRAINT IF EXISTS sync_runs_kind_check;
ALTER TABLE sync_runs ADD CONSTRAINT sync_runs_kind_check CHECK (kind IN ('sweep', 'copy', 'repair'));
