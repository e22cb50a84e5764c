//! Measurement 2: source write throughput with no capture, with rowsync, and with native logical
//! replication, measured interleaved in rounds so drift (autovacuum, cache, WAL) hits all three.
//! The order within a round rotates from round to round, and each ratio is the median of the
//! per-round ratios: a round's three runs are minutes apart at most, while the whole measurement
//! drifts by more than the effects measured (no-capture runs of one benchmark ranged from 12,000
//! to 15,800 TPS). The ratio of the medians is reported too.
//!
//! Each configuration writes its own table, so one configuration's changes never add work to
//! another's: `users_plain` (no capture; the rowsync daemon runs but syncs only `users`), `users`
//! (rowsync capture, daemon streaming), `users_lr` (a subscription created just before the run with
//! a fresh slot and dropped right after, so no walsender decodes WAL during the other runs). Before
//! every run the daemon has emptied the journal and both servers have checkpointed.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cpu::{self, Consumer};
use crate::error::Result;
use crate::fixture::{Fixture, NATIVE, PLAIN, USERS};
use crate::pgbench::{self, Run};
use crate::{native, stats};

pub(crate) const ROUNDS: usize = 5;

/// One pgbench run and where the machine's CPU went meanwhile.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Measured {
    #[serde(flatten)]
    pub pgbench: Run,
    /// Share of the machine's CPU time that was busy (1.0 = every core).
    pub machine_busy_share: f64,
    /// CPU of the consumer, in cores: rowsync's daemon and its sessions on both servers (idle
    /// during `none`), or the walsender and apply worker of the subscription.
    pub consumer_cpu_cores: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ThroughputFigures {
    pub none: Vec<Measured>,
    pub rowsync: Vec<Measured>,
    pub native: Vec<Measured>,
    pub none_median_tps: f64,
    pub rowsync_median_tps: f64,
    pub native_median_tps: f64,
    /// Median of the per-round ratios.
    pub rowsync_ratio_to_none: f64,
    pub native_ratio_to_none: f64,
    /// Per round: rowsync's TPS / no capture's, and native's.
    pub rowsync_round_ratios: Vec<f64>,
    pub native_round_ratios: Vec<f64>,
    /// Median TPS / median TPS of no capture (the figure before per-round ratios).
    pub rowsync_ratio_of_medians: f64,
    pub native_ratio_of_medians: f64,
    /// After each rowsync run: how long the daemon still needed to empty the journal.
    pub rowsync_drain_after_run_s: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
enum Capture {
    None,
    Rowsync,
    Native,
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<ThroughputFigures> {
    fx.say("starting rowsync run (kept running through every round)");
    fx.start_daemon(None).await?;
    let (mut none, mut rowsync, mut replicated) = (Vec::new(), Vec::new(), Vec::new());
    let mut drains = Vec::new();
    for round in 1..=ROUNDS {
        let mut order = [Capture::None, Capture::Rowsync, Capture::Native];
        order.rotate_left((round - 1) % 3);
        for capture in order {
            fx.wait_caught_up(Duration::from_secs(600)).await?;
            fx.checkpoint().await?;
            let run = match capture {
                Capture::None => measured_run(fx, PLAIN, Consumer::Rowsync).await?,
                Capture::Rowsync => measured_run(fx, USERS, Consumer::Rowsync).await?,
                Capture::Native => {
                    native::subscribe(fx, false).await?;
                    native::wait_streaming(fx).await?;
                    let run = measured_run(fx, NATIVE, Consumer::Native).await;
                    native::unsubscribe(fx).await?;
                    run?
                }
            };
            fx.say(&format!(
                "throughput round {round}/{ROUNDS}, {capture:?}: {:.0} tps ({} updates); \
                 machine {:.0}% busy, consumer {:.2} cores",
                run.pgbench.tps,
                run.pgbench.transactions,
                run.machine_busy_share * 100.0,
                run.consumer_cpu_cores
            ));
            match capture {
                Capture::None => none.push(run),
                Capture::Rowsync => {
                    let started = Instant::now();
                    fx.wait_caught_up(Duration::from_secs(600)).await?;
                    let drain = started.elapsed().as_secs_f64();
                    fx.say(&format!(
                        "rowsync emptied the journal {drain:.2} s after the run"
                    ));
                    drains.push(drain);
                    rowsync.push(run);
                }
                Capture::Native => replicated.push(run),
            }
        }
    }
    fx.wait_caught_up(Duration::from_secs(600)).await?;
    let median =
        |runs: &[Measured]| stats::median(&runs.iter().map(|r| r.pgbench.tps).collect::<Vec<_>>());
    let ratios = |runs: &[Measured]| -> Vec<f64> {
        runs.iter()
            .zip(&none)
            .map(|(run, base)| run.pgbench.tps / base.pgbench.tps)
            .collect()
    };
    let rowsync_round_ratios = ratios(&rowsync);
    let native_round_ratios = ratios(&replicated);
    let none_median_tps = median(&none);
    let rowsync_median_tps = median(&rowsync);
    let native_median_tps = median(&replicated);
    Ok(ThroughputFigures {
        none,
        rowsync,
        native: replicated,
        none_median_tps,
        rowsync_median_tps,
        native_median_tps,
        rowsync_ratio_to_none: stats::median(&rowsync_round_ratios),
        native_ratio_to_none: stats::median(&native_round_ratios),
        rowsync_ratio_of_medians: rowsync_median_tps / none_median_tps,
        native_ratio_of_medians: native_median_tps / none_median_tps,
        rowsync_round_ratios,
        native_round_ratios,
        rowsync_drain_after_run_s: drains,
    })
}

/// pgbench on `table` for `--seconds`, with the machine's and the consumer's CPU meanwhile.
async fn measured_run(fx: &mut Fixture<'_>, table: &str, consumer: Consumer) -> Result<Measured> {
    let seconds = fx.seconds;
    let consumer_before = cpu::consumer_ticks(fx, consumer).await?;
    let machine_before = cpu::machine_ticks();
    let started = Instant::now();
    let run = pgbench::run(fx, table, seconds).await?;
    let wall = started.elapsed().as_secs_f64();
    let machine_after = cpu::machine_ticks();
    let consumer_after = cpu::consumer_ticks(fx, consumer).await?;
    Ok(Measured {
        pgbench: run,
        machine_busy_share: cpu::busy_share(machine_before, machine_after),
        consumer_cpu_cores: cpu::consumer_cpu_seconds(&consumer_before, &consumer_after) / wall,
    })
}
