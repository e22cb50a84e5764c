//! `sync_runs` on the target: the history of sweeps, initial copies and repairs, for SQL queries.

use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::config::DatabaseRole;
use crate::connection::instance;
use crate::error::{Result, SqlContext};
use crate::pipeline::apply::Counts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Sweep,
    Copy,
    Repair,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Sweep => "sweep",
            Self::Copy => "copy",
            Self::Repair => "repair",
        }
    }
}

/// Records the start of a run; returns its id.
pub(crate) async fn start(
    client: &impl GenericClient,
    kind: Kind,
    table: Option<&str>,
) -> Result<i64> {
    Ok(client
        .query_one(
            "INSERT INTO sync_runs (kind, table_name, instance) VALUES ($1, $2, $3) RETURNING id",
            &[&kind.as_str(), &table, &instance()],
        )
        .await
        .context(DatabaseRole::Target, || {
            "recording a run in sync_runs".into()
        })?
        .get(0))
}

/// Records the end of run `id`: its counts, and the error if it failed.
pub(crate) async fn finish(
    client: &impl GenericClient,
    id: i64,
    counts: Counts,
    error: Option<&str>,
) -> Result<()> {
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    client
        .execute(
            "UPDATE sync_runs SET finished_at = now(), status = $2, error = $3, \
                    created = $4, updated = $5, deleted = $6, unchanged = $7, failed = $8 \
              WHERE id = $1",
            &[
                &id,
                &if error.is_some() {
                    "failed"
                } else {
                    "succeeded"
                },
                &error,
                &as_i64(counts.created),
                &as_i64(counts.updated),
                &as_i64(counts.deleted),
                &as_i64(counts.unchanged),
                &as_i64(counts.failed),
            ],
        )
        .await
        .context(DatabaseRole::Target, || {
            "completing a run in sync_runs".into()
        })?;
    Ok(())
}

/// Marks runs left `running` by a process that died as failed. Call when becoming active. A run
/// of another rowsync process whose lock session is still connected to this database is that
/// process's, going on (several processes share the tables out). (PostgreSQL cuts application
/// names to 63 bytes; host names are ASCII.)
pub(crate) async fn close_interrupted(client: &impl GenericClient) -> Result<u64> {
    client
        .execute(
            "UPDATE sync_runs r SET status = 'failed', finished_at = now(), \
                    error = 'interrupted: rowsync stopped during the run' \
              WHERE r.status = 'running' AND r.instance IS DISTINCT FROM $1 \
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a \
                                 WHERE a.datname = pg_catalog.current_database() \
                                   AND a.application_name = pg_catalog.left($2 || ' ' || r.instance, 63))",
            &[&instance(), &crate::runtime::leader::APP_LEADER],
        )
        .await
        .context(DatabaseRole::Target, || {
            "closing interrupted runs in sync_runs".into()
        })
}

/// Deletes runs older than `retention`.
pub(crate) async fn prune(client: &impl GenericClient, retention: Duration) -> Result<u64> {
    client
        .execute(
            "DELETE FROM sync_runs WHERE started_at < now() - pg_catalog.make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await
        .context(DatabaseRole::Target, || "pruning sync_runs".into())
}
