//! Connections to the two servers and the one polling loop every wait goes through.

use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use crate::error::{Context, Error, Result};

/// A plain connection, its driver running on the runtime.
pub(crate) async fn connect(url: &str, label: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to the {label} server"))?;
    tokio::spawn(async move {
        // Errors surface on the client's next call.
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs a query that returns one `bigint`.
pub(crate) async fn int(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<i64> {
    let row = client
        .query_one(sql, params)
        .await
        .with_context(|| format!("running {sql}"))?;
    row.try_get(0).with_context(|| format!("reading {sql}"))
}

/// Runs statements (simple protocol, one implicit transaction when there are several).
pub(crate) async fn exec(client: &Client, sql: &str) -> Result<()> {
    client
        .batch_execute(sql)
        .await
        .with_context(|| format!("running {}", first_line(sql)))
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default()
}

/// Calls `probe` every `every` until it returns `Some`, at most `timeout`; the error names `what`.
pub(crate) async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::msg(format!(
                "timed out after {} s waiting for {what}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(every).await;
    }
}

/// A string as an SQL literal.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
