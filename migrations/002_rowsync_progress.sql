-- rowsync: replication progress on the TARGET database, one row per synced table.
--   psql "$TARGET_DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/002_rowsync_progress.sql
--
-- `snapshot` is a pg_snapshot of the SOURCE database (as text): every source transaction visible in
-- it has been applied to this database. rowsync advances it in the same transaction as the rows it
-- covers, which is what makes a crash at any moment safe: either both are committed or neither is.
-- NULL means the table's initial copy has not completed.

CREATE TABLE IF NOT EXISTS rowsync_progress (
    table_name  text        PRIMARY KEY,
    snapshot    text,
    copied_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
