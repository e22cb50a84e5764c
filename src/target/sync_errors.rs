//! `sync_errors` on the target: every failure rowsync records, for operators to query with SQL.
//!
//! One record per failure episode: a failure that repeats while its record is still unresolved bumps
//! that record's `retry_count` (and refreshes its message) instead of adding a row. A row failure's
//! episode is its table and key; any other failure's is its type and table. Records are marked
//! `resolved` (with `resolved_at`) as soon as the thing they describe works again.

use std::collections::HashMap;

use serde_json::{Value, json};
use tokio_postgres::GenericClient;

use crate::config::{DatabaseRole, RetrySettings};
use crate::error::policy::ErrorType;
use crate::error::{Result, SqlContext};
use crate::pipeline::apply::RowFailure;
use crate::runtime::retry::Backoff;

/// A failure to record.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub error_type: ErrorType,
    pub table: Option<String>,
    /// The row's key (see [`record_id`]); None for failures that are not about one row.
    pub record_id: Option<String>,
    pub message: String,
    pub stack_trace: String,
    pub metadata: Value,
    /// For row failures: when later sweeps should retry the row.
    pub retry_in: Option<std::time::Duration>,
}

/// An open row failure, waiting for its retry.
#[derive(Debug, Clone)]
pub(crate) struct OpenRow {
    pub record_id: String,
    pub key: Value,
    pub retry_count: u32,
    /// When the next retry is due (now or earlier when due now): counted from when the row was
    /// read, so a batch that takes it in later does not put the retry off by the wait.
    pub due: std::time::Instant,
}

/// Records a failure, as a new episode or as one more occurrence of the open one.
pub(crate) async fn record(client: &impl GenericClient, failure: &Failure) -> Result<()> {
    let role = DatabaseRole::Target;
    let error_type = failure.error_type.as_str();
    let retry_in = failure.retry_in.map(|delay| delay.as_secs_f64());
    let params: [&(dyn postgres_types::ToSql + Sync); 7] = [
        &error_type,
        &failure.table,
        &failure.record_id,
        &failure.message,
        &failure.stack_trace,
        &failure.metadata,
        &retry_in,
    ];
    let bumped = client
        .execute(
            "UPDATE sync_errors \
                SET retry_count = retry_count + 1, error_type = $1, error_message = $4, \
                    stack_trace = $5, metadata = coalesce(metadata, '{}') || $6, last_attempt_at = now(), \
                    next_retry_at = now() + pg_catalog.make_interval(secs => $7::float8) \
              WHERE NOT resolved \
                AND table_name IS NOT DISTINCT FROM $2 \
                AND record_id IS NOT DISTINCT FROM $3 \
                AND (record_id IS NOT NULL OR error_type = $1)",
            &params,
        )
        .await
        .context(role, || "updating sync_errors".into())?;
    if bumped == 0 {
        client
            .execute(
                "INSERT INTO sync_errors \
                     (error_type, table_name, record_id, error_message, stack_trace, metadata, \
                      last_attempt_at, next_retry_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, now(), \
                         now() + pg_catalog.make_interval(secs => $7::float8))",
                &params,
            )
            .await
            .context(role, || "inserting into sync_errors".into())?;
    }
    Ok(())
}

/// Records a row the target rejected (attempt `retry_count + 1`) and logs it. Returns when the
/// row's next retry is due (the configured backoff, growing with `retry_count`).
pub(crate) async fn record_rejected(
    client: &impl GenericClient,
    table: &str,
    failure: &RowFailure,
    retry_count: u32,
    retry: &RetrySettings,
) -> Result<std::time::Duration> {
    let record_id = record_id(&failure.key);
    let delay = Backoff::nth(retry, retry_count);
    let mut metadata = metadata(
        Some(table),
        failure.operation.as_str(),
        None,
        retry_count + 1,
    );
    metadata["key"] = failure.key.clone();
    if let Some(sqlstate) = &failure.sqlstate {
        metadata["sqlstate"] = Value::String(sqlstate.clone());
    }
    let record = Failure {
        error_type: failure.error_type,
        table: Some(table.to_string()),
        record_id: Some(record_id.clone()),
        message: failure.message.clone(),
        stack_trace: failure.stack_trace.clone(),
        metadata,
        retry_in: Some(delay),
    };
    self::record(client, &record).await?;
    tracing::warn!(
        table = %table,
        record_id = %record_id,
        operation = failure.operation.as_str(),
        error_type = failure.error_type.as_str(),
        attempt = retry_count + 1,
        retry_in_ms = delay.as_millis() as u64,
        "target rejected a row; recorded in sync_errors, retried by later sweeps"
    );
    Ok(delay)
}

/// Marks the open records of these rows resolved. Returns how many records it closed.
pub(crate) async fn resolve_rows(
    client: &impl GenericClient,
    table: &str,
    record_ids: &[String],
) -> Result<u64> {
    if record_ids.is_empty() {
        return Ok(0);
    }
    client
        .execute(
            "UPDATE sync_errors SET resolved = true, resolved_at = now() \
              WHERE NOT resolved AND table_name = $1 AND record_id = ANY($2)",
            &[&table, &record_ids],
        )
        .await
        .context(DatabaseRole::Target, || "resolving sync_errors".into())
}

/// Marks open records that are not about a row (connection loss, a failed batch) resolved.
pub(crate) async fn resolve_episode(
    client: &impl GenericClient,
    error_types: &[ErrorType],
    table: Option<&str>,
) -> Result<u64> {
    let types: Vec<&str> = error_types.iter().map(|t| t.as_str()).collect();
    client
        .execute(
            "UPDATE sync_errors SET resolved = true, resolved_at = now() \
              WHERE NOT resolved AND record_id IS NULL AND error_type = ANY($1) \
                AND table_name IS NOT DISTINCT FROM $2",
            &[&types, &table],
        )
        .await
        .context(DatabaseRole::Target, || "resolving sync_errors".into())
}

/// The table's rows whose apply failed and is unresolved (the latest episode of each), with what
/// their retry needs.
pub(crate) async fn unresolved_rows(
    client: &impl GenericClient,
    table: &str,
) -> Result<Vec<OpenRow>> {
    Ok(unresolved_rows_of(client, &[table])
        .await?
        .remove(table)
        .unwrap_or_default())
}

/// [`unresolved_rows`] of each of `tables`, from one query (a sweep of hundreds of tables asks
/// once); a table without any has no entry.
pub(crate) async fn unresolved_rows_of(
    client: &impl GenericClient,
    tables: &[&str],
) -> Result<HashMap<String, Vec<OpenRow>>> {
    let rows = client
        .query(
            "SELECT DISTINCT ON (table_name, record_id) table_name, record_id, metadata -> 'key', \
                    retry_count, \
                    greatest(0, extract(epoch FROM coalesce(next_retry_at, now()) - now()))::float8 \
               FROM sync_errors \
              WHERE NOT resolved AND table_name = ANY($1) AND record_id IS NOT NULL \
                AND jsonb_typeof(metadata -> 'key') = 'object' \
              ORDER BY table_name, record_id, created_at DESC",
            &[&tables],
        )
        .await
        .context(DatabaseRole::Target, || "reading unresolved sync_errors".into())?;
    let read_at = std::time::Instant::now();
    let mut open: HashMap<String, Vec<OpenRow>> = HashMap::new();
    for row in &rows {
        open.entry(row.get(0)).or_default().push(OpenRow {
            record_id: row.get(1),
            key: row.get(2),
            retry_count: row.get::<_, i32>(3).max(0) as u32,
            due: read_at + std::time::Duration::from_secs_f64(row.get::<_, f64>(4)),
        });
    }
    Ok(open)
}

/// The human form of a key for `record_id`: the bare value for a one-column key (`42`,
/// `6f1c…`), the JSON object for a composite key.
pub(crate) fn record_id(key: &Value) -> String {
    match key {
        Value::Object(fields) if fields.len() == 1 => match fields.values().next() {
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
            None => key.to_string(),
        },
        _ => key.to_string(),
    }
}

/// The full error chain, plus everything the server said about a database error.
pub(crate) fn stack_trace(error: &(dyn std::error::Error + 'static)) -> String {
    let mut trace = crate::error::report(error);
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = cause {
        if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
            trace.push_str(&format!("\nsqlstate: {}", db.code().code()));
            for (label, value) in [
                ("detail", db.detail()),
                ("hint", db.hint()),
                ("where", db.where_()),
                ("schema", db.schema()),
                ("table", db.table()),
                ("column", db.column()),
                ("constraint", db.constraint()),
            ] {
                if let Some(value) = value {
                    trace.push_str(&format!("\n{label}: {value}"));
                }
            }
        }
        cause = err.source();
    }
    trace
}

/// Metadata common to every record: table, operation, SQLSTATE and attempt.
pub(crate) fn metadata(
    table: Option<&str>,
    operation: &str,
    error: Option<&tokio_postgres::Error>,
    attempt: u32,
) -> Value {
    let mut metadata = json!({
        "table": table,
        "operation": operation,
        "attempt": attempt,
    });
    if let Some(code) = error.and_then(|e| e.code()) {
        metadata["sqlstate"] = json!(code.code());
    }
    metadata
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_id_is_the_bare_value_for_single_keys() {
        assert_eq!(record_id(&json!({"id": "6f1c"})), "6f1c");
        assert_eq!(record_id(&json!({"id": 42})), "42");
        assert_eq!(record_id(&json!({"a": 1, "b": "x"})), r#"{"a":1,"b":"x"}"#);
    }
}
