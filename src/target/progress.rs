//! Replication progress, kept in the target (`rowsync_progress`), one row per table.
//!
//! The stored value is a source `pg_snapshot` (as text): every source transaction visible in it has
//! been applied. It only ever moves inside the same target transaction as the rows it covers, and
//! only from the value the mover read under `FOR UPDATE` (compare-and-set), so a crash at any moment,
//! or a second process, can never skip or double-apply a batch.

use tokio_postgres::GenericClient;
use tokio_postgres::ToStatement;

use crate::catalog::ident::QualifiedName;
use crate::config::DatabaseRole;
use crate::error::{Result, SqlContext};
use crate::source::snapshot::PgSnapshot;

/// Creates the table's progress row if it has none (snapshot NULL: not copied yet).
pub(crate) async fn ensure_row(client: &impl GenericClient, table: &str) -> Result<()> {
    client
        .execute(
            "INSERT INTO rowsync_progress (table_name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&table],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("creating the progress row of {table}")
        })?;
    Ok(())
}

/// Moves the progress and unresolved `sync_errors` rows that an earlier version kept under the
/// table's legacy name (see [`QualifiedName::legacy_name`]) to its name, unless it already has a
/// progress row. Returns whether anything moved.
pub(crate) async fn adopt_legacy(
    client: &impl GenericClient,
    table: &QualifiedName,
) -> Result<bool> {
    let Some(legacy) = table.legacy_name() else {
        return Ok(false);
    };
    let name = table.to_string();
    let moved = client
        .query_one(
            "WITH moved AS ( \
                 UPDATE rowsync_progress SET table_name = $2 \
                  WHERE table_name = $1 \
                    AND NOT EXISTS (SELECT 1 FROM rowsync_progress WHERE table_name = $2) \
                 RETURNING 1), \
             errors AS ( \
                 UPDATE sync_errors SET table_name = $2 \
                  WHERE table_name = $1 AND NOT resolved AND EXISTS (SELECT 1 FROM moved)) \
             SELECT count(*) FROM moved",
            &[&legacy, &name],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("moving the progress of {legacy} to {name}")
        })?;
    let moved = moved.get::<_, i64>(0) > 0;
    if moved {
        tracing::info!(table = %name, earlier = %legacy, "moved the table's progress from the name an earlier version gave it");
    }
    Ok(moved)
}

/// Waits until no copy of `table` holds its progress row (a copy holds it locked from its
/// snapshot to its commit), however long that copy takes; a batch holds it only for a moment.
pub(crate) async fn wait_for_copy(client: &mut tokio_postgres::Client, table: &str) -> Result<()> {
    let action = || format!("waiting for a copy of {table} in progress");
    let tx = client
        .transaction()
        .await
        .context(DatabaseRole::Target, action)?;
    tx.batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
        .await
        .context(DatabaseRole::Target, action)?;
    tx.query_opt(
        "SELECT 1 FROM rowsync_progress WHERE table_name = $1 FOR KEY SHARE",
        &[&table],
    )
    .await
    .context(DatabaseRole::Target, action)?;
    tx.commit().await.context(DatabaseRole::Target, action)?;
    Ok(())
}

/// The applied snapshot, or None when the table was never copied (no row, or NULL).
pub(crate) async fn load(client: &impl GenericClient, table: &str) -> Result<Option<PgSnapshot>> {
    let row = client
        .query_opt(
            "SELECT snapshot FROM rowsync_progress WHERE table_name = $1",
            &[&table],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("reading the progress of {table}")
        })?;
    Ok(row.and_then(|row| row.get(0)))
}

/// The applied snapshots of the mappings of source `$2` other than `$1` (named `source` or
/// `source → target`), `$3` for one not copied yet: see [`others`].
macro_rules! others_sql {
    () => {
        "ARRAY(SELECT coalesce(o.snapshot, $3) FROM rowsync_progress o \
                WHERE o.table_name <> $1 \
                  AND (o.table_name = $2 OR pg_catalog.starts_with(o.table_name, $2 || ' → ')))"
    };
}

/// `$1` table, `$2` its source table's name: the snapshot, locked until the transaction ends, and
/// the [`others`]. (Public so the hot path can prepare it once per session and pass the statement
/// to [`lock_with`].)
pub(crate) const LOCK: &str = concat!(
    "SELECT p.snapshot, ",
    others_sql!(),
    " FROM rowsync_progress p WHERE p.table_name = $1 FOR UPDATE OF p"
);

/// What stands for a consumer that has not copied its table yet: a snapshot in which no
/// transaction is visible, so nothing it still needs is deleted.
const NOTHING_YET: &str = "1:1:";

/// The applied snapshots of the other mappings of the same source table (`source`; named
/// `source` or `source → target`), which read the same journal: its rows may go only once every
/// one of them has applied them. A mapping not copied yet counts as having applied nothing.
pub(crate) async fn others(
    client: &impl GenericClient,
    table: &str,
    source: &str,
) -> Result<Vec<String>> {
    let row = client
        .query_one(
            concat!("SELECT ", others_sql!()),
            &[&table, &source, &NOTHING_YET],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("reading the progress of the other mappings of {source}")
        })?;
    Ok(row.get(0))
}

/// `$1` table, `$2` snapshot, `$3` whether this is a (re)copy. (See [`advance_with`].)
pub(crate) const ADVANCE: &str = "UPDATE rowsync_progress \
        SET snapshot = $2, updated_at = now(), \
            copied_at = CASE WHEN $3 THEN now() ELSE copied_at END \
      WHERE table_name = $1";

/// A locked progress row: the snapshot, and the [`others`] of its source.
#[derive(Debug, Default)]
pub(crate) struct Locked {
    pub snapshot: Option<PgSnapshot>,
    pub others: Vec<String>,
}

/// Like [`load`], but locks the row until the transaction ends: nobody else moves it meanwhile.
pub(crate) async fn lock(client: &impl GenericClient, table: &str, source: &str) -> Result<Locked> {
    lock_with(client, LOCK, table, source).await
}

/// [`lock`] with `statement`: [`LOCK`] as text or prepared.
pub(crate) async fn lock_with<S>(
    client: &impl GenericClient,
    statement: &S,
    table: &str,
    source: &str,
) -> Result<Locked>
where
    S: ?Sized + ToStatement + Sync + Send,
{
    let row = client
        .query_opt(statement, &[&table, &source, &NOTHING_YET])
        .await
        .context(DatabaseRole::Target, || {
            format!("locking the progress of {table}")
        })?;
    Ok(row
        .map(|row| Locked {
            snapshot: row.get(0),
            others: row.get(1),
        })
        .unwrap_or_default())
}

/// Records `snapshot` as applied. Call only in the transaction that applied it, after [`lock`].
pub(crate) async fn advance(
    client: &impl GenericClient,
    table: &str,
    snapshot: &PgSnapshot,
    copied: bool,
) -> Result<()> {
    advance_with(client, ADVANCE, table, snapshot, copied).await
}

/// [`advance`] with `statement`: [`ADVANCE`] as text or prepared.
pub(crate) async fn advance_with<S>(
    client: &impl GenericClient,
    statement: &S,
    table: &str,
    snapshot: &PgSnapshot,
    copied: bool,
) -> Result<()>
where
    S: ?Sized + ToStatement + Sync + Send,
{
    client
        .execute(statement, &[&table, &snapshot, &copied])
        .await
        .context(DatabaseRole::Target, || {
            format!("recording the progress of {table}")
        })?;
    Ok(())
}

/// The mapping the table was copied with or last re-read for (see [`TableSpec::definition`]),
/// None for a same-named table, or when the row is missing.
///
/// [`TableSpec::definition`]: crate::config::TableSpec::definition
pub(crate) async fn mapping(client: &impl GenericClient, table: &str) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT mapping FROM rowsync_progress WHERE table_name = $1",
            &[&table],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("reading the mapping of {table}")
        })?;
    Ok(row.and_then(|row| row.get(0)))
}

/// Records the mapping the table's rows now follow.
pub(crate) async fn set_mapping(
    client: &impl GenericClient,
    table: &str,
    mapping: Option<&str>,
) -> Result<()> {
    client
        .execute(
            "UPDATE rowsync_progress SET mapping = $2 WHERE table_name = $1",
            &[&table, &mapping],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("recording the mapping of {table}")
        })?;
    Ok(())
}
