-- rowsync: sync_errors on the TARGET database. Every failure rowsync records lands here, so operators
-- can query it with SQL. Idempotent: also brings a sync_errors table left by the Node sync service up
-- to this shape without touching its rows.
--   psql "$TARGET_DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/001_sync_errors.sql

CREATE TABLE IF NOT EXISTS sync_errors (
    id            bigserial PRIMARY KEY,
    error_type    text        NOT NULL,
    table_name    text,
    record_id     text,
    error_message text        NOT NULL,
    stack_trace   text,
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    retry_count   integer     NOT NULL DEFAULT 0,
    resolved      boolean     NOT NULL DEFAULT false,
    resolved_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS table_name    text;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS record_id     text;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS stack_trace   text;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS metadata      jsonb DEFAULT '{}'::jsonb;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS retry_count   integer NOT NULL DEFAULT 0;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS resolved      boolean NOT NULL DEFAULT false;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS resolved_at   timestamptz;
ALTER TABLE sync_errors ADD COLUMN IF NOT EXISTS created_at    timestamptz NOT NULL DEFAULT now();

CREATE INDEX IF NOT EXISTS sync_errors_created_at_idx ON sync_errors (created_at DESC);
CREATE INDEX IF NOT EXISTS sync_errors_unresolved_idx ON sync_errors (table_name, record_id) WHERE NOT resolved;
