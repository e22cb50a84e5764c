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
--                     UPDATE, DELETE, TRUNCATE), with static SQL so its plans are cached, and
--                     <table>_capture_key that of a row trigger catching primary-key changes.
--                     A partitioned table's partitions get the same statement triggers
--                     (captured_partitions lists them), and its UPDATE trigger also reads the
--                     OLD rows, for rows moved between partitions.
--   * rowsync_follow_partitions, an event trigger (created only where the role may) that
--                     captures partitions as they are created, attached or detached.
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

-- The captured_tables row of a table (all NULL when it is not captured).
CREATE OR REPLACE FUNCTION rowsync.captured(tbl regclass) RETURNS rowsync.captured_tables
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT ct.*
      FROM rowsync.captured_tables ct
      JOIN pg_namespace n ON n.nspname = ct.table_schema
      JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = ct.table_name
     WHERE c.oid = tbl
$$;

-- The statement-level capture triggers of a table or partition `rel` (name, definition), calling
-- `fn`: a partitioned one's UPDATE trigger also reads the OLD rows (a row moved to another
-- partition changes its key without firing any row UPDATE trigger), and it has no TRUNCATE trigger
-- (truncating it fires its partitions').
CREATE OR REPLACE FUNCTION rowsync.statement_triggers(rel regclass, fn name)
RETURNS TABLE (name text, definition text)
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    WITH r AS (SELECT relkind = 'p' AS partitioned FROM pg_class WHERE oid = rel)
    SELECT t.name, t.definition FROM r, LATERAL (VALUES
        ('rowsync_capture_insert', format(
            'AFTER INSERT ON %s REFERENCING NEW TABLE AS rowsync_new FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn)),
        ('rowsync_capture_update', CASE WHEN r.partitioned THEN format(
            'AFTER UPDATE ON %s REFERENCING OLD TABLE AS rowsync_old NEW TABLE AS rowsync_new FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I(''moves'')',
            rel, fn) ELSE format(
            'AFTER UPDATE ON %s REFERENCING NEW TABLE AS rowsync_new FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn) END),
        ('rowsync_capture_delete', format(
            'AFTER DELETE ON %s REFERENCING OLD TABLE AS rowsync_old FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn)),
        ('rowsync_capture_truncate', format(
            'BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION rowsync.%I()',
            rel, fn))
    ) AS t(name, definition)
    WHERE NOT (r.partitioned AND t.name = 'rowsync_capture_truncate')
$$;

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
CREATE OR REPLACE FUNCTION rowsync.install_capture(tbl regclass) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $install$
DECLARE
    v_schema     name;
    v_table      name;
    v_keys       name[];
    v_key_defs   text;
    v_key_list   text;
    v_old_keys   text;
    v_new_keys   text;
    v_old        rowsync.captured_tables%ROWTYPE;
    v_key_function name;
    v_journal    name;
    v_function   name;
    v_status     text := 'unchanged';
    v_trigger    record;
    v_txid       name;
    v_current    oid;
    v_replaced   oid[] := '{}';
    v_partitioned boolean;
BEGIN
    SELECT n.nspname, c.relname, c.relkind = 'p' INTO v_schema, v_table, v_partitioned
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = tbl;

    SELECT array_agg(a.attname ORDER BY k.ord),
           -- The key as the table has it: type, modifier and collation.
           string_agg(format('%I %s%s NOT NULL', a.attname, format_type(a.atttypid, a.atttypmod),
                             CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
                                  THEN format(' COLLATE %I.%I', cn.nspname, co.collname) ELSE '' END),
                      ', ' ORDER BY k.ord),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.ord),
           string_agg(format('OLD.%I', a.attname), ', ' ORDER BY k.ord),
           string_agg(format('NEW.%I', a.attname), ', ' ORDER BY k.ord)
      INTO v_keys, v_key_defs, v_key_list, v_old_keys, v_new_keys
      FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
      JOIN pg_type ty ON ty.oid = a.atttypid
      LEFT JOIN pg_collation co ON co.oid = a.attcollation
      LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
     WHERE i.indrelid = tbl AND i.indisprimary;
    IF v_keys IS NULL THEN
        RAISE EXCEPTION 'rowsync: table %.% has no primary key', v_schema, v_table
            USING HINT = 'rowsync identifies rows by the primary key; add one to the source table.';
    END IF;

    -- Serialise concurrent installs of the same table.
    PERFORM pg_advisory_xact_lock(hashtext('rowsync.install_capture'), tbl::oid::int);

    SELECT * INTO v_old FROM rowsync.captured_tables
     WHERE table_schema = v_schema AND table_name = v_table;
    IF FOUND AND v_old.key_columns IS DISTINCT FROM v_keys THEN
        -- The primary key changed: the journal's layout no longer fits. Start capture afresh.
        PERFORM rowsync.uninstall_capture(tbl);
        v_old := NULL;
        v_status := 'repaired';
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
        INSERT INTO rowsync.captured_tables (table_schema, table_name, journal_name, key_columns)
        VALUES (v_schema, v_table, v_journal, v_keys);
        IF v_status = 'unchanged' THEN
            v_status := 'installed';
        END IF;
    END IF;
    v_function := rowsync.function_base(v_journal, tbl) || '_capture';
    v_key_function := v_function || '_key';

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

    -- Static SQL per table: plpgsql caches the plans. Every name in it is schema-qualified, so the
    -- functions need no SET search_path (which would cost a configuration save and restore on
    -- every write statement).
    --
    -- What a write costs: one INSERT of the changed keys from the statement's transition table,
    -- which also reads the doorbell in the same statement (a data-modifying CTE: one executor run,
    -- not two). UPDATE reads only the NEW transition table; the rare key change, whose old key must
    -- be journaled too, is caught by a row trigger that fires only when the key columns are
    -- assigned and actually change. TRUNCATE fires no row triggers and has no transition tables,
    -- so a BEFORE TRUNCATE trigger journals every key that is about to go.
    EXECUTE format($fn$
        CREATE OR REPLACE FUNCTION rowsync.%1$I() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        DECLARE
            v_armed boolean;
        BEGIN
            IF TG_OP = 'DELETE' THEN
                WITH j AS (INSERT INTO rowsync.%2$I (%3$s) SELECT %3$s FROM rowsync_old)
                SELECT armed INTO v_armed FROM rowsync.doorbell;
            ELSIF TG_OP = 'TRUNCATE' THEN
                -- The table itself or one of its partitions (rare: the plan is not worth caching).
                EXECUTE 'INSERT INTO rowsync.%2$I (%3$s) SELECT %3$s FROM ' || TG_RELID::regclass;
                SELECT armed INTO v_armed FROM rowsync.doorbell;
            ELSIF TG_NARGS > 0 THEN
                -- UPDATE of a partitioned table: a row moved to another partition changed its
                -- key (the partition key is part of it) without firing any row UPDATE trigger.
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
    $fn$, v_function, v_journal, v_key_list);
    EXECUTE format($fn$
        CREATE OR REPLACE FUNCTION rowsync.%1$I() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            INSERT INTO rowsync.%2$I (%3$s) VALUES (%4$s);
            IF (SELECT armed FROM rowsync.doorbell) THEN
                PERFORM rowsync.ring_doorbell();
            END IF;
            RETURN NULL;
        END
        $body$
    $fn$, v_key_function, v_journal, v_key_list, v_old_keys);

    -- Triggers of an older definition (version 1 read an OLD transition table on every UPDATE)
    -- are re-created inside this transaction: the table stays locked throughout, so no write
    -- escapes capture and nothing needs copying again.
    IF v_old.journal_name IS NOT NULL AND coalesce(v_old.capture_version, 1) < 2 THEN
        EXECUTE format('DROP TRIGGER IF EXISTS rowsync_capture_update ON %s', tbl);
        IF v_status = 'unchanged' THEN
            v_status := 'upgraded';
        END IF;
    END IF;
    -- A partitioned table's UPDATE trigger reads the OLD rows too (rows moved between
    -- partitions), and its partitions journal TRUNCATE (truncating the table fires theirs).
    -- Earlier versions gave partitioned tables the plain definition.
    IF v_partitioned THEN
        IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = tbl
                      AND tgname = 'rowsync_capture_update' AND tgoldtable IS NULL) THEN
            EXECUTE format('DROP TRIGGER rowsync_capture_update ON %s', tbl);
            IF v_status = 'unchanged' THEN
                v_status := 'upgraded';
            END IF;
        END IF;
        EXECUTE format('DROP TRIGGER IF EXISTS rowsync_capture_truncate ON %s', tbl);
    END IF;
    UPDATE rowsync.captured_tables SET capture_version = 2
     WHERE table_schema = v_schema AND table_name = v_table;

    -- Create the missing triggers; ENABLE ALWAYS so they fire under session_replication_role =
    -- replica too (pg_restore --disable-triggers and some tools switch it).
    FOR v_trigger IN
        SELECT st.name, v_function AS function, st.definition
          FROM rowsync.statement_triggers(tbl, v_function) st
        UNION ALL
        SELECT 'rowsync_capture_key', v_key_function, format(
                'AFTER UPDATE OF %s ON %s FOR EACH ROW WHEN (ROW(%s) IS DISTINCT FROM ROW(%s)) EXECUTE FUNCTION rowsync.%I()',
                v_key_list, tbl, v_old_keys, v_new_keys, v_key_function)
    LOOP
        -- A trigger calling another function (earlier versions named the functions of long
        -- table names so that two of them could be cut to the same 63 bytes) is re-created in
        -- this transaction, which keeps the table locked: no write escapes capture meanwhile.
        SELECT tg.tgfoid INTO v_current
          FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid
         WHERE tg.tgrelid = tbl AND tg.tgname = v_trigger.name
           AND (p.proname <> v_trigger.function
                OR p.pronamespace <> 'rowsync'::regnamespace);
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
        EXECUTE format('DROP FUNCTION IF EXISTS rowsync.%I()',
                       rowsync.function_base(v_row.journal_name, tbl) || '_capture_key');
        EXECUTE format('DROP FUNCTION IF EXISTS rowsync.%I()',
                       rowsync.function_base(v_row.journal_name, tbl) || '_capture');
        EXECUTE format('DROP TABLE IF EXISTS rowsync.%I', v_row.journal_name);
        DELETE FROM rowsync.captured_tables
         WHERE table_schema = v_row.table_schema AND table_name = v_row.table_name;
    END IF;
END
$$;

-- Follows partitions as they come and go, in the transaction of the DDL itself, so that no write
-- into a new partition escapes capture: after CREATE TABLE … PARTITION OF, ATTACH PARTITION and
-- DETACH PARTITION on a captured table, calls capture_partitions. It never makes the DDL fail (a
-- problem is a WARNING; the daemon checks partitions at every sweep and catches up).
CREATE OR REPLACE FUNCTION rowsync.follow_partitions() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_table regclass;
BEGIN
    FOR v_table IN
        SELECT DISTINCT c.oid::regclass
          FROM pg_event_trigger_ddl_commands() cmd,
               rowsync.captured_tables ct
          JOIN pg_namespace n ON n.nspname = ct.table_schema
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = ct.table_name
         WHERE cmd.classid = 'pg_class'::regclass AND c.relkind = 'p'
           AND (cmd.objid = c.oid OR cmd.objid IN (SELECT relid FROM pg_partition_tree(c.oid)))
    LOOP
        BEGIN
            PERFORM rowsync.capture_partitions(v_table);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'rowsync: could not capture the partitions of %: %', v_table, SQLERRM
                USING HINT = 'rowsync captures them at its next sweep if its role may; run rowsync setup otherwise.';
        END;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'rowsync: could not follow partitions: %', SQLERRM;
END
$$;

-- Creating an event trigger needs a superuser (or, on some managed services, their admin role).
-- Without one, the daemon captures new partitions at its next sweep instead (and journals their
-- rows then, so nothing written meanwhile is missed; it only arrives later).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'rowsync_follow_partitions') THEN
        CREATE EVENT TRIGGER rowsync_follow_partitions ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
            EXECUTE FUNCTION rowsync.follow_partitions();
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'rowsync: no event trigger (it needs a superuser): new partitions are captured at the next sweep';
END
$$;
