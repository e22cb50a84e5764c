-- rowsync: run history on the TARGET database, one row per sweep and per initial copy.
--   psql "$TARGET_DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/004_sync_runs.sql
--
-- A row is written when the run starts (status 'running') and completed when it ends
-- ('succeeded' or 'failed', with the error). Rows older than SYNC_RUNS_RETENTION_DAYS are pruned.
-- A run cut short by a crash is marked 'failed' ('interrupted') when rowsync next becomes active.

CREATE TABLE IF NOT EXISTS sync_runs (
    id          bigserial   PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('sweep', 'copy')),
    table_name  text,       -- the copied table; NULL for a sweep (which covers every table)
    instance    text,       -- host:pid of the rowsync process
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status      text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    created     bigint      NOT NULL DEFAULT 0,
    updated     bigint      NOT NULL DEFAULT 0,
    deleted     bigint      NOT NULL DEFAULT 0,
    unchanged   bigint      NOT NULL DEFAULT 0,
    failed      bigint      NOT NULL DEFAULT 0,
    error       text
);
CREATE INDEX IF NOT EXISTS sync_runs_started_at_idx ON sync_runs (started_at DESC);
