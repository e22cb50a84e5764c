-- rowsync: retry timing of rows the target rejected, so backoff survives a restart.
--   psql "$TARGET_DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/003_sync_errors_retry.sql
--
-- last_attempt_at: when the failure last happened; next_retry_at: when sweeps retry the row next
-- (RETRY_INITIAL_DELAY x RETRY_BACKOFF_MULTIPLIER^retry_count, at most RETRY_MAX_DELAY).

ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS last_attempt_at timestamptz;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS next_retry_at   timestamptz;
