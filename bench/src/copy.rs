//! Measurement 1: the initial copy of N rows into an empty target table, three ways: a raw
//! `COPY … TO STDOUT | COPY … FROM STDIN` pipe through psql, `rowsync setup` (capture install,
//! migrations and copy, from a fresh rowsync state), and native logical replication's table sync.

use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fixture::{Fixture, NATIVE, USERS};
use crate::{db, native, stats};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CopyFigures {
    pub repetitions: usize,
    pub raw_pipe_s: Vec<f64>,
    pub raw_pipe_median_s: f64,
    /// Wall time of `rowsync setup`, process start to exit.
    pub rowsync_setup_s: Vec<f64>,
    pub rowsync_setup_median_s: f64,
    pub rowsync_ratio_to_raw: f64,
    /// The copy's own duration as `rowsync setup` reports it (the rest is start-up, migrations
    /// and capture installation).
    pub rowsync_reported_copy_s: Vec<f64>,
    /// Peak RSS of `rowsync setup` (`ru_maxrss`), the largest over the repetitions.
    pub rowsync_setup_peak_rss_mib: f64,
    pub native_s: Vec<f64>,
    pub native_median_s: f64,
    pub native_ratio_to_raw: f64,
    pub source_rows: i64,
    pub target_rows_after_rowsync: i64,
    pub target_matches_source_after_rowsync: bool,
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<CopyFigures> {
    let repetitions = if fx.rows <= 100_000 { 3 } else { 1 };
    native::create_publication(fx).await?;
    let mut raw = Vec::new();
    let mut setup = Vec::new();
    let mut reported = Vec::new();
    let mut peak_rss_kib = 0;
    let mut replicated = Vec::new();
    // The first large write into the target creates its WAL segments; later ones recycle them.
    // An unmeasured copy first keeps that cost out of whichever method would go first.
    fx.say("initial copy: warm-up (raw COPY pipe, not measured)");
    raw_pipe(fx).await?;
    for round in 1..=repetitions {
        let label = format!("initial copy {round}/{repetitions}");
        fx.say(&format!("{label}: raw COPY pipe"));
        let seconds = raw_pipe(fx).await?;
        fx.say(&format!("{label}: raw COPY pipe took {seconds:.2} s"));
        raw.push(seconds);

        fx.say(&format!("{label}: rowsync setup"));
        let (seconds, copy_seconds, rss_kib) = rowsync_setup(fx).await?;
        fx.say(&format!(
            "{label}: rowsync setup took {seconds:.2} s (copy {copy_seconds:.2} s), peak RSS {:.1} MiB",
            rss_kib as f64 / 1024.0
        ));
        setup.push(seconds);
        reported.push(copy_seconds);
        peak_rss_kib = peak_rss_kib.max(rss_kib);

        fx.say(&format!("{label}: native logical replication table sync"));
        let seconds = native_copy(fx).await?;
        fx.say(&format!("{label}: native table sync took {seconds:.2} s"));
        replicated.push(seconds);
    }

    // rowsync's state stays in place for the next measurements: check it copied everything.
    let source = crate::fixture::Fixture::fingerprint(&fx.source, USERS).await?;
    let target = crate::fixture::Fixture::fingerprint(&fx.target, USERS).await?;
    if target.0 != source.0 {
        return Err(Error::msg(format!(
            "after rowsync setup the target has {} users, the source {}",
            target.0, source.0
        )));
    }
    let raw_median = stats::median(&raw);
    let setup_median = stats::median(&setup);
    let native_median = stats::median(&replicated);
    Ok(CopyFigures {
        repetitions,
        raw_pipe_median_s: raw_median,
        raw_pipe_s: raw,
        rowsync_setup_median_s: setup_median,
        rowsync_ratio_to_raw: setup_median / raw_median,
        rowsync_setup_s: setup,
        rowsync_reported_copy_s: reported,
        rowsync_setup_peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        native_median_s: native_median,
        native_ratio_to_raw: native_median / raw_median,
        native_s: replicated,
        source_rows: source.0,
        target_rows_after_rowsync: target.0,
        target_matches_source_after_rowsync: source == target,
    })
}

/// A generous bound on any copy: ten minutes plus a millisecond per row.
fn copy_timeout(rows: u64) -> Duration {
    Duration::from_secs(600) + Duration::from_millis(rows)
}

async fn raw_pipe(fx: &mut Fixture<'_>) -> Result<f64> {
    db::exec(&fx.target, "TRUNCATE users").await?;
    fx.checkpoint().await?;
    // bash, not sh: Debian's dash has no pipefail, and a failed COPY TO must fail the pipe.
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(
            "set -o pipefail; \
             \"$0\" -X -q -d \"$1\" -c 'COPY public.users TO STDOUT (FORMAT binary)' \
             | \"$0\" -X -q -d \"$2\" -c 'COPY public.users FROM STDIN (FORMAT binary)'",
        )
        .arg(fx.pg_program("psql"))
        .arg(fx.servers.source_url())
        .arg(fx.servers.target_url());
    let started = Instant::now();
    let mut proc = fx.spawn("raw-copy", command)?;
    proc.wait_success(copy_timeout(fx.rows)).await?;
    let seconds = started.elapsed().as_secs_f64();
    expect_rows(fx, USERS).await?;
    Ok(seconds)
}

/// Removes every trace of rowsync from both databases and empties the target table.
async fn reset_rowsync(fx: &Fixture<'_>) -> Result<()> {
    db::exec(&fx.source, "DROP SCHEMA IF EXISTS rowsync CASCADE").await?;
    // The capture triggers live on public.users but depend on functions in schema rowsync, so
    // the CASCADE takes them too. Check it.
    let triggers = db::int(
        &fx.source,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.users'::regclass AND NOT tgisinternal",
        &[],
    )
    .await?;
    if triggers != 0 {
        return Err(Error::msg(format!(
            "{triggers} triggers are left on the source's users after DROP SCHEMA rowsync CASCADE"
        )));
    }
    db::exec(
        &fx.target,
        "DROP TABLE IF EXISTS rowsync_progress, rowsync_migrations, sync_errors, sync_runs CASCADE",
    )
    .await?;
    db::exec(&fx.target, "TRUNCATE users").await
}

/// Runs `rowsync setup` on a fresh state. Returns its wall time, the copy time it reports, and
/// its peak RSS (KiB).
async fn rowsync_setup(fx: &mut Fixture<'_>) -> Result<(f64, f64, u64)> {
    reset_rowsync(fx).await?;
    fx.checkpoint().await?;
    let command = fx.rowsync_command("setup", None);
    let started = Instant::now();
    let mut proc = fx.spawn("rowsync-setup", command)?;
    let exited = proc.wait_success(copy_timeout(fx.rows)).await;
    let seconds = started.elapsed().as_secs_f64();
    fx.collect_rowsync_log(&proc);
    let exited = exited?;
    let summary = proc.stdout();
    let copy_seconds = reported_copy_seconds(&summary).ok_or_else(|| {
        Error::msg(format!(
            "rowsync setup did not report a copy; it printed:\n{summary}"
        ))
    })?;
    expect_rows(fx, USERS).await?;
    Ok((seconds, copy_seconds, exited.max_rss_kib))
}

/// "users: capture installed; copied 10000 rows in 0.1 s (…)" → 0.1
fn reported_copy_seconds(summary: &str) -> Option<f64> {
    let after = summary.split(" rows in ").nth(1)?;
    after.split(" s").next()?.trim().parse().ok()
}

async fn native_copy(fx: &mut Fixture<'_>) -> Result<f64> {
    db::exec(&fx.target, "TRUNCATE users_lr").await?;
    fx.checkpoint().await?;
    native::wait_for_launcher(fx).await?;
    let started = Instant::now();
    native::subscribe(fx, true).await?;
    native::wait_tables_ready(fx, copy_timeout(fx.rows)).await?;
    let seconds = started.elapsed().as_secs_f64();
    native::unsubscribe(fx).await?;
    expect_rows(fx, NATIVE).await?;
    Ok(seconds)
}

/// Fails unless the target's `table` has exactly the source's row count.
async fn expect_rows(fx: &Fixture<'_>, table: &str) -> Result<()> {
    let sql = format!(
        "SELECT count(*) FROM {}",
        rowsync::catalog::ident::quote(table)
    );
    let target = db::int(&fx.target, &sql, &[]).await?;
    let source = db::int(&fx.source, &sql, &[]).await?;
    if target != source {
        return Err(Error::msg(format!(
            "after the copy the target's {table} has {target} rows, the source's {source}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_copy_time_from_setups_summary() {
        let summary = "public.users: capture installed; copied 10000 rows in 0.3 s (10000 created, \
                       0 updated, 0 deleted, 0 unchanged)\n";
        assert_eq!(reported_copy_seconds(summary), Some(0.3));
    }
}
