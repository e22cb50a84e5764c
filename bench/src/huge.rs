//! Measurement: one huge transaction. A single UPDATE of [`rows`] rows (400,000 at the default
//! size, 40% of the table) is committed on the source; how long it takes to reach the target,
//! after the commit, against the source's own time for the statement, for rowsync and for native
//! logical replication applying the same statement on its own copy of the table.
//!
//! rowsync: the daemon runs, caught up; reached when its journal is empty (rows are deleted right
//! after the target commit that applied them). Native: a subscription streams `users_lr`; reached
//! when the slot's `confirmed_flush_lsn` passes the commit (the subscriber confirms what it has
//! applied). Both are checked on the source, so the polls do not compete with the apply on the
//! target; the target's rows are counted once afterwards.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::fixture::{Fixture, NATIVE, USERS};
use crate::{db, lag, native};

const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Serialize)]
pub(crate) struct HugeFigures {
    pub rows: i64,
    /// The source executing and committing the UPDATE (capture installed).
    pub rowsync_source_s: f64,
    /// Commit to the target having applied it.
    pub rowsync_apply_s: f64,
    pub rowsync_ratio_to_source: f64,
    /// The daemon's peak RSS while it applied the transaction.
    pub rowsync_peak_rss_mib: f64,
    pub rowsync_target_rows: i64,
    /// The source executing and committing the same UPDATE on the published table.
    pub native_source_s: f64,
    pub native_apply_s: f64,
    pub native_ratio_to_source: f64,
    pub native_target_rows: i64,
}

/// 40% of the table, at most 400,000 rows.
fn rows(table_rows: u64) -> i64 {
    (table_rows * 2 / 5).min(400_000) as i64
}

fn update(table: &str, marker: &str, rows: i64) -> String {
    format!(
        "UPDATE {table} SET status = '{marker}', updated_at = now() \
          WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT {rows})"
    )
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<HugeFigures> {
    let rows = rows(fx.rows);
    let marker = "huge";

    fx.say(&format!(
        "huge transaction, rowsync: one UPDATE of {rows} rows"
    ));
    fx.wait_caught_up(Duration::from_secs(600)).await?;
    fx.checkpoint().await?;
    let pid = fx
        .daemon
        .as_ref()
        .map(|daemon| daemon.pid())
        .ok_or_else(|| Error::msg("the huge-transaction measurement needs a running daemon"))?;
    // "5" resets the peak RSS (VmHWM) to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .context("resetting the daemon's peak RSS (/proc/<pid>/clear_refs)")?;
    let started = Instant::now();
    db::exec(&fx.source, &update(USERS, marker, rows)).await?;
    let committed = Instant::now();
    fx.wait_caught_up(Duration::from_secs(1800)).await?;
    let rowsync_apply_s = committed.elapsed().as_secs_f64();
    let rowsync_source_s = committed.duration_since(started).as_secs_f64();
    let rowsync_peak_rss_mib = lag::status_kib(pid, "VmHWM")? as f64 / 1024.0;
    let rowsync_target_rows = db::int(
        &fx.target,
        &format!("SELECT count(*) FROM {USERS} WHERE status = '{marker}'"),
        &[],
    )
    .await?;
    fx.say(&format!(
        "huge transaction, rowsync: the source took {rowsync_source_s:.2} s, the target had it \
         {rowsync_apply_s:.2} s after the commit ({rowsync_target_rows} rows), peak RSS \
         {rowsync_peak_rss_mib:.1} MiB"
    ));

    fx.say("huge transaction, native: subscribing");
    fx.checkpoint().await?;
    native::subscribe(fx, false).await?;
    native::wait_streaming(fx).await?;
    let started = Instant::now();
    db::exec(&fx.source, &update(NATIVE, marker, rows)).await?;
    let committed = Instant::now();
    let lsn: String = fx
        .source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .context("reading the source's WAL position")?
        .get(0);
    let flushed_sql = format!(
        "SELECT (confirmed_flush_lsn >= $1::text::pg_lsn)::int::int8 FROM pg_replication_slots \
         WHERE slot_name = '{}'",
        native::SUBSCRIPTION
    );
    db::wait_for(
        "the subscription to apply the huge transaction",
        Duration::from_secs(1800),
        POLL,
        async || Ok((db::int(&fx.source, &flushed_sql, &[&lsn]).await? == 1).then_some(())),
    )
    .await?;
    let native_apply_s = committed.elapsed().as_secs_f64();
    let native_source_s = committed.duration_since(started).as_secs_f64();
    native::unsubscribe(fx).await?;
    let native_target_rows = db::int(
        &fx.target,
        &format!("SELECT count(*) FROM {NATIVE} WHERE status = '{marker}'"),
        &[],
    )
    .await?;
    fx.say(&format!(
        "huge transaction, native: the source took {native_source_s:.2} s, the target had it \
         {native_apply_s:.2} s after the commit ({native_target_rows} rows)"
    ));
    Ok(HugeFigures {
        rows,
        rowsync_source_s,
        rowsync_apply_s,
        rowsync_ratio_to_source: rowsync_apply_s / rowsync_source_s,
        rowsync_peak_rss_mib,
        rowsync_target_rows,
        native_source_s,
        native_apply_s,
        native_ratio_to_source: native_apply_s / native_source_s,
        native_target_rows,
    })
}
