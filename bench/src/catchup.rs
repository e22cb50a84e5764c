//! Measurement 3: how fast a backlog of `--seconds` of max-rate writes is caught up.
//!
//! rowsync: the daemon is stopped, pgbench writes `users`, the daemon starts again; caught up when
//! the journal is empty (rowsync deletes journal rows right after the target commit that applied
//! them). Native: the subscription is disabled (its slot keeps the WAL), pgbench writes `users_lr`,
//! the subscription is enabled; caught up when the slot's `confirmed_flush_lsn` has passed the
//! source's WAL position at the end of the writes. A marker row written last also tells when the
//! target has applied everything (replication applies in commit order).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::fixture::{Fixture, NATIVE, USERS};
use crate::{db, native, pgbench};

const POLL: Duration = Duration::from_millis(20);

/// A sweep's row in the target's `sync_runs`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SweepRun {
    pub duration_s: f64,
    pub created: i64,
    pub updated: i64,
    pub deleted: i64,
    /// Rows read and found identical in the target (the look-back re-reads these).
    pub unchanged: i64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CatchUpFigures {
    /// Daemon start to empty journal.
    pub rowsync_s: f64,
    /// Updates written while the daemon was stopped.
    pub rowsync_backlog_changes: u64,
    /// Source TPS of that run: capture installed, no consumer running.
    pub rowsync_backlog_tps: f64,
    /// The first sweep after the restart (it is what empties the journal), from `sync_runs`.
    pub rowsync_first_sweep: Option<SweepRun>,
    pub rowsync_journal_rows: i64,
    /// Count and checksum of status and updated_at equal on both sides afterwards.
    pub rowsync_target_matches_source: bool,
    /// ENABLE to `confirmed_flush_lsn` >= the source's WAL position after the writes.
    pub native_s: f64,
    /// ENABLE to the marker row (written last) being visible in the target.
    pub native_applied_s: f64,
    /// ENABLE to the apply worker running (the launcher's part of the catch-up).
    pub native_worker_started_s: f64,
    pub native_backlog_changes: u64,
    /// Source TPS of that run: a slot exists, no walsender running.
    pub native_backlog_tps: f64,
    /// WAL the slot held back when the subscription was enabled.
    pub native_backlog_wal_bytes: i64,
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<CatchUpFigures> {
    let seconds = fx.seconds;

    fx.say("catch-up, rowsync: stopping the daemon");
    fx.wait_caught_up(Duration::from_secs(600)).await?;
    fx.stop_daemon().await?;
    fx.checkpoint().await?;
    fx.say(&format!(
        "catch-up, rowsync: {seconds} s of writes to {USERS} while stopped"
    ));
    let backlog = pgbench::run(fx, USERS, seconds).await?;
    let journal_rows = fx.journal_depth().await?;
    fx.say(&format!(
        "catch-up, rowsync: {} updates, {journal_rows} journal rows; starting the daemon",
        backlog.transactions
    ));
    let runs_before = db::int(
        &fx.target,
        "SELECT coalesce(max(id), 0) FROM sync_runs",
        &[],
    )
    .await?;
    let started = Instant::now();
    let command = fx.rowsync_command("run", None);
    let daemon = fx.spawn("rowsync-run", command)?;
    fx.daemon = Some(daemon);
    fx.wait_caught_up(Duration::from_secs(1800)).await?;
    let rowsync_s = started.elapsed().as_secs_f64();
    fx.wait_listening().await?;
    let source = Fixture::fingerprint(&fx.source, USERS).await?;
    let target = Fixture::fingerprint(&fx.target, USERS).await?;
    // Diagnostic only: the sweep's row is completed just after its batch, so wait a little.
    let first_sweep = db::wait_for(
        "the first sweep after the restart in sync_runs",
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || {
            let row = fx
                .target
                .query_opt(
                    "SELECT extract(epoch FROM finished_at - started_at)::float8, \
                            created, updated, deleted, unchanged \
                       FROM sync_runs \
                      WHERE kind = 'sweep' AND id > $1 AND finished_at IS NOT NULL \
                      ORDER BY id LIMIT 1",
                    &[&runs_before],
                )
                .await
                .context("reading sync_runs")?;
            Ok(row.map(|row| SweepRun {
                duration_s: row.get(0),
                created: row.get(1),
                updated: row.get(2),
                deleted: row.get(3),
                unchanged: row.get(4),
            }))
        },
    )
    .await
    .ok();
    fx.say(&format!(
        "catch-up, rowsync: {rowsync_s:.2} s; target {} source; first sweep: {first_sweep:?}",
        if source == target {
            "matches"
        } else {
            "DOES NOT match"
        }
    ));

    fx.say("catch-up, native: subscribing, then disabling the subscription");
    fx.checkpoint().await?;
    native::subscribe(fx, false).await?;
    native::wait_streaming(fx).await?;
    native::disable(fx).await?;
    fx.say(&format!(
        "catch-up, native: {seconds} s of writes to {NATIVE} while disabled"
    ));
    let native_backlog = pgbench::run(fx, NATIVE, seconds).await?;
    let marker = db::int(
        &fx.source,
        "UPDATE users_lr SET updated_at = now() WHERE id = md5('1')::uuid \
         RETURNING (extract(epoch FROM updated_at) * 1000000)::int8",
        &[],
    )
    .await?;
    let lsn: String = fx
        .source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .context("reading the source's WAL position")?
        .get(0);
    let backlog_bytes = db::int(
        &fx.source,
        &format!(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots \
             WHERE slot_name = '{}'",
            native::SUBSCRIPTION
        ),
        &[],
    )
    .await?;
    fx.say(&format!(
        "catch-up, native: {} updates, {:.1} MiB of WAL held; enabling",
        native_backlog.transactions,
        backlog_bytes as f64 / 1048576.0
    ));
    let flushed_sql = format!(
        "SELECT (confirmed_flush_lsn >= $1::text::pg_lsn)::int::int8 FROM pg_replication_slots \
         WHERE slot_name = '{}'",
        native::SUBSCRIPTION
    );
    let applied_sql = "SELECT count(*) FROM users_lr WHERE id = md5('1')::uuid \
                       AND (extract(epoch FROM updated_at) * 1000000)::int8 = $1";
    native::wait_for_launcher(fx).await?;
    let started = Instant::now();
    native::enable(fx).await?;
    let worker_sql = format!(
        "SELECT count(*) FROM pg_stat_subscription \
          WHERE subname = '{}' AND relid IS NULL AND pid IS NOT NULL",
        native::SUBSCRIPTION
    );
    let (mut flushed, mut applied, mut worker) = (None, None, None);
    let deadline = started + Duration::from_secs(1800);
    while flushed.is_none() || applied.is_none() {
        if worker.is_none() && db::int(&fx.target, &worker_sql, &[]).await? > 0 {
            worker = Some(started.elapsed().as_secs_f64());
        }
        if flushed.is_none() && db::int(&fx.source, &flushed_sql, &[&lsn]).await? == 1 {
            flushed = Some(started.elapsed().as_secs_f64());
        }
        if applied.is_none() && db::int(&fx.target, applied_sql, &[&marker]).await? == 1 {
            applied = Some(started.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return Err(Error::msg(
                "timed out waiting for the subscription to catch up (confirmed_flush_lsn and marker row)",
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    native::unsubscribe(fx).await?;
    let native_s = flushed.unwrap_or(f64::NAN);
    let native_applied_s = applied.unwrap_or(f64::NAN);
    // Seen before the poll that saw the catch-up at the latest.
    let native_worker_started_s = worker.unwrap_or(native_applied_s.min(native_s));
    fx.say(&format!(
        "catch-up, native: apply worker up after {native_worker_started_s:.2} s, last change in \
         the target after {native_applied_s:.2} s, confirmed_flush_lsn passed after {native_s:.2} s"
    ));
    Ok(CatchUpFigures {
        rowsync_s,
        rowsync_backlog_changes: backlog.transactions,
        rowsync_backlog_tps: backlog.tps,
        rowsync_first_sweep: first_sweep,
        rowsync_journal_rows: journal_rows,
        rowsync_target_matches_source: source == target,
        native_s,
        native_applied_s,
        native_worker_started_s,
        native_backlog_changes: native_backlog.transactions,
        native_backlog_tps: native_backlog.tps,
        native_backlog_wal_bytes: backlog_bytes,
    })
}
