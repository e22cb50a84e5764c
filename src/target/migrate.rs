//! Target-side schema: the embedded migrations/ files, applied in order, each once.
//!
//! The same files can be applied by hand with psql; they are idempotent, so applying them again
//! (by hand or by rowsync) changes nothing. Applied versions are recorded in `rowsync_migrations`.

use crate::config::DatabaseRole;
use crate::error::{Result, SqlContext};

/// `(version, name, sql)`, in order.
pub(crate) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "001_sync_errors",
        include_str!("../../migrations/001_sync_errors.sql"),
    ),
    (
        2,
        "002_rowsync_progress",
        include_str!("../../migrations/002_rowsync_progress.sql"),
    ),
    (
        3,
        "003_sync_errors_retry",
        include_str!("../../migrations/003_sync_errors_retry.sql"),
    ),
    (
        4,
        "004_sync_runs",
        include_str!("../../migrations/004_sync_runs.sql"),
    ),
    (
        5,
        "005_sync_runs_repair",
        include_str!("../../migrations/005_sync_runs_repair.sql"),
    ),
    (
        6,
        "006_progress_mapping",
        include_str!("../../migrations/006_progress_mapping.sql"),
    ),
];

/// Applies the migrations not yet recorded, in one transaction. Returns the names applied.
pub(crate) async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<&'static str>> {
    let role = DatabaseRole::Target;
    let tx = client
        .transaction()
        .await
        .context(role, || "starting the migration transaction".into())?;
    // Two processes migrating at once would otherwise race on CREATE TABLE IF NOT EXISTS.
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('rowsync.migrate')); \
         CREATE TABLE IF NOT EXISTS rowsync_migrations ( \
             version    integer PRIMARY KEY, \
             name       text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .context(role, || "creating rowsync_migrations".into())?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM rowsync_migrations", &[])
        .await
        .context(role, || "reading rowsync_migrations".into())?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut names = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .context(role, || format!("applying migration {name}"))?;
        tx.execute(
            "INSERT INTO rowsync_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .context(role, || format!("recording migration {name}"))?;
        names.push(name);
    }
    tx.commit()
        .await
        .context(role, || "committing migrations".into())?;
    Ok(names)
}
