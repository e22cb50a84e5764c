-- rowsync capture objects for the SOURCE database.
--
-- Install by hand (the binary's `rowsync setup` runs this same file, then the same function):
--   psql "$SOURCE_DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/capture.sql
--   psql "$SOURCE_DATABASE_URL" -v ON_ERROR_STOP=1 -c "SELECT rowsync.install_capture('public.users')"
-- Both steps are idempotent: running them again changes nothing that is already in place.
--
-- What it creates, all in schema "rowsync":
--   * doorbell        one row; the consumer arms it before it sleeps, the first writer after that
--                     sends one NOTIFY and disarms it. Writers never NOTIFY otherwise: a NOTIFY in
--                     every write transaction serialises commits and halves write throughput.
--   * captured_tables one row per captured table: its journal and key columns.
--   * <table>_journal per captured table: (txid, key columns). Statement-level triggers add one row
--                     per changed key, in the same transaction as the change. The consumer batches
--                     journal rows by transaction visibility between two snapshots (PgQ's rule), so a
--                     transaction is consumed exactly once however long it ran before committing.
--   * <table>_capture the per-table trigger function of the statement-level triggers (INSERT,
--                     UPDATE, DELETE, TRUNCATE), with static SQL so its plans are cached. The
--                     UPDATE trigger reads the OLD rows too, so a changed key (or a row moved
--                     between partitions) has its old value journaled. No trigger names a column,
--                     and the function checks that the primary key is still the one its SQL names
--                     (else it journals by dynamic SQL): migrations never make a write fail.
--                     A partitioned table's partitions get the same statement triggers
--                     (captured_partitions lists them).
--   * rowsync_follow_ddl, an event trigger (created only where the role may) that adapts capture
--                     to migrations (renamed or retyped keys, renamed tables) and captures
--                     partitions as they are created, attached or detached, in the migration's
--                     own transaction. Without it the daemon does the same at its next sweep.
--
-- Journal rows are hints ("re-read this key"), never data: the consumer always re-reads the current
-- row. That is why writers may insert keys into journals (PUBLIC has INSERT on the key columns,
-- never on txid): a forged row only causes an extra re-read. Writers need no other privilege; nothing here can make a source write fail except
-- a full disk.

CREATE SCHEMA IF NOT EXISTS rowsync;
GRANT USAGE ON SCHEMA rowsync TO PUBLIC;

CREATE TABLE IF NOT EXISTS rowsync.doorbell (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    armed     boolean NOT NULL DEFAULT false
);
INSERT INTO rowsync.doorbell (singleton) VALUES (true) ON CONFLICT DO NOTHING;
GRANT SELECT ON rowsync.doorbell TO PUBLIC;

CREATE TABLE IF NOT EXISTS rowsync.captured_tables (
    table_schema name        NOT NULL,
    table_name   name        NOT NULL,
    journal_name name        NOT NULL UNIQUE,
    key_columns  name[]      NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);
-- Which definition of the capture triggers a table has (see install_capture).
ALTER TABLE rowsync.captured_tables ADD COLUMN IF NOT EXISTS capture_version integer;
-- The table itself (its oid follows renames), its key by attribute number (numbers follow column
-- renames and type changes), the primary-key index the capture function was written for, and,
-- when a migration left capture unable to journal the key, since when and why.
ALTER TABLE rowsync.captured_tables
    ADD COLUMN IF NOT EXISTS relid        oid,
    ADD COLUMN IF NOT EXISTS key_attnums  int2[],
    ADD COLUMN IF NOT EXISTS key_index    oid,
    ADD COLUMN IF NOT EXISTS lost_at      timestamptz,
    ADD COLUMN IF NOT EXISTS lost_reason  text,
    ADD COLUMN IF NOT EXISTS former_names text[];
-- Whether the key is one rowsync was told to use (a unique index whose columns are NOT NULL,
-- found by its columns, key_attnums) rather than the primary key.
ALTER TABLE rowsync.captured_tables ADD COLUMN IF NOT EXISTS key_chosen boolean NOT NULL DEFAULT false;
-- Rows written by earlier versions name their table only.
UPDATE rowsync.captured_tables ct
   SET relid = c.oid
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE ct.relid IS NULL AND n.nspname = ct.table_schema AND c.relname = ct.table_name;
UPDATE rowsync.captured_tables ct
   SET key_attnums = (SELECT array_agg(a.attnum ORDER BY k.ord)
                        FROM unnest(ct.key_columns) WITH ORDINALITY AS k(name, ord)
                        JOIN pg_attribute a ON a.attrelid = ct.relid AND a.attname = k.name)
 WHERE ct.key_attnums IS NULL AND ct.relid IS NOT NULL;

-- The partitions (at every level) of captured partitioned tables that carry capture triggers of
-- their own, so that a partition which left its table is noticed (see capture_partitions).
CREATE TABLE IF NOT EXISTS rowsync.captured_partitions (
    partition    oid  PRIMARY KEY,
    table_schema name NOT NULL,
    table_name   name NOT NULL
);

-- Rings the doorbell if it is armed. SKIP LOCKED: a writer never waits for another writer that is
-- ringing; that one's NOTIFY goes out when it commits. Runs as the owner, so writers need no UPDATE
-- privilege on the doorbell.
CREATE OR REPLACE FUNCTION rowsync.ring_doorbell() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM rowsync.doorbell WHERE armed FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
        UPDATE rowsync.doorbell SET armed = false;
        PERFORM pg_notify('rowsync', '');
    END IF;
EXCEPTION WHEN serialization_failure THEN
    -- A REPEATABLE READ or SERIALIZABLE writer whose snapshot still sees the bell armed, after
    -- another writer rang it: that ring's notification is on the way, and the write must not fail.
    NULL;
END
$$;

-- Arms the doorbell; called by the consumer just before it waits. Returns false when a writer is
-- ringing it right now (its notification is on the way, so there is nothing to arm). Runs as the
-- owner, so the consumer's role needs no UPDATE privilege on the doorbell.
CREATE OR REPLACE FUNCTION rowsync.arm_doorbell() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Already armed (the common case while idle): a plain read, no row lock, no transaction id.
    IF (SELECT armed FROM rowsync.doorbell) THEN
        RETURN true;
    END IF;
    PERFORM 1 FROM rowsync.doorbell FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE rowsync.doorbell SET armed = true WHERE NOT armed;
    RETURN true;
END
$$;

-- The longest prefix of `t` that fits in `bytes` bytes (identifiers are limited to 63 bytes, not
-- characters: a name of 24 two-byte characters is 48 bytes).
CREATE OR REPLACE FUNCTION rowsync.left_bytes(t text, bytes integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog AS $$
BEGIN
    WHILE octet_length(t) > bytes LOOP
        t := left(t, -1);
    END LOOP;
    RETURN t;
END
$$;

-- The base of a captured table's function names (`<base>_capture`, `<base>_capture_key`): its
-- journal's name without `_journal` when both fit in 63 bytes, else one made of the table's oid,
-- so that the two names can never be cut to the same one.
CREATE OR REPLACE FUNCTION rowsync.function_base(journal name, tbl oid) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog AS $$
    SELECT CASE WHEN octet_length(journal) - 8 + 12 <= 63
                THEN left(journal, length(journal) - length('_journal'))
                ELSE 'table_' || tbl END
$$;

-- Drops rowsync's statement-level capture triggers from one table or partition.
CREATE OR REPLACE FUNCTION rowsync.drop_statement_triggers(rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['rowsync_capture_insert', 'rowsync_capture_update',
                                  'rowsync_capture_delete', 'rowsync_capture_truncate'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', v_name, rel);
    END LOOP;
END
$$;

-- The captured_tables row of a table (all NULL when it is not captured): by oid, which follows
-- renames, or by name for a row an earlier version wrote.
CREATE OR REPLACE FUNCTION rowsync.captured(tbl regclass) RETURNS rowsync.captured_tables
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT ct.*
      FROM rowsync.captured_tables ct
     WHERE ct.relid = tbl
        OR (ct.relid IS NULL
            AND (ct.table_schema, ct.table_name) = (SELECT n.nspname, c.relname
                                                      FROM pg_class c
                                                      JOIN pg_namespace n ON n.oid = c.relnamespace
                                                     WHERE c.oid = tbl))
     ORDER BY ct.relid IS NULL
     LIMIT 1
$$;

-- The statement-level capture triggers of a table or partition `rel` (name, definition), calling
-- `fn`. The UPDATE trigger reads the OLD rows as well as the NEW ones, so that a changed key has
-- its old value journaled too (a row moved to another partition changes its key without firing
-- any row trigger); no trigger names a column, so no migration is refused because of one. A
-- partitioned table has no TRUNCATE trigger (truncating it fires its partitions').
CREATE OR REPLACE FUNCTION rowsync.statement_triggers(rel regclass, fn name)
RETURNS TABLE (name text, definition text)
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    WITH r AS (SELECT relkind = 'p' AS partitioned FROM pg_class WHERE oid = rel)
    SELECT t.name, t.definition FROM r, LATERAL (VALUES
        ('rowsync_capture_insert', format(
            'AFTER INSERT ON %s REFERENCING NEW TABLE AS rowsync_new FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn)),
        ('rowsync_capture_update', format(
            'AFTER UPDATE ON %s REFERENCING OLD TABLE AS rowsync_old NEW TABLE AS rowsync_new FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn)),
        ('rowsync_capture_delete', format(
            'AFTER DELETE ON %s REFERENCING OLD TABLE AS rowsync_old FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn)),
        ('rowsync_capture_truncate', format(
            'BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn))
    ) AS t(name, definition)
    WHERE NOT (r.partitioned AND t.name = 'rowsync_capture_truncate')
$$;

-- A column's type as the table has it, for a column definition: type, modifier and collation.
CREATE OR REPLACE FUNCTION rowsync.column_type(rel oid, attnum int2) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
                   THEN format(' COLLATE %I.%I', cn.nspname, co.collname) ELSE '' END
      FROM pg_attribute a
      JOIN pg_type ty ON ty.oid = a.atttypid
      LEFT JOIN pg_collation co ON co.oid = a.attcollation
      LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
     WHERE a.attrelid = rel AND a.attnum = column_type.attnum
$$;

-- The captured table that `rel` is, or is a partition of (at any level); NULL when none.
CREATE OR REPLACE FUNCTION rowsync.captured_of(rel regclass) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT ct.relid FROM rowsync.captured_tables ct
     WHERE ct.relid = rel OR ct.relid IN (SELECT relid FROM pg_partition_ancestors(rel))
     LIMIT 1
$$;

-- The index a captured table's key is now: its primary key, or for a chosen key the unique index
-- on those columns (in that order) usable as one (no predicate, no expressions, not deferred).
CREATE OR REPLACE FUNCTION rowsync.key_index(rel oid, chosen boolean, attnums int2[]) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT i.indexrelid FROM pg_index i
     WHERE i.indrelid = rel
       AND CASE WHEN chosen
                THEN i.indisunique AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL
                     AND i.indexprs IS NULL AND ARRAY(SELECT unnest((i.indkey::int2[])[0:i.indnkeyatts - 1])) = attnums
                ELSE i.indisprimary END
     ORDER BY i.indisprimary DESC, i.indexrelid
     LIMIT 1
$$;

-- The statement journaling the keys of a write by dynamic SQL, for a capture function whose static
-- SQL no longer fits the table (a migration renamed or retyped a key column, and capture has not
-- been adapted yet: see adapt_capture) and for TRUNCATE. `rel` is the captured table or one of its
-- partitions, `op` the trigger's TG_OP. The key is found by attribute number in the captured
-- table, by its name now, and cast to the journal's types. Raises an error when the key can no
-- longer be found (a key column dropped, another primary key): the capture function catches it.
CREATE OR REPLACE FUNCTION rowsync.journal_sql(rel regclass, op text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ct     rowsync.captured_tables%ROWTYPE;
    v_into   text;
    v_keys   text;
    v_pk     int2[];
BEGIN
    SELECT ct.* INTO v_ct FROM rowsync.captured_tables ct WHERE ct.relid = rowsync.captured_of(rel);
    IF v_ct.journal_name IS NULL THEN
        RAISE EXCEPTION 'rowsync: % is not captured', rel;
    END IF;
    SELECT ARRAY(SELECT unnest((i.indkey::int2[])[0:i.indnkeyatts - 1])) INTO v_pk FROM pg_index i
     WHERE i.indexrelid = rowsync.key_index(v_ct.relid, v_ct.key_chosen, v_ct.key_attnums);
    IF v_pk IS DISTINCT FROM v_ct.key_attnums THEN
        RAISE EXCEPTION 'the key of % is no longer the one captured', v_ct.relid::regclass;
    END IF;
    SELECT string_agg(format('%I', j.attname), ', ' ORDER BY k.ord),
           string_agg(format('%I::%s', a.attname, format_type(j.atttypid, j.atttypmod)), ', ' ORDER BY k.ord)
      INTO v_into, v_keys
      FROM unnest(v_ct.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = v_ct.relid AND a.attnum = k.attnum AND NOT a.attisdropped
      JOIN pg_attribute j ON j.attrelid = format('rowsync.%I', v_ct.journal_name)::regclass
                         AND j.attnum = k.ord + 1;
    RETURN format('INSERT INTO rowsync.%I (%s) ', v_ct.journal_name, v_into) || CASE op
        WHEN 'DELETE' THEN format('SELECT %s FROM rowsync_old', v_keys)
        WHEN 'UPDATE' THEN format('SELECT %s FROM rowsync_old UNION SELECT %1$s FROM rowsync_new', v_keys)
        WHEN 'TRUNCATE' THEN format('SELECT %s FROM %s', v_keys, rel)
        ELSE format('SELECT %s FROM rowsync_new', v_keys)
    END;
END
$$;

-- Records that writes to `rel` (a captured table or partition) could not be journaled, once (the
-- first writer to see it; the others skip the row lock rather than wait for it). rowsync reports
-- the table critical until `rowsync resync` copies it again.
CREATE OR REPLACE FUNCTION rowsync.capture_lost(rel regclass, reason text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_table oid;
BEGIN
    SELECT ct.relid INTO v_table FROM rowsync.captured_tables ct
     WHERE ct.relid = rowsync.captured_of(rel) AND ct.lost_at IS NULL
       FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
        UPDATE rowsync.captured_tables SET lost_at = now(), lost_reason = reason WHERE relid = v_table;
        RAISE WARNING 'rowsync: changes to % are not captured: %', rel, reason
            USING HINT = 'Your write went through; run rowsync resync for this table.';
    END IF;
END
$$;

-- (Re)writes the capture function of a captured table for its key as it is now. Static SQL: plpgsql
-- caches the plans. Every name in it is schema-qualified, so the function needs no SET
-- search_path (which would cost a configuration save and restore on every write statement).
--
-- What a write costs: one INSERT of the changed keys from the statement's transition tables,
-- which also reads the doorbell in the same statement (a data-modifying CTE: one executor run, not
-- two), and a check that the primary key is still the one the static SQL names (one catalog
-- lookup per key column, no query). When it is not (a migration renamed or retyped a key column
-- and nothing has adapted capture yet), the keys are journaled by dynamic SQL, and a key that
-- cannot be journaled is recorded (capture_lost), never an error: a migration can slow writes
-- down until capture is adapted, never make them fail. TRUNCATE fires no row triggers and has no
-- transition tables, so a BEFORE TRUNCATE trigger journals every key that is about to go.
CREATE OR REPLACE FUNCTION rowsync.write_capture_function(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $write$
DECLARE
    v_ct       rowsync.captured_tables%ROWTYPE;
    v_keys     text;
    v_guard    text;
BEGIN
    v_ct := rowsync.captured(tbl);
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY k.ord),
           string_agg(format('pg_catalog.pg_get_indexdef(%s::pg_catalog.oid, %s, false) IS DISTINCT FROM %L',
                             v_ct.key_index, k.ord, pg_get_indexdef(v_ct.key_index, k.ord::int, false)),
                      ' OR ' ORDER BY k.ord)
      INTO v_keys, v_guard
      FROM unnest(v_ct.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.attnum;
    EXECUTE format($fn$
        CREATE OR REPLACE FUNCTION rowsync.%1$I() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        DECLARE
            v_armed boolean;
        BEGIN
            IF TG_OP = 'TRUNCATE' OR %4$s THEN
                BEGIN
                    EXECUTE rowsync.journal_sql(TG_RELID, TG_OP);
                EXCEPTION WHEN OTHERS THEN
                    -- Capture may have been adapted meanwhile: once more, as the catalog is now.
                    BEGIN
                        EXECUTE rowsync.journal_sql(TG_RELID, TG_OP);
                    EXCEPTION WHEN OTHERS THEN
                        PERFORM rowsync.capture_lost(TG_RELID, SQLERRM);
                    END;
                END;
                SELECT armed INTO v_armed FROM rowsync.doorbell;
            ELSIF TG_OP = 'DELETE' THEN
                WITH j AS (INSERT INTO rowsync.%2$I (%3$s) SELECT %3$s FROM rowsync_old)
                SELECT armed INTO v_armed FROM rowsync.doorbell;
            ELSIF TG_OP = 'UPDATE' THEN
                -- Old and new keys: they differ when the statement changed a key.
                WITH j AS (INSERT INTO rowsync.%2$I (%3$s)
                           SELECT %3$s FROM rowsync_old UNION SELECT %3$s FROM rowsync_new)
                SELECT armed INTO v_armed FROM rowsync.doorbell;
            ELSE
                WITH j AS (INSERT INTO rowsync.%2$I (%3$s) SELECT %3$s FROM rowsync_new)
                SELECT armed INTO v_armed FROM rowsync.doorbell;
            END IF;
            IF v_armed THEN
                PERFORM rowsync.ring_doorbell();
            END IF;
            RETURN NULL;
        END
        $body$
    $fn$, rowsync.function_base(v_ct.journal_name, tbl) || '_capture', v_ct.journal_name, v_keys, v_guard);
END
$write$;

-- Adapts a table's capture to what migrations did to it: a new table name is recorded (its
-- triggers and journal stay), renamed key columns are renamed in the journal, retyped ones retyped
-- there, and the capture function is written again for the key as it is now. A primary key on
-- other columns, or a key column gone, cannot be adapted: that is recorded (lost_at) and rowsync
-- reports the table until it is copied again. Called by the event trigger in the migration's own
-- transaction where there is one, else by the daemon when it sees the columns change (writes are
-- journaled by dynamic SQL meanwhile). Returns what it did. Runs as its owner (setup's role), so
-- the daemon and the event trigger may call it; it acts only on captured tables.
CREATE OR REPLACE FUNCTION rowsync.adapt_capture(tbl regclass) RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ct      rowsync.captured_tables%ROWTYPE;
    v_schema  name;
    v_table   name;
    v_journal regclass;
    v_pk      int2[];
    v_index   oid;
    v_col     record;
    v_done    text[] := '{}';
    v_changed boolean := false;
BEGIN
    v_ct := rowsync.captured(tbl);
    IF v_ct.journal_name IS NULL THEN
        RETURN v_done;
    END IF;
    v_journal := format('rowsync.%I', v_ct.journal_name)::regclass;
    IF v_ct.relid IS NULL THEN
        UPDATE rowsync.captured_tables SET relid = tbl WHERE journal_name = v_ct.journal_name;
        v_ct.relid := tbl;
    END IF;

    SELECT n.nspname, c.relname INTO v_schema, v_table
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF (v_schema, v_table) IS DISTINCT FROM (v_ct.table_schema, v_ct.table_name) THEN
        UPDATE rowsync.captured_tables
           SET table_schema = v_schema, table_name = v_table,
               former_names = array_append(former_names, format('%I.%I', v_ct.table_schema, v_ct.table_name))
         WHERE journal_name = v_ct.journal_name;
        UPDATE rowsync.captured_partitions SET table_schema = v_schema, table_name = v_table
         WHERE table_schema = v_ct.table_schema AND table_name = v_ct.table_name;
        v_done := v_done || format('%I.%I was renamed to %I.%I', v_ct.table_schema, v_ct.table_name, v_schema, v_table);
    END IF;

    -- (indkey counts from 0: unnest it to compare with arrays counted from 1)
    SELECT ARRAY(SELECT unnest((i.indkey::int2[])[0:i.indnkeyatts - 1])), i.indexrelid INTO v_pk, v_index
      FROM pg_index i WHERE i.indexrelid = rowsync.key_index(tbl, v_ct.key_chosen, v_ct.key_attnums);
    IF v_ct.key_attnums IS NULL AND v_pk IS NOT NULL
       AND v_ct.key_columns = ARRAY(SELECT a.attname FROM unnest(v_pk) WITH ORDINALITY AS k(attnum, ord)
                                      JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.attnum
                                     ORDER BY k.ord) THEN
        v_ct.key_attnums := v_pk;
        UPDATE rowsync.captured_tables SET key_attnums = v_pk WHERE journal_name = v_ct.journal_name;
    END IF;
    IF v_ct.key_chosen AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = tbl
                                      AND attnum = ANY (v_ct.key_attnums) AND NOT attnotnull) THEN
        -- Rows whose key is NULL cannot be told apart: their changes cannot be applied.
        IF v_ct.lost_at IS NULL THEN
            UPDATE rowsync.captured_tables
               SET lost_at = now(), lost_reason = 'a column of its key may be NULL now'
             WHERE journal_name = v_ct.journal_name;
            v_done := v_done || format('a key column of %s may be NULL now: changes are not captured until it is NOT NULL again and rowsync resync', tbl);
        END IF;
        RETURN v_done;
    END IF;
    IF v_pk IS DISTINCT FROM v_ct.key_attnums THEN
        IF v_ct.lost_at IS NULL THEN
            UPDATE rowsync.captured_tables
               SET lost_at = now(),
                   lost_reason = CASE WHEN v_ct.key_chosen
                                      THEN 'the unique index of its key is gone: its journal no longer fits'
                                      ELSE 'the primary key changed: its journal no longer fits' END
             WHERE journal_name = v_ct.journal_name;
            v_done := v_done || format('the %s of %s changed: changes are not captured until rowsync resync',
                                       CASE WHEN v_ct.key_chosen THEN 'key index' ELSE 'primary key' END, tbl);
        END IF;
        RETURN v_done;
    END IF;

    -- Key columns renamed or retyped (matched by attribute number).
    FOR v_col IN
        SELECT a.attname AS name, j.attname AS journal_name,
               rowsync.column_type(tbl, a.attnum) AS type,
               (a.atttypid, a.atttypmod, a.attcollation) IS DISTINCT FROM (j.atttypid, j.atttypmod, j.attcollation) AS retyped
          FROM unnest(v_ct.key_attnums) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.attnum
          JOIN pg_attribute j ON j.attrelid = v_journal AND j.attnum = k.ord + 1
         ORDER BY k.ord
    LOOP
        IF v_col.name <> v_col.journal_name THEN
            -- The journal's first column is the transaction id, found by position: it gives way.
            IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = v_journal AND attnum = 1 AND attname = v_col.name) THEN
                EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', v_journal, v_col.name,
                               CASE WHEN v_col.name = 'rowsync_txid' THEN 'txid' ELSE 'rowsync_txid' END);
            END IF;
            EXECUTE format('ALTER TABLE %s RENAME COLUMN %I TO %I', v_journal, v_col.journal_name, v_col.name);
            v_done := v_done || format('key column %I of %s renamed to %I', v_col.journal_name, tbl, v_col.name);
            v_changed := true;
        END IF;
        IF v_col.retyped THEN
            BEGIN
                EXECUTE format('ALTER TABLE %s ALTER COLUMN %I TYPE %s USING %I::%s',
                               v_journal, v_col.name, v_col.type, v_col.name, v_col.type);
            EXCEPTION WHEN OTHERS THEN
                -- Journaled keys that the new type cannot hold: they are lost as hints, so the
                -- table needs copying again.
                EXECUTE format('DELETE FROM %s', v_journal);
                EXECUTE format('ALTER TABLE %s ALTER COLUMN %I TYPE %s USING NULL',
                               v_journal, v_col.name, v_col.type);
                UPDATE rowsync.captured_tables
                   SET lost_at = coalesce(lost_at, now()),
                       lost_reason = coalesce(lost_reason, format('journaled keys could not be converted to %s', v_col.type))
                 WHERE journal_name = v_ct.journal_name;
            END;
            v_done := v_done || format('key column %I of %s is now %s', v_col.name, tbl, v_col.type);
            v_changed := true;
        END IF;
    END LOOP;

    IF v_changed OR v_index IS DISTINCT FROM v_ct.key_index THEN
        UPDATE rowsync.captured_tables
           SET key_index = v_index,
               key_columns = ARRAY(SELECT a.attname FROM unnest(v_pk) WITH ORDINALITY AS k(attnum, ord)
                                     JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = k.attnum
                                    ORDER BY k.ord)
         WHERE journal_name = v_ct.journal_name;
        PERFORM rowsync.write_capture_function(tbl);
        IF NOT v_changed THEN
            v_done := v_done || format('capture of %s written again for its rebuilt primary key', tbl);
        END IF;
    END IF;
    RETURN v_done;
END
$$;
REVOKE EXECUTE ON FUNCTION rowsync.adapt_capture(regclass) FROM PUBLIC;

-- Gives every partition of a captured partitioned table (at every level) statement triggers of its
-- own, calling the table's capture function: writes made straight into a partition fire only the
-- partition's statement triggers, not the table's. Row triggers (the key trigger) are cloned to
-- partitions by PostgreSQL itself. A partition that gets them now (created or attached after
-- setup) has its rows journaled too when `journal_rows`, so rows written into it before are read
-- again. A partition that left the table (DETACH) has its rows journaled, so they leave the target,
-- and loses its triggers. Returns what it did, one line per partition. Runs as its owner (setup's
-- role), so the daemon and the event trigger may call it; it acts only on captured tables.
CREATE OR REPLACE FUNCTION rowsync.capture_partitions(tbl regclass, journal_rows boolean DEFAULT true)
RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ct       rowsync.captured_tables%ROWTYPE;
    v_function name;
    v_keys     text;
    v_part     record;
    v_trigger  record;
    v_new      boolean;
    v_done     text[] := '{}';
BEGIN
    v_ct := rowsync.captured(tbl);
    IF v_ct.journal_name IS NULL THEN
        RETURN v_done;
    END IF;
    v_function := rowsync.function_base(v_ct.journal_name, tbl) || '_capture';
    SELECT string_agg(format('%I', k), ', ' ORDER BY o) INTO v_keys
      FROM unnest(v_ct.key_columns) WITH ORDINALITY AS u(k, o);

    -- Partitions that left the table since.
    FOR v_part IN
        SELECT cp.partition, c.oid IS NOT NULL AS present
          FROM rowsync.captured_partitions cp
          LEFT JOIN pg_class c ON c.oid = cp.partition
         WHERE cp.table_schema = v_ct.table_schema AND cp.table_name = v_ct.table_name
           AND cp.partition NOT IN (SELECT relid FROM pg_partition_tree(tbl))
    LOOP
        IF v_part.present THEN
            IF (SELECT relkind FROM pg_class WHERE oid = v_part.partition) = 'r' THEN
                EXECUTE format('INSERT INTO rowsync.%I (%s) SELECT %s FROM %s',
                               v_ct.journal_name, v_keys, v_keys, v_part.partition::regclass);
            END IF;
            PERFORM rowsync.drop_statement_triggers(v_part.partition);
            v_done := v_done || format('detached %s: its rows leave the target', v_part.partition::regclass);
        ELSE
            v_done := v_done || format('dropped partition %s: its rows stay in the target until a re-copy', v_part.partition);
        END IF;
        DELETE FROM rowsync.captured_partitions WHERE partition = v_part.partition;
    END LOOP;

    FOR v_part IN
        SELECT c.oid, c.oid::regclass AS rel, c.relkind
          FROM pg_partition_tree(tbl) t JOIN pg_class c ON c.oid = t.relid
         WHERE t.level > 0 AND c.relkind IN ('r', 'p')
         ORDER BY t.level, c.oid
    LOOP
        v_new := false;
        FOR v_trigger IN SELECT * FROM rowsync.statement_triggers(v_part.rel, v_function) LOOP
            -- Earlier versions' UPDATE trigger read only the NEW rows (a key trigger, now gone,
            -- caught key changes): replaced in this transaction, so no write escapes capture.
            IF v_trigger.name = 'rowsync_capture_update'
               AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = v_part.oid
                              AND tgname = v_trigger.name AND tgoldtable IS NULL) THEN
                EXECUTE format('DROP TRIGGER rowsync_capture_update ON %s', v_part.rel);
                EXECUTE format('CREATE TRIGGER %I %s', v_trigger.name, v_trigger.definition);
            END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = v_part.oid AND tgname = v_trigger.name) THEN
                EXECUTE format('CREATE TRIGGER %I %s', v_trigger.name, v_trigger.definition);
                v_new := true;
            END IF;
            IF (SELECT tgenabled FROM pg_trigger WHERE tgrelid = v_part.oid AND tgname = v_trigger.name) <> 'A' THEN
                EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', v_part.rel, v_trigger.name);
                v_new := true;
            END IF;
        END LOOP;
        -- (Written only when new: the daemon calls this at every sweep, which should cost no
        -- transaction id and leave no dead row when nothing changed.)
        IF NOT EXISTS (SELECT 1 FROM rowsync.captured_partitions
                        WHERE partition = v_part.oid AND table_schema = v_ct.table_schema
                          AND table_name = v_ct.table_name) THEN
            INSERT INTO rowsync.captured_partitions (partition, table_schema, table_name)
            VALUES (v_part.oid, v_ct.table_schema, v_ct.table_name)
            ON CONFLICT (partition) DO UPDATE
               SET table_schema = EXCLUDED.table_schema, table_name = EXCLUDED.table_name;
        END IF;
        IF v_new THEN
            IF journal_rows AND v_part.relkind = 'r' THEN
                EXECUTE format('INSERT INTO rowsync.%I (%s) SELECT %s FROM %s',
                               v_ct.journal_name, v_keys, v_keys, v_part.rel);
            END IF;
            v_done := v_done || format('captured partition %s', v_part.rel);
        END IF;
    END LOOP;
    RETURN v_done;
END
$$;
REVOKE EXECUTE ON FUNCTION rowsync.capture_partitions(regclass, boolean) FROM PUBLIC;

-- Installs (or repairs) capture for one table. Returns 'installed' when capture was created,
-- 'repaired' when something was missing or disabled and has been put back (changes made meanwhile
-- were not journaled, so the table needs a fresh copy), 'upgraded' when triggers of an older
-- definition were replaced without a gap, or 'unchanged'.
-- `chosen_key` names the columns to key the journal by when they are not the primary key's: those of a
-- unique index whose columns are NOT NULL (a table without a primary key can be captured so).
-- (No default: the one-argument form below stays its own function, so that an older rowsync's
-- file or binary, and the psql line at the top, keep working.)
CREATE OR REPLACE FUNCTION rowsync.install_capture(tbl regclass, chosen_key name[]) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $install$
DECLARE
    v_schema     name;
    v_table      name;
    v_keys       name[];
    v_attnums    int2[];
    v_index      oid;
    v_key_defs   text;
    v_key_list   text;
    v_old        rowsync.captured_tables%ROWTYPE;
    v_journal    name;
    v_function   name;
    v_status     text := 'unchanged';
    v_trigger    record;
    v_current    oid;
    v_replaced   oid[] := '{}';
    v_txid       name;
    v_partitioned boolean;
BEGIN
    SELECT n.nspname, c.relname, c.relkind = 'p' INTO v_schema, v_table, v_partitioned
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = tbl;

    SELECT array_agg(a.attname ORDER BY k.ord), array_agg(a.attnum ORDER BY k.ord), i.indexrelid,
           -- The key as the table has it: type, modifier and collation.
           -- A chosen key's columns are NOT NULL now, but a migration may change that: its journal
           -- must take a NULL rather than fail the write (adapt_capture records the table lost).
           string_agg(format('%I %s%s', a.attname, rowsync.column_type(tbl, a.attnum),
                             CASE WHEN chosen_key IS NULL THEN ' NOT NULL' ELSE '' END),
                      ', ' ORDER BY k.ord),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.ord)
      INTO v_keys, v_attnums, v_index, v_key_defs, v_key_list
      FROM pg_index i
     CROSS JOIN LATERAL unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = tbl
       AND CASE WHEN chosen_key IS NULL THEN i.indisprimary
                ELSE i.indisunique AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL
                     AND i.indexprs IS NULL
                     AND (SELECT array_agg(ka.attname ORDER BY ka.attname)
                            FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) AS ki(attnum)
                            JOIN pg_attribute ka ON ka.attrelid = tbl AND ka.attnum = ki.attnum)
                         = (SELECT array_agg(kn ORDER BY kn) FROM unnest(chosen_key) AS kn) END
     GROUP BY i.indexrelid, i.indisprimary
     ORDER BY i.indisprimary DESC, i.indexrelid
     LIMIT 1;
    IF v_keys IS NULL AND chosen_key IS NULL THEN
        RAISE EXCEPTION 'rowsync: table %.% has no primary key', v_schema, v_table
            USING HINT = 'rowsync identifies rows by the primary key; add one to the source table, or name a unique key.';
    ELSIF v_keys IS NULL THEN
        RAISE EXCEPTION 'rowsync: table %.% has no unique index on (%)', v_schema, v_table, array_to_string(chosen_key, ', ')
            USING HINT = 'A key must be the columns of a unique index without WHERE or expressions.';
    ELSIF chosen_key IS NOT NULL AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = tbl
                                         AND attnum = ANY (v_attnums) AND NOT attnotnull) THEN
        RAISE EXCEPTION 'rowsync: the key (%) of %.% has columns that may be NULL', array_to_string(chosen_key, ', '), v_schema, v_table
            USING HINT = 'A key''s columns must be NOT NULL.';
    END IF;

    -- Serialise concurrent installs of the same table.
    PERFORM pg_advisory_xact_lock(hashtext('rowsync.install_capture'), tbl::oid::int);

    v_old := rowsync.captured(tbl);
    IF v_old.journal_name IS NULL THEN
        -- Capture recorded under this name belongs to another table: one renamed away since
        -- (its capture follows it), or one dropped (its triggers went with it).
        SELECT * INTO v_old FROM rowsync.captured_tables
         WHERE table_schema = v_schema AND table_name = v_table;
        IF FOUND THEN
            IF EXISTS (SELECT 1 FROM pg_class WHERE oid = v_old.relid) THEN
                PERFORM rowsync.adapt_capture(v_old.relid);
            ELSE
                PERFORM rowsync.forget_capture(v_old.journal_name, v_old.relid);
            END IF;
            v_old := NULL;
        END IF;
    ELSE
        -- Follow what migrations did since (renames, retyped key columns).
        PERFORM rowsync.adapt_capture(tbl);
        v_old := rowsync.captured(tbl);
        IF v_old.lost_at IS NOT NULL OR v_old.key_attnums IS DISTINCT FROM v_attnums THEN
            -- Capture could not follow (another primary key, keys it could not journal): start
            -- afresh; the copy that follows reads every row.
            PERFORM rowsync.uninstall_capture(tbl);
            v_old := NULL;
            v_status := 'repaired';
        END IF;
    END IF;

    IF v_old.journal_name IS NOT NULL THEN
        v_journal := v_old.journal_name;
    ELSE
        -- <schema>_<table>_journal when that fits and is free (counting bytes), else a prefix of
        -- it and the table's oid, which no other table has.
        v_journal := v_schema || '_' || v_table || '_journal';
        IF octet_length(v_journal) > 48
           OR EXISTS (SELECT 1 FROM rowsync.captured_tables WHERE journal_name = v_journal) THEN
            v_journal := rowsync.left_bytes(v_schema || '_' || v_table, 30) || '_' || tbl::oid || '_journal';
        END IF;
        INSERT INTO rowsync.captured_tables (table_schema, table_name, journal_name, key_columns, relid, key_attnums)
        VALUES (v_schema, v_table, v_journal, v_keys, tbl, v_attnums);
        IF v_status = 'unchanged' THEN
            v_status := 'installed';
        END IF;
    END IF;
    v_function := rowsync.function_base(v_journal, tbl) || '_capture';

    IF to_regclass(format('rowsync.%I', v_journal)) IS NULL THEN
        -- The first column is the writer's transaction id (rowsync finds it by position, so a
        -- key column may be called txid).
        v_txid := CASE WHEN 'txid' = ANY (v_keys) THEN 'rowsync_txid' ELSE 'txid' END;
        EXECUTE format(
            'CREATE TABLE rowsync.%I (%I xid8 NOT NULL DEFAULT pg_current_xact_id(), %s)',
            v_journal, v_txid, v_key_defs);
        -- No index: the consumer empties the journal continuously, so it stays small and a scan of
        -- it is cheap, while a txid index measurably slowed every source write (~8% at 16 clients).
        -- Vacuum it eagerly so the emptied pages are reused.
        EXECUTE format(
            'ALTER TABLE rowsync.%I SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 1000)',
            v_journal);
        IF v_status = 'unchanged' THEN
            v_status := 'repaired';
        END IF;
    END IF;
    -- Writers may add keys, never choose the transaction id: a row with a txid from the future
    -- would never become visible, so never be consumed. (Journals made by earlier versions let
    -- PUBLIC insert every column; this takes that back. rowsync also deletes such rows.)
    EXECUTE format('REVOKE INSERT ON rowsync.%I FROM PUBLIC', v_journal);
    EXECUTE format('GRANT INSERT (%s) ON rowsync.%I TO PUBLIC', v_key_list, v_journal);

    UPDATE rowsync.captured_tables
       SET key_index = v_index, key_attnums = v_attnums, key_chosen = chosen_key IS NOT NULL
     WHERE journal_name = v_journal;
    PERFORM rowsync.write_capture_function(tbl);

    -- Triggers of an older definition are re-created inside this transaction: the table stays
    -- locked throughout, so no write escapes capture and nothing needs copying again. Version 1
    -- read an OLD transition table on every UPDATE; version 2 read only the NEW one and caught key
    -- changes with a row trigger on the key columns, which made PostgreSQL refuse to change their
    -- type; version 3 reads both again, and its triggers name no column.
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl
                  AND tgname = 'rowsync_capture_update' AND tgoldtable IS NULL) THEN
        EXECUTE format('DROP TRIGGER rowsync_capture_update ON %s', tbl);
        IF v_status = 'unchanged' THEN
            v_status := 'upgraded';
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl AND tgname = 'rowsync_capture_key') THEN
        EXECUTE format('DROP TRIGGER rowsync_capture_key ON %s', tbl);
        IF v_status = 'unchanged' THEN
            v_status := 'upgraded';
        END IF;
    END IF;
    IF to_regprocedure(format('rowsync.%I()', v_function || '_key')) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION rowsync.%I()', v_function || '_key');
    END IF;
    -- Truncating a partitioned table fires its partitions' TRUNCATE triggers.
    IF v_partitioned THEN
        EXECUTE format('DROP TRIGGER IF EXISTS rowsync_capture_truncate ON %s', tbl);
    END IF;
    UPDATE rowsync.captured_tables SET capture_version = 3 WHERE journal_name = v_journal;

    -- Create the missing triggers; ENABLE ALWAYS so they fire under session_replication_role =
    -- replica too (pg_restore --disable-triggers and some tools switch it).
    FOR v_trigger IN SELECT * FROM rowsync.statement_triggers(tbl, v_function) LOOP
        -- A trigger calling another function (earlier versions named the functions of long
        -- table names so that two of them could be cut to the same 63 bytes) is re-created in
        -- this transaction, which keeps the table locked: no write escapes capture meanwhile.
        SELECT tg.tgfoid INTO v_current
          FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
         WHERE tg.tgrelid = tbl AND tg.tgname = v_trigger.name
           AND (p.proname <> v_function OR p.pronamespace <> 'rowsync'::regnamespace);
        IF FOUND THEN
            EXECUTE format('DROP TRIGGER %I ON %s', v_trigger.name, tbl);
            v_replaced := v_replaced || v_current;
            IF v_status = 'unchanged' THEN
                v_status := 'upgraded';
            END IF;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl AND tgname = v_trigger.name) THEN
            EXECUTE format('CREATE TRIGGER %I %s', v_trigger.name, v_trigger.definition);
            IF v_status = 'unchanged' THEN
                v_status := 'repaired';
            END IF;
        END IF;
        IF (SELECT tgenabled FROM pg_trigger WHERE tgrelid = tbl AND tgname = v_trigger.name) <> 'A' THEN
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', tbl, v_trigger.name);
            IF v_status = 'unchanged' THEN
                v_status := 'repaired';
            END IF;
        END IF;
    END LOOP;
    -- The functions the replaced triggers called, once no trigger calls them any more.
    FOR v_current IN SELECT DISTINCT f FROM unnest(v_replaced) AS f LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = v_current)
           AND (SELECT pronamespace FROM pg_proc WHERE oid = v_current) = 'rowsync'::regnamespace THEN
            EXECUTE format('DROP FUNCTION %s', v_current::regprocedure);
        END IF;
    END LOOP;

    -- Writes made straight into a partition fire only the partition's statement triggers. When
    -- capture is new (a copy follows), the partitions' rows need no journaling.
    PERFORM rowsync.capture_partitions(tbl, v_status NOT IN ('installed', 'repaired'));

    RETURN v_status;
END
$install$;

-- Capture keyed by the primary key (the form earlier versions and the psql line at the top use).
CREATE OR REPLACE FUNCTION rowsync.install_capture(tbl regclass) RETURNS text
LANGUAGE sql AS $$ SELECT rowsync.install_capture(tbl, NULL::name[]) $$;

-- Drops what was left of the capture of a table that no longer exists (dropped: its triggers went
-- with it): its functions, journal and rows.
CREATE OR REPLACE FUNCTION rowsync.forget_capture(journal name, tbl oid) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('DROP FUNCTION IF EXISTS rowsync.%I()', rowsync.function_base(journal, tbl) || '_capture_key');
    EXECUTE format('DROP FUNCTION IF EXISTS rowsync.%I()', rowsync.function_base(journal, tbl) || '_capture');
    EXECUTE format('DROP TABLE IF EXISTS rowsync.%I', journal);
    DELETE FROM rowsync.captured_partitions cp USING rowsync.captured_tables ct
     WHERE ct.journal_name = journal
       AND (cp.table_schema, cp.table_name) = (ct.table_schema, ct.table_name);
    DELETE FROM rowsync.captured_tables WHERE journal_name = journal;
END
$$;

-- Removes capture for one table: its triggers, trigger function and journal.
CREATE OR REPLACE FUNCTION rowsync.uninstall_capture(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_row  rowsync.captured_tables%ROWTYPE;
    v_part record;
BEGIN
    v_row := rowsync.captured(tbl);
    PERFORM rowsync.drop_statement_triggers(tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS rowsync_capture_key ON %s', tbl);
    -- The partitions' own triggers call the same function.
    FOR v_part IN
        SELECT cp.partition::regclass AS rel FROM rowsync.captured_partitions cp
          JOIN pg_class c ON c.oid = cp.partition
         WHERE cp.table_schema = v_row.table_schema AND cp.table_name = v_row.table_name
    LOOP
        PERFORM rowsync.drop_statement_triggers(v_part.rel);
    END LOOP;
    DELETE FROM rowsync.captured_partitions
     WHERE table_schema = v_row.table_schema AND table_name = v_row.table_name;
    IF v_row.journal_name IS NOT NULL THEN
        PERFORM rowsync.forget_capture(v_row.journal_name, tbl);
    END IF;
END
$$;

-- Follows migrations on captured tables in the transaction of the DDL itself, so that no write
-- sees capture out of date: after ALTER TABLE (columns renamed or retyped, the table renamed,
-- partitions attached or detached) and CREATE TABLE … PARTITION OF, adapts the table's capture
-- (adapt_capture) and captures its partitions (capture_partitions). It never makes the DDL fail
-- (a problem is a WARNING: writes are still journaled, by dynamic SQL, and the daemon adapts
-- capture when it sees the columns change).
CREATE OR REPLACE FUNCTION rowsync.follow_ddl() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_table record;
BEGIN
    FOR v_table IN
        SELECT DISTINCT ct.relid::regclass AS rel, c.relkind = 'p' AS partitioned
          FROM pg_event_trigger_ddl_commands() cmd,
               rowsync.captured_tables ct
          JOIN pg_class c ON c.oid = ct.relid
         WHERE cmd.classid = 'pg_class'::regclass
           AND (cmd.objid = ct.relid
                OR (c.relkind = 'p' AND cmd.objid IN (SELECT relid FROM pg_partition_tree(ct.relid))))
    LOOP
        BEGIN
            PERFORM rowsync.adapt_capture(v_table.rel);
            IF v_table.partitioned THEN
                PERFORM rowsync.capture_partitions(v_table.rel);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'rowsync: could not adapt the capture of %: %', v_table.rel, SQLERRM
                USING HINT = 'Writes are still captured; rowsync adapts capture at its next sweep if its role may, run rowsync setup otherwise.';
        END;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'rowsync: could not follow a migration: %', SQLERRM;
END
$$;
-- Earlier versions' event trigger, which followed partitions only.
DO $$
BEGIN
    DROP EVENT TRIGGER IF EXISTS rowsync_follow_partitions;
    DROP FUNCTION IF EXISTS rowsync.follow_partitions();
EXCEPTION WHEN insufficient_privilege OR dependent_objects_still_exist THEN
    RAISE NOTICE 'rowsync: the event trigger rowsync_follow_partitions stays (only its owner may drop it)';
END
$$;

-- Creating an event trigger needs a superuser (or, on some managed services, their admin role).
-- Without one, writes after a migration are journaled by dynamic SQL until the daemon adapts
-- capture (at its next sweep), and new partitions are captured then (their rows journaled, so
-- nothing written meanwhile is missed; it only arrives later). ENABLE ALWAYS: it fires under
-- session_replication_role = replica too.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'rowsync_follow_ddl') THEN
        CREATE EVENT TRIGGER rowsync_follow_ddl ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
            EXECUTE FUNCTION rowsync.follow_ddl();
        ALTER EVENT TRIGGER rowsync_follow_ddl ENABLE ALWAYS;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'rowsync: no event trigger (it needs a superuser): capture follows migrations and new partitions at the daemon''s next sweep';
END
$$;

-- The version of the objects this file defines. A daemon whose binary ships a newer file warns
-- that fixes to capture are not in effect until `rowsync setup` (or this file, by psql) installs
-- it again. Raised whenever the file changes what it installs; last, so that it is true only of
-- a complete installation.
CREATE OR REPLACE FUNCTION rowsync.capture_sql_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 4 $$;
GRANT EXECUTE ON FUNCTION rowsync.capture_sql_version() TO PUBLIC;
