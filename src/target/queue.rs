//! The operator's side of `sync_errors` and `sync_runs`: what `rowsync errors` and the dashboard
//! list, and their two actions on unresolved rows, retry now and resolve by hand.
//!
//! A retry sets `next_retry_at` to now; a resolve marks the row resolved with the operator's note
//! in `metadata.resolution`. The daemon reads the unresolved rows again at every sweep, so the
//! next sweep retries what was asked and stops retrying what was resolved.

use serde::Serialize;
use serde_json::json;
use tokio_postgres::GenericClient;

use crate::config::DatabaseRole;
use crate::error::{Result, SqlContext};
use crate::ops::telemetry::rfc3339;

/// An unresolved `sync_errors` row, as operators see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OpenError {
    pub id: i64,
    pub table: Option<String>,
    pub error_type: String,
    pub record_id: Option<String>,
    pub message: String,
    pub retry_count: i32,
    pub created_at: String,
    pub last_attempt_at: Option<String>,
    pub next_retry_at: Option<String>,
}

/// Which unresolved rows: of a table (as rowsync names it, `public.users`, or without its schema),
/// of an error type, at most `limit` (newest first).
#[derive(Debug, Clone, Default)]
pub(crate) struct ErrorFilter {
    pub table: Option<String>,
    pub error_type: Option<String>,
    pub limit: i64,
}

/// The unresolved rows that `filter` selects, newest first.
pub(crate) async fn unresolved(
    client: &impl GenericClient,
    filter: &ErrorFilter,
) -> Result<Vec<OpenError>> {
    let rows = client
        .query(
            "SELECT id, table_name, error_type, record_id, error_message, retry_count, created_at, \
                    last_attempt_at, next_retry_at \
               FROM sync_errors \
              WHERE NOT resolved \
                AND ($1::text IS NULL OR table_name = $1 OR right(table_name, length($1) + 1) = '.' || $1) \
                AND ($2::text IS NULL OR error_type = upper($2)) \
              ORDER BY created_at DESC, id DESC \
              LIMIT $3",
            &[&filter.table, &filter.error_type, &filter.limit],
        )
        .await
        .context(DatabaseRole::Target, || {
            "reading unresolved sync_errors".into()
        })?;
    let time = |t: Option<std::time::SystemTime>| t.map(rfc3339);
    Ok(rows
        .iter()
        .map(|row| OpenError {
            id: row.get(0),
            table: row.get(1),
            error_type: row.get(2),
            record_id: row.get(3),
            message: row.get(4),
            retry_count: row.get(5),
            created_at: rfc3339(row.get(6)),
            last_attempt_at: time(row.get(7)),
            next_retry_at: time(row.get(8)),
        })
        .collect())
}

/// Which rows an action is for.
#[derive(Debug, Clone)]
pub(crate) enum Selection {
    /// These ids.
    Ids(Vec<i64>),
    /// Every unresolved row (of one table, if given).
    All { table: Option<String> },
}

impl Selection {
    /// The ids named that are not in `done` (resolved already, or no such id).
    pub(crate) fn missing(&self, done: &[i64]) -> Vec<i64> {
        match self {
            Self::Ids(ids) => ids
                .iter()
                .filter(|id| !done.contains(id))
                .copied()
                .collect(),
            Self::All { .. } => Vec::new(),
        }
    }

    fn params(&self) -> (Option<Vec<i64>>, Option<String>) {
        match self {
            Self::Ids(ids) => (Some(ids.clone()), None),
            Self::All { table } => (None, table.clone()),
        }
    }
}

/// Makes the next sweep retry the selected unresolved rows. Returns the ids it applies to.
pub(crate) async fn retry_now(client: &impl GenericClient, rows: &Selection) -> Result<Vec<i64>> {
    let (ids, table) = rows.params();
    let done = client
        .query(
            "UPDATE sync_errors \
                SET next_retry_at = now(), \
                    metadata = coalesce(metadata, '{}') || \
                               jsonb_build_object('retry_requested_at', now()) \
              WHERE NOT resolved \
                AND ($1::int8[] IS NULL OR id = ANY ($1)) \
                AND ($2::text IS NULL OR table_name = $2 OR right(table_name, length($2) + 1) = '.' || $2) \
              RETURNING id",
            &[&ids, &table],
        )
        .await
        .context(DatabaseRole::Target, || {
            "asking for retries in sync_errors".into()
        })?;
    Ok(done.iter().map(|row| row.get(0)).collect())
}

/// Marks the selected unresolved rows resolved by hand, with `note` (and who did it: `by`) in
/// `metadata.resolution`. Returns the ids it applies to.
pub(crate) async fn resolve_by_hand(
    client: &impl GenericClient,
    rows: &Selection,
    note: &str,
    by: &str,
) -> Result<Vec<i64>> {
    let (ids, table) = rows.params();
    let resolution = json!({ "note": note, "by": by });
    let done = client
        .query(
            "UPDATE sync_errors \
                SET resolved = true, resolved_at = now(), \
                    metadata = coalesce(metadata, '{}') || \
                               jsonb_build_object('resolution', $3::jsonb || \
                                                  jsonb_build_object('at', now())) \
              WHERE NOT resolved \
                AND ($1::int8[] IS NULL OR id = ANY ($1)) \
                AND ($2::text IS NULL OR table_name = $2 OR right(table_name, length($2) + 1) = '.' || $2) \
              RETURNING id",
            &[&ids, &table, &resolution],
        )
        .await
        .context(DatabaseRole::Target, || "resolving sync_errors".into())?;
    Ok(done.iter().map(|row| row.get(0)).collect())
}

/// A `sync_runs` row, as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RunRow {
    pub kind: String,
    pub table: Option<String>,
    pub status: String,
    pub started_at: String,
    pub duration_seconds: Option<f64>,
    pub created: i64,
    pub updated: i64,
    pub deleted: i64,
    pub failed: i64,
    pub error: Option<String>,
}

/// The newest `limit` runs.
pub(crate) async fn last_runs(client: &impl GenericClient, limit: i64) -> Result<Vec<RunRow>> {
    let rows = client
        .query(
            "SELECT kind, table_name, status, started_at, \
                    extract(epoch FROM finished_at - started_at)::float8, \
                    created, updated, deleted, failed, error \
               FROM sync_runs ORDER BY started_at DESC, id DESC LIMIT $1",
            &[&limit],
        )
        .await
        .context(DatabaseRole::Target, || "reading sync_runs".into())?;
    Ok(rows
        .iter()
        .map(|row| RunRow {
            kind: row.get(0),
            table: row.get(1),
            status: row.get(2),
            started_at: rfc3339(row.get(3)),
            duration_seconds: row.get(4),
            created: row.get(5),
            updated: row.get(6),
            deleted: row.get(7),
            failed: row.get(8),
            error: row.get(9),
        })
        .collect())
}
