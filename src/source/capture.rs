//! What rowsync keeps in the source: capture triggers, journals, the doorbell, and the listener.
//!
//! The objects themselves are defined in `sql/capture.sql` (embedded here, installable by hand with
//! psql), so there is one definition whichever way they are installed.

use deadpool_postgres::Object;
use tokio_postgres::GenericClient;

use crate::catalog::ident::{QualifiedName, TableRef};
use crate::catalog::mapping::Journal;
use crate::config::DatabaseRole;
use crate::error::{Error, Result, SqlContext};
use crate::source::snapshot::PgSnapshot;

/// sql/capture.sql, as shipped.
pub(crate) const CAPTURE_SQL: &str = include_str!("../../sql/capture.sql");

/// The version of the objects sql/capture.sql installs (`rowsync.capture_sql_version()`, the
/// file's last statement). Raise both with every change to what the file installs: the test
/// `capture_sql_version_follows_the_file` fails until they are.
pub(crate) const CAPTURE_SQL_VERSION: i32 = 4;

/// The NOTIFY channel the doorbell rings on (case-sensitive, hence always quoted).
pub(crate) const CHANNEL: &str = "rowsync";

/// What `install_capture` did to a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstallStatus {
    /// Capture was created now.
    Installed,
    /// Something was missing or disabled and has been put back; changes made meanwhile were not
    /// journaled, so the table needs a fresh copy.
    Repaired,
    /// Triggers of an older rowsync were replaced in one transaction: no write escaped capture.
    Upgraded,
    /// Everything was already in place.
    Unchanged,
}

/// Creates or updates the shared capture objects (schema, doorbell, functions). Idempotent.
/// One at a time (the file runs as one transaction, under a lock): setups running side by side
/// (a reload adding several tables, two processes) would otherwise replace the same functions
/// at once and fail with "tuple concurrently updated".
pub(crate) async fn install_objects(client: &impl GenericClient) -> Result<()> {
    client
        .batch_execute(&format!(
            "SELECT pg_advisory_xact_lock(hashtext('rowsync.capture'));\n{CAPTURE_SQL}"
        ))
        .await
        .context(DatabaseRole::Source, || "installing sql/capture.sql".into())
}

/// Installs (or repairs) capture on one table, journaling the columns of `key` (those of a
/// unique index whose columns are NOT NULL) or, when None, of the primary key.
pub(crate) async fn install_table(
    client: &impl GenericClient,
    table: &QualifiedName,
    key: Option<&[String]>,
) -> Result<InstallStatus> {
    let key: Option<Vec<&str>> = key.map(|k| k.iter().map(String::as_str).collect());
    let status: String = client
        .query_one(
            "SELECT rowsync.install_capture($1::text::regclass, $2::text[]::name[])",
            &[&table.quoted(), &key],
        )
        .await
        .context(DatabaseRole::Source, || {
            format!("installing capture on {table}")
        })?
        .get(0);
    Ok(match status.as_str() {
        "installed" => InstallStatus::Installed,
        "repaired" => InstallStatus::Repaired,
        "upgraded" => InstallStatus::Upgraded,
        _ => InstallStatus::Unchanged,
    })
}

/// Adapts a table's capture to what migrations did to it (`rowsync.adapt_capture`: renamed or
/// retyped key columns, a renamed table). Returns what it did, one line per change. A table that
/// is not there (renamed away, for one) has nothing to adapt.
pub(crate) async fn adapt(client: &mut Object, table: &TableRef) -> Result<Vec<String>> {
    call_briefly(client, "adapt_capture", &table.quoted(), || {
        format!("adapting the capture of {table}")
    })
    .await
}

/// Gives a table's partitions their capture triggers and lets go of detached ones
/// (`rowsync.capture_partitions`). Returns what it did, one line per partition.
pub(crate) async fn capture_partitions(
    client: &mut Object,
    table: &QualifiedName,
) -> Result<Vec<String>> {
    call_briefly(client, "capture_partitions", &table.quoted(), || {
        format!("capturing the partitions of {table}")
    })
    .await
}

/// Calls `rowsync.<function>(table) RETURNS text[]` in a transaction of its own that waits for no
/// writer: with a table locked for longer than 200 ms it gives up (the caller tries again later).
async fn call_briefly(
    client: &mut Object,
    function: &str,
    table: &str,
    action: impl Fn() -> String,
) -> Result<Vec<String>> {
    let tx = client
        .transaction()
        .await
        .context(DatabaseRole::Source, &action)?;
    tx.batch_execute("SET LOCAL lock_timeout = '200ms'")
        .await
        .context(DatabaseRole::Source, || "limiting the lock wait".into())?;
    let done: Option<Vec<String>> = tx
        .query_opt(
            &format!(
                "SELECT rowsync.{function}(c) FROM pg_catalog.to_regclass($1) AS c WHERE c IS NOT NULL"
            ),
            &[&table],
        )
        .await
        .context(DatabaseRole::Source, &action)?
        .map(|row| row.get(0));
    tx.commit().await.context(DatabaseRole::Source, &action)?;
    Ok(done.unwrap_or_default())
}

/// Removes capture from one table (`rowsync.uninstall_capture`). False when it had none (or is
/// not there).
pub(crate) async fn uninstall_table(client: &impl GenericClient, table: &TableRef) -> Result<bool> {
    let row = client
        .query_opt(
            "SELECT rowsync.uninstall_capture(c) FROM pg_catalog.to_regclass($1) AS c \
              WHERE c IS NOT NULL AND pg_catalog.to_regclass('rowsync.captured_tables') IS NOT NULL \
                AND (rowsync.captured(c)).journal_name IS NOT NULL",
            &[&table.quoted()],
        )
        .await
        .context(DatabaseRole::Source, || {
            format!("removing capture from {table}")
        })?;
    Ok(row.is_some())
}

/// Arms the doorbell: the next source write will NOTIFY. Returns false when a writer is ringing it
/// at this moment (a notification is on its way).
pub(crate) async fn arm_doorbell(client: &impl GenericClient) -> Result<bool> {
    Ok(client
        .query_one("SELECT rowsync.arm_doorbell()", &[])
        .await
        .context(DatabaseRole::Source, || "arming the doorbell".into())?
        .get(0))
}

/// The capture triggers `rowsync.install_capture` creates on every captured table.
const CAPTURE_TRIGGERS: [&str; 4] = [
    "rowsync_capture_insert",
    "rowsync_capture_update",
    "rowsync_capture_delete",
    "rowsync_capture_truncate",
];

/// The relations a table's capture covers: the table given by the SQL expression `table` (a
/// regclass) and its partitions at every level (a write straight into a partition fires only the
/// partition's statement triggers).
fn captured_relations(table: &str) -> String {
    format!(
        "SELECT c.oid, c.relkind FROM pg_catalog.pg_class c WHERE c.oid = {table} \
         UNION \
         SELECT c.oid, c.relkind FROM pg_catalog.pg_partition_tree({table}) AS p \
           JOIN pg_catalog.pg_class c ON c.oid = p.relid \
          WHERE c.relkind IN ('r', 'p')"
    )
}

/// Of the relations `rels` (oid, relkind), each with each capture trigger name (`$2`, given
/// [`CAPTURE_TRIGGERS`]) it needs: all but TRUNCATE on partitioned ones (truncating them fires
/// their partitions' triggers).
fn wanted_triggers(rels: &str) -> String {
    format!(
        "SELECT r.oid, t.name FROM ({rels}) AS r, unnest($2::text[]) AS t(name) \
          WHERE NOT (r.relkind = 'p' AND t.name = 'rowsync_capture_truncate')"
    )
}

/// Capture triggers of a table (and its partitions) that are missing or not `ENABLE ALWAYS` (a
/// restore or an ALTER TABLE … DISABLE TRIGGER can silently switch them off).
pub(crate) async fn trigger_problems(
    client: &impl GenericClient,
    table: &QualifiedName,
) -> Result<Vec<String>> {
    let rows = client
        .query(
            &format!(
                "WITH wanted AS ({}) \
                 SELECT w.name, tg.tgenabled::text, \
                        CASE WHEN w.oid <> $1::text::regclass THEN w.oid::regclass::text END \
                   FROM wanted w \
                   LEFT JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = w.oid AND tg.tgname = w.name \
                  ORDER BY w.oid, w.name",
                wanted_triggers(&captured_relations("$1::text::regclass"))
            ),
            &[&table.quoted(), &&CAPTURE_TRIGGERS[..]],
        )
        .await
        .context(DatabaseRole::Source, || {
            format!("checking the triggers of {table}")
        })?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let name: String = row.get(0);
            let problem = match row.get::<_, Option<String>>(1).as_deref() {
                Some("A") => return None,
                Some(_) => format!("{name} is not ENABLE ALWAYS"),
                None => format!("{name} is missing"),
            };
            Some(match row.get::<_, Option<String>>(2) {
                Some(partition) => format!("partition {partition}: {problem}"),
                None => problem,
            })
        })
        .collect())
}

/// The state of a table's capture, for noticing when it may have been bypassed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CaptureState {
    /// Each capture trigger's name, catalog row version and enabled state. Any `ALTER TABLE …
    /// DISABLE/ENABLE TRIGGER`, drop or re-creation writes a new catalog row, so a changed
    /// fingerprint means capture may have been off in between, even if it is on again now.
    pub fingerprint: String,
    /// All of [`CAPTURE_TRIGGERS`] exist and are `ENABLE ALWAYS`.
    pub intact: bool,
    /// The table is a logical-replication subscriber: its apply worker fires no statement
    /// triggers, so only a look-back can see what it writes.
    pub subscriber: bool,
    /// The table is partitioned: its partitions need triggers of their own.
    pub partitioned: bool,
    /// Since when, and why, writes to the table could not be journaled (a migration capture could
    /// not follow, see `rowsync.capture_lost`); None while capture holds.
    pub lost: Option<String>,
}

pub(crate) async fn capture_state(
    client: &impl GenericClient,
    table: &QualifiedName,
) -> Result<CaptureState> {
    capture_states(client, &[table])
        .await?
        .pop()
        .flatten()
        .ok_or_else(|| Error::Schema {
            table: table.to_string(),
            problem: "the table does not exist on the source".into(),
        })
}

/// The capture state of each of `tables`, in their order, from one query (a sweep of hundreds
/// of tables asks once); None for a table that does not exist (its own batch reports that).
pub(crate) async fn capture_states(
    client: &impl GenericClient,
    tables: &[&QualifiedName],
) -> Result<Vec<Option<CaptureState>>> {
    let quoted: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rels = captured_relations("s.oid");
    let wanted = wanted_triggers(&rels);
    let rows = client
        .query(
            &format!(
                "SELECT s.oid IS NOT NULL, \
                        (SELECT coalesce(string_agg(tgname || ':' || xmin::text || ':' || tgenabled::text, ',' \
                                                    ORDER BY tgrelid, tgname), '') \
                           FROM pg_catalog.pg_trigger \
                          WHERE tgrelid IN (SELECT oid FROM ({rels}) AS r) \
                            AND tgname LIKE 'rowsync\\_capture\\_%'), \
                        NOT EXISTS (SELECT 1 FROM ({wanted}) AS w \
                                     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger tg \
                                                        WHERE tg.tgrelid = w.oid AND tg.tgname = w.name \
                                                          AND tg.tgenabled = 'A')), \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_subscription_rel WHERE srrelid = s.oid), \
                        (SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = s.oid), \
                        (SELECT pg_catalog.format('since %s: %s', j ->> 'lost_at', j ->> 'lost_reason') \
                           FROM rowsync.captured_tables ct, pg_catalog.to_jsonb(ct) AS j \
                          WHERE ct.table_schema = s.schema AND ct.table_name = s.name \
                            AND j ->> 'lost_at' IS NOT NULL) \
                   FROM (SELECT pg_catalog.to_regclass(u.quoted)::oid AS oid, u.schema, u.name, u.n \
                           FROM unnest($1::text[], $3::text[], $4::text[]) \
                                WITH ORDINALITY AS u(quoted, schema, name, n)) AS s \
                  ORDER BY s.n"
            ),
            &[&quoted, &&CAPTURE_TRIGGERS[..], &schemas, &names],
        )
        .await
        .context(DatabaseRole::Source, || {
            format!("checking the capture of {} tables", tables.len())
        })?;
    Ok(rows
        .iter()
        .map(|row| {
            row.get::<_, bool>(0).then(|| CaptureState {
                fingerprint: row.get(1),
                intact: row.get(2),
                subscriber: row.get(3),
                partitioned: row.get(4),
                lost: row.get(5),
            })
        })
        .collect())
}

/// Journal rows not yet consumed (all of them; consumed rows are deleted right after their batch).
pub(crate) async fn journal_depth(client: &impl GenericClient, journal: &Journal) -> Result<i64> {
    Ok(journal_rows(client, journal, None, &[]).await?.rows)
}

/// What a journal holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JournalRows {
    /// All its rows.
    pub rows: i64,
    /// Rows no batch will consume: of transactions already applied (`applied`: their cleanup
    /// failed), or with a transaction id no transaction has had yet (written by hand: such a
    /// row would never become visible). Batches delete both, so they should not stay.
    pub stuck: i64,
}

/// Counts the rows of `journal`; with `applied`, the snapshot applied so far, the stuck ones too.
/// `others`: the applied snapshots of the other mappings of the source (a row they still need is
/// not stuck).
pub(crate) async fn journal_rows(
    client: &impl GenericClient,
    journal: &Journal,
    applied: Option<&PgSnapshot>,
    others: &[String],
) -> Result<JournalRows> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), \
                        count(*) FILTER (WHERE {txid} >= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) \
                            OR ({txid} < pg_catalog.pg_snapshot_xmax($1::text::pg_snapshot) \
                                AND pg_catalog.pg_visible_in_snapshot({txid}, $1::text::pg_snapshot) \
                                AND {others})) \
                   FROM {journal}",
                txid = journal.txid(),
                others = crate::pipeline::changes::applied_by_others(&journal.txid(), "$2"),
                journal = journal.quoted(),
            ),
            &[&applied, &others],
        )
        .await
        .context(DatabaseRole::Source, || format!("counting {journal}"))?;
    Ok(JournalRows {
        rows: row.get(0),
        stuck: row.get(1),
    })
}

/// Which version of sql/capture.sql the source has: None without capture objects at all (not set
/// up), Some(0) for objects an earlier rowsync installed before the version was recorded.
pub(crate) async fn installed_version(client: &impl GenericClient) -> Result<Option<i32>> {
    let action = || "reading the version of the capture objects".to_string();
    let row = client
        .query_one(
            "SELECT pg_catalog.to_regnamespace('rowsync') IS NOT NULL, \
                    pg_catalog.to_regprocedure('rowsync.capture_sql_version()') IS NOT NULL",
            &[],
        )
        .await
        .context(DatabaseRole::Source, action)?;
    let (schema, function): (bool, bool) = (row.get(0), row.get(1));
    if !schema {
        return Ok(None);
    }
    if !function {
        return Ok(Some(0));
    }
    Ok(Some(
        client
            .query_one("SELECT rowsync.capture_sql_version()", &[])
            .await
            .context(DatabaseRole::Source, action)?
            .get(0),
    ))
}

/// What an operator should hear about the source's capture objects: that they are not this
/// binary's ([`version_problem`]), or that which they are cannot be read. None when they are.
pub(crate) async fn version_warning(client: &impl GenericClient) -> Option<String> {
    match installed_version(client).await {
        Ok(installed) => version_problem(installed),
        Err(err) => Some(format!(
            "could not tell whether the capture objects on the source are this rowsync's: {}",
            crate::error::chain(&err)
        )),
    }
}

/// What an operator should hear about the capture objects of version `installed` (see
/// [`installed_version`]); None when they are this binary's.
pub(crate) fn version_problem(installed: Option<i32>) -> Option<String> {
    match installed? {
        v if v == CAPTURE_SQL_VERSION => None,
        v if v < CAPTURE_SQL_VERSION => Some(format!(
            "the capture objects on the source are from an older rowsync (version {v}, this \
             rowsync ships {CAPTURE_SQL_VERSION}): its fixes to capture are not in effect until \
             `rowsync setup` runs again (as the role that installed them)"
        )),
        v => Some(format!(
            "the capture objects on the source are from a newer rowsync (version {v}, this \
             rowsync ships {CAPTURE_SQL_VERSION}): run the newer rowsync, or `rowsync setup` of \
             this one to go back to its capture"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a over the file's lines that are not comments: a changed comment needs no new
    /// version, a changed statement does.
    fn statements_fingerprint(sql: &str) -> u64 {
        sql.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("--"))
            .flat_map(|line| line.bytes().chain([b'\n']))
            .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            })
    }

    #[test]
    fn capture_sql_version_follows_the_file() {
        assert!(
            CAPTURE_SQL.contains(&format!(
                "rowsync.capture_sql_version() RETURNS integer\nLANGUAGE sql IMMUTABLE AS $$ SELECT {CAPTURE_SQL_VERSION} $$;"
            )),
            "sql/capture.sql must define rowsync.capture_sql_version() as {CAPTURE_SQL_VERSION}"
        );
        // The statements of version 4. When this fails, sql/capture.sql changed what it
        // installs: raise CAPTURE_SQL_VERSION and the number in the file, then record the new
        // fingerprint here.
        const FINGERPRINT: u64 = 5_906_364_290_724_441_386;
        assert_eq!(
            statements_fingerprint(CAPTURE_SQL),
            FINGERPRINT,
            "sql/capture.sql changed: raise CAPTURE_SQL_VERSION (and the file's), then record this fingerprint"
        );
    }

    #[test]
    fn an_older_or_newer_installation_is_a_problem_and_none_is_not() {
        assert_eq!(version_problem(None), None);
        assert_eq!(version_problem(Some(CAPTURE_SQL_VERSION)), None);
        assert!(
            version_problem(Some(0))
                .unwrap()
                .contains("older rowsync (version 0")
        );
        assert!(
            version_problem(Some(CAPTURE_SQL_VERSION + 1))
                .unwrap()
                .contains("newer rowsync")
        );
    }
}
