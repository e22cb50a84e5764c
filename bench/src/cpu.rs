//! CPU accounting from /proc, to see where a write-load run's CPU went: the machine's busy share,
//! and the CPU of the consumer (rowsync's daemon and its sessions on both servers, or the
//! walsender and the apply worker of native replication).

use std::collections::HashMap;

use crate::error::{Context, Result};
use crate::fixture::Fixture;
use crate::native::SUBSCRIPTION;

/// Busy and total jiffies of the whole machine (/proc/stat).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineTicks {
    busy: u64,
    total: u64,
}

pub(crate) fn machine_ticks() -> MachineTicks {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    let total = fields.iter().sum();
    // idle and iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    MachineTicks {
        busy: total - idle.min(total),
        total,
    }
}

/// The machine's busy share between two readings (1.0 = every CPU busy).
pub(crate) fn busy_share(before: MachineTicks, after: MachineTicks) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return f64::NAN;
    }
    after.busy.saturating_sub(before.busy) as f64 / total as f64
}

/// utime + stime of a process, in clock ticks; None once it is gone.
fn process_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it are fixed.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Which consumer's CPU to account for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Consumer {
    /// The rowsync daemon and every rowsync session on both servers.
    Rowsync,
    /// The subscription's walsender on the source and its apply worker on the target.
    Native,
}

/// CPU ticks of the consumer's processes at one moment.
pub(crate) struct ConsumerTicks(HashMap<i32, u64>);

pub(crate) async fn consumer_ticks(fx: &Fixture<'_>, consumer: Consumer) -> Result<ConsumerTicks> {
    let mut pids = Vec::new();
    match consumer {
        Consumer::Rowsync => {
            if let Some(daemon) = &fx.daemon {
                pids.push(daemon.pid());
            }
            for client in [&fx.source, &fx.target] {
                pids.extend(
                    pids_of(
                        client,
                        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'rowsync%'",
                    )
                    .await?,
                );
            }
        }
        Consumer::Native => {
            pids.extend(
                pids_of(
                    &fx.source,
                    &format!(
                        "SELECT pid FROM pg_stat_replication WHERE application_name = '{SUBSCRIPTION}'"
                    ),
                )
                .await?,
            );
            pids.extend(
                pids_of(
                    &fx.target,
                    &format!(
                        "SELECT pid FROM pg_stat_subscription WHERE subname = '{SUBSCRIPTION}' \
                         AND pid IS NOT NULL"
                    ),
                )
                .await?,
            );
        }
    }
    Ok(ConsumerTicks(
        pids.into_iter()
            .filter_map(|pid| Some((pid, process_ticks(pid)?)))
            .collect(),
    ))
}

/// CPU ticks of the backends that `source_sql` and `target_sql` name (each selects pids).
pub(crate) async fn ticks_of(
    fx: &Fixture<'_>,
    source_sql: &str,
    target_sql: &str,
) -> Result<ConsumerTicks> {
    let mut pids = pids_of(&fx.source, source_sql).await?;
    pids.extend(pids_of(&fx.target, target_sql).await?);
    Ok(ConsumerTicks(
        pids.into_iter()
            .filter_map(|pid| Some((pid, process_ticks(pid)?)))
            .collect(),
    ))
}

async fn pids_of(client: &tokio_postgres::Client, sql: &str) -> Result<Vec<i32>> {
    Ok(client
        .query(sql, &[])
        .await
        .with_context(|| format!("running {sql}"))?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// CPU seconds the consumer used between two readings. A process seen only at the end started
/// in between: all of its CPU counts. One that ended in between is not counted (rare: sessions
/// are pooled).
pub(crate) fn consumer_cpu_seconds(before: &ConsumerTicks, after: &ConsumerTicks) -> f64 {
    let ticks: u64 = after
        .0
        .iter()
        .map(|(pid, end)| end.saturating_sub(before.0.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / ticks_per_second()
}
