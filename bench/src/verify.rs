//! Measurement 6: `rowsync verify` and `rowsync repair` on the users table with 0.1% of its rows
//! made to differ in the target (some changed, some deleted, some added), side by side with
//! reading both tables whole: `COPY users TO STDOUT` of each, at once, through psql (the read
//! limit: no comparison can read less). Rounds interleave the three; each ratio is the median of
//! the rounds' ratios. Also: verify of the consistent tables, and both commands' peak RSS.
//!
//! No daemon runs here, so `repair` applies the rows itself, through the same batches.

use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fixture::Fixture;
use crate::{db, stats};

pub(crate) const ROUNDS: usize = 3;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct VerifyFigures {
    /// Rows made to differ in each round: (changed, deleted, added).
    pub changed: u64,
    pub deleted: u64,
    pub added: u64,
    pub read_s: Vec<f64>,
    pub read_median_s: f64,
    /// `rowsync verify` of the consistent tables, before the first round.
    pub verify_consistent_s: f64,
    pub verify_s: Vec<f64>,
    pub verify_median_s: f64,
    pub verify_ratio_to_read: f64,
    pub repair_s: Vec<f64>,
    pub repair_median_s: f64,
    pub repair_ratio_to_read: f64,
    pub verify_peak_rss_mib: f64,
    pub repair_peak_rss_mib: f64,
    /// Every round's verify counted exactly the rows made to differ, and the tables matched
    /// after every repair.
    pub exact: bool,
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<VerifyFigures> {
    let differing = (fx.rows / 1000).max(10);
    let (changed, deleted) = (differing * 4 / 10, differing * 3 / 10);
    let added = differing - changed - deleted;
    fx.say("verify: the tables as the daemon left them");
    let (verify_consistent_s, _, out) = rowsync(fx, "verify", &[]).await?;
    if !out.contains("CONSISTENT") || out.contains("INCONSISTENT") {
        return Err(Error::msg(format!(
            "verify found the tables inconsistent before any row was made to differ:\n{out}"
        )));
    }
    let (mut read, mut verify, mut repair) = (Vec::new(), Vec::new(), Vec::new());
    let (mut verify_ratios, mut repair_ratios) = (Vec::new(), Vec::new());
    let (mut verify_rss, mut repair_rss) = (0u64, 0u64);
    let mut exact = true;
    for round in 1..=ROUNDS {
        let label = format!("verify {round}/{ROUNDS}");
        tamper(fx, changed, deleted, added).await?;
        fx.checkpoint().await?;
        let seconds = read_both(fx).await?;
        fx.say(&format!("{label}: reading both tables took {seconds:.2} s"));
        read.push(seconds);

        let (seconds, rss, out) = rowsync(fx, "verify", &[]).await?;
        let counts = counts(&out);
        fx.say(&format!(
            "{label}: rowsync verify took {seconds:.2} s, {:.1} MiB; found {counts:?} (missing, extra, different)",
            rss as f64 / 1024.0
        ));
        exact &= counts == Some((deleted, added, changed));
        verify.push(seconds);
        verify_ratios.push(seconds / read[round - 1]);
        verify_rss = verify_rss.max(rss);

        let (seconds, rss, out) = rowsync(fx, "repair", &[]).await?;
        fx.say(&format!(
            "{label}: rowsync repair took {seconds:.2} s, {:.1} MiB: {}",
            rss as f64 / 1024.0,
            out.lines().next().unwrap_or_default()
        ));
        exact &= out.contains("now CONSISTENT");
        repair.push(seconds);
        repair_ratios.push(seconds / read[round - 1]);
        repair_rss = repair_rss.max(rss);
    }
    Ok(VerifyFigures {
        changed,
        deleted,
        added,
        read_median_s: stats::median(&read),
        read_s: read,
        verify_consistent_s,
        verify_median_s: stats::median(&verify),
        verify_ratio_to_read: stats::median(&verify_ratios),
        verify_s: verify,
        repair_median_s: stats::median(&repair),
        repair_ratio_to_read: stats::median(&repair_ratios),
        repair_s: repair,
        verify_peak_rss_mib: verify_rss as f64 / 1024.0,
        repair_peak_rss_mib: repair_rss as f64 / 1024.0,
        exact,
    })
}

/// Changes, deletes and adds rows in the target, at random.
async fn tamper(fx: &Fixture<'_>, changed: u64, deleted: u64, added: u64) -> Result<()> {
    db::exec(
        &fx.target,
        &format!(
            "UPDATE users SET status = 'changed by hand' \
              WHERE id IN (SELECT id FROM users ORDER BY random() LIMIT {changed}); \
             DELETE FROM users \
              WHERE id IN (SELECT id FROM users WHERE status <> 'changed by hand' \
                            ORDER BY random() LIMIT {deleted}); \
             INSERT INTO users (id, first_name, role, status) \
             SELECT gen_random_uuid(), 'added by hand', 'member', 'active' \
               FROM generate_series(1, {added})"
        ),
    )
    .await
}

/// `COPY users TO STDOUT` of both tables at once, to /dev/null through psql. Returns seconds.
async fn read_both(fx: &mut Fixture<'_>) -> Result<f64> {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(
            "set -o pipefail; \
             \"$0\" -X -q -d \"$1\" -c 'COPY public.users TO STDOUT' > /dev/null & a=$!; \
             \"$0\" -X -q -d \"$2\" -c 'COPY public.users TO STDOUT' > /dev/null; b=$?; \
             wait $a && exit $b",
        )
        .arg(fx.pg_program("psql"))
        .arg(fx.servers.source_url())
        .arg(fx.servers.target_url());
    let started = Instant::now();
    let mut proc = fx.spawn("read-both", command)?;
    proc.wait_success(timeout(fx.rows)).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Runs `rowsync <subcommand>`; returns its wall time, peak RSS (KiB) and what it printed.
/// verify's exit status 1 (inconsistent) is expected here.
async fn rowsync(
    fx: &mut Fixture<'_>,
    subcommand: &str,
    args: &[&str],
) -> Result<(f64, u64, String)> {
    let mut command = fx.rowsync_command(subcommand, None);
    command.args(args);
    let started = Instant::now();
    let mut proc = fx.spawn(&format!("rowsync-{subcommand}"), command)?;
    let exited = proc.wait(timeout(fx.rows)).await?;
    let seconds = started.elapsed().as_secs_f64();
    fx.collect_rowsync_log(&proc);
    let out = proc.stdout();
    if exited.code != Some(0) && !(subcommand == "verify" && exited.code == Some(1)) {
        return Err(Error::msg(format!(
            "rowsync {subcommand} failed ({exited:?}):\n{out}\n{}",
            proc.stderr()
        )));
    }
    Ok((seconds, exited.max_rss_kib, out))
}

/// (missing, extra, different) from verify's table line for public.users.
fn counts(report: &str) -> Option<(u64, u64, u64)> {
    let line = report.lines().find(|l| l.starts_with("public.users "))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some((
        fields.get(6)?.parse().ok()?,
        fields.get(7)?.parse().ok()?,
        fields.get(8)?.parse().ok()?,
    ))
}

/// A generous bound: ten minutes plus a millisecond per row.
fn timeout(rows: u64) -> Duration {
    Duration::from_secs(600) + Duration::from_millis(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_counts_from_verifys_table() {
        let report = "TABLE  SOURCE  TARGET  DIFFERENCE  UPDATED (1H)  CONTENTS  MISSING  EXTRA  DIFFERENT  STATUS\n\
                      public.users  1000  1001  -1  0  differ  3  4  5  INCONSISTENT\n";
        assert_eq!(counts(report), Some((3, 4, 5)));
    }
}
