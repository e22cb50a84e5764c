//! Prometheus metrics: every name in one place, kept with the `prometheus` crate and rendered in
//! Prometheus' text exposition format (0.0.4).
//!
//! Counters and the sweep-duration histogram are updated as things happen (by
//! [`crate::ops::telemetry::Telemetry`]); gauges are set from the figures when `/metrics` is
//! scraped. The `prometheus` crate rather than `prometheus-client`: the latter writes only
//! OpenMetrics, whose `# TYPE` lines name counters without `_total`, which would change the
//! exposition that scrape configs, dashboards and our tests already read.

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::policy::ErrorType;
use crate::ops::health::PoolUsage;
use crate::ops::telemetry::{Figures, Role};
use crate::pipeline::apply::Counts;
use crate::source::listener::ListenerState;

pub const CHANGES_APPLIED: &str = "rowsync_changes_applied_total";
pub const SYNC_ERRORS: &str = "rowsync_sync_errors_total";
pub const LAG_SECONDS: &str = "rowsync_lag_seconds";
pub const SWEEP_DURATION: &str = "rowsync_sweep_duration_seconds";
pub const JOURNAL_PENDING: &str = "rowsync_journal_pending";
pub const JOURNAL_STUCK: &str = "rowsync_journal_stuck_rows";
pub const UNRESOLVED_ROWS: &str = "rowsync_unresolved_rows";
pub const POOL_SIZE: &str = "rowsync_pool_size";
pub const POOL_IN_USE: &str = "rowsync_pool_in_use";
pub const POOL_MAX: &str = "rowsync_pool_max_size";
pub const REALTIME_CONNECTED: &str = "rowsync_realtime_connected";
pub const ACTIVE: &str = "rowsync_active";
pub const BATCHES: &str = "rowsync_batches_total";
pub const SWEEPS: &str = "rowsync_sweeps_total";
pub const FAILED_ATTEMPTS: &str = "rowsync_failed_attempts_total";
pub const CONSECUTIVE_FAILURES: &str = "rowsync_consecutive_failures";
pub const BUILD_INFO: &str = "rowsync_build_info";
pub const YIELDING: &str = "rowsync_yielding";
pub const YIELDED_SECONDS: &str = "rowsync_yielded_seconds_total";
pub const SOURCE_ACTIVE_SESSIONS: &str = "rowsync_source_active_sessions";
pub const DIVERGENT_ROWS: &str = "rowsync_divergent_rows";
pub const LAST_VERIFICATION: &str = "rowsync_last_verification_timestamp_seconds";
pub const CAPTURE_INTACT: &str = "rowsync_capture_intact";
pub const LAST_SWEEP: &str = "rowsync_last_sweep_timestamp_seconds";

/// Upper bounds (seconds) of the sweep duration histogram's buckets.
const SWEEP_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0,
];

/// The metrics of this process.
pub(crate) struct Metrics {
    registry: Registry,
    changes_applied: IntCounterVec,
    sync_errors: IntCounterVec,
    sweep_duration: Histogram,
    batches: IntCounter,
    sweeps: IntCounter,
    failed_attempts: IntCounter,
    yielded_seconds: Counter,
    lag: Gauge,
    journal_pending: IntGaugeVec,
    journal_stuck: IntGaugeVec,
    unresolved: IntGaugeVec,
    pool_size: IntGaugeVec,
    pool_in_use: IntGaugeVec,
    pool_max: IntGaugeVec,
    realtime: IntGauge,
    active: IntGauge,
    consecutive_failures: IntGauge,
    yielding: IntGauge,
    source_sessions: Gauge,
    divergent_rows: IntGaugeVec,
    capture_intact: IntGaugeVec,
    last_sweep: Gauge,
    last_verification: prometheus::GaugeVec,
}

/// Registers a metric; the names and label sets are constants, so registering cannot fail.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(registry, vec)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    register(registry, vec)
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    register(registry, Gauge::new(name, help).expect("valid metric"))
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        let build_info = gauge_vec(&r, BUILD_INFO, "Build information.", &["version"]);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let sync_errors = counter_vec(
            &r,
            SYNC_ERRORS,
            "Failures recorded in sync_errors, by error_type.",
            &["type"],
        );
        // Every type has a series from the start, so that a rate over it is defined.
        for error_type in ErrorType::ALL {
            sync_errors.with_label_values(&[error_type.as_str()]);
        }
        let sweep_duration = HistogramOpts::new(SWEEP_DURATION, "Duration of sweeps, in seconds.")
            .buckets(SWEEP_BUCKETS.to_vec());
        Self {
            changes_applied: counter_vec(
                &r,
                CHANGES_APPLIED,
                "Rows processed into the target, by table and outcome.",
                &["table", "operation"],
            ),
            sync_errors,
            sweep_duration: register(&r, Histogram::with_opts(sweep_duration).expect("valid metric")),
            batches: int_counter(&r, BATCHES, "Batches applied."),
            sweeps: int_counter(&r, SWEEPS, "Sweeps finished."),
            failed_attempts: int_counter(
                &r,
                FAILED_ATTEMPTS,
                "Failed attempts (batches, sweeps, listener connections).",
            ),
            yielded_seconds: register(
                &r,
                Counter::new(
                    YIELDED_SECONDS,
                    "Time spent deferring work to a busy source since start, in seconds (periods in progress not counted).",
                )
                .expect("valid metric"),
            ),
            lag: gauge(
                &r,
                LAG_SECONDS,
                "Upper bound of how far the target is behind the source, in seconds (a table not applied yet counts from the process's start; NaN without tables).",
            ),
            journal_pending: gauge_vec(
                &r,
                JOURNAL_PENDING,
                "Journaled source changes not yet applied, by table (as of the last sweep).",
                &["table"],
            ),
            journal_stuck: gauge_vec(
                &r,
                JOURNAL_STUCK,
                "Journal rows that no batch will consume, by table (as of the last sweep; the journal health check).",
                &["table"],
            ),
            unresolved: gauge_vec(
                &r,
                UNRESOLVED_ROWS,
                "Rows the target rejected that wait for a retry, by table.",
                &["table"],
            ),
            pool_size: gauge_vec(&r, POOL_SIZE, "Open connections, by database.", &["database"]),
            pool_in_use: gauge_vec(&r, POOL_IN_USE, "Connections in use, by database.", &["database"]),
            pool_max: gauge_vec(&r, POOL_MAX, "Configured pool size, by database.", &["database"]),
            realtime: int_gauge(&r, REALTIME_CONNECTED, "1 while the LISTEN connection is listening."),
            active: int_gauge(
                &r,
                ACTIVE,
                "1 while this process is the active applier (0: standby or starting).",
            ),
            consecutive_failures: int_gauge(&r, CONSECUTIVE_FAILURES, "Attempts failed in a row."),
            yielding: int_gauge(
                &r,
                YIELDING,
                "1 while rowsync defers its work because the source is busy, else 0.",
            ),
            source_sessions: gauge(
                &r,
                SOURCE_ACTIVE_SESSIONS,
                "Active sessions on the source other than rowsync's, at the last look (NaN before one).",
            ),
            capture_intact: gauge_vec(
                &r,
                CAPTURE_INTACT,
                "1 while every capture trigger of the table is in place and enabled and capture could follow every migration, else 0 (as of the last sweep).",
                &["table"],
            ),
            last_sweep: gauge(
                &r,
                LAST_SWEEP,
                "When the last sweep finished, as a Unix timestamp (when the process started, before the first).",
            ),
            divergent_rows: gauge_vec(
                &r,
                DIVERGENT_ROWS,
                "Rows that differed between source and target at the last verification (VERIFY_INTERVAL_MINUTES), by table.",
                &["table"],
            ),
            last_verification: register(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        LAST_VERIFICATION,
                        "When the last verification of a table finished, as a Unix timestamp, by table.",
                    ),
                    &["table"],
                )
                .expect("valid metric"),
            ),
            registry: r,
        }
    }

    /// A table is synced: its series exist from now on, at zero.
    pub(crate) fn table(&self, table: &str) {
        self.applied(table, Counts::default());
        self.unresolved.with_label_values(&[table]).set(0);
    }

    /// Rows processed into the target.
    pub(crate) fn applied(&self, table: &str, counts: Counts) {
        for (operation, value) in [
            ("created", counts.created),
            ("updated", counts.updated),
            ("deleted", counts.deleted),
            ("unchanged", counts.unchanged),
            ("failed", counts.failed),
        ] {
            self.changes_applied
                .with_label_values(&[table, operation])
                .inc_by(value);
        }
    }

    pub(crate) fn batch(&self) {
        self.batches.inc();
    }

    pub(crate) fn sweep(&self, seconds: f64) {
        self.sweeps.inc();
        self.sweep_duration.observe(seconds);
    }

    pub(crate) fn recorded(&self, error_type: &str) {
        self.sync_errors.with_label_values(&[error_type]).inc();
    }

    pub(crate) fn failed_attempt(&self) {
        self.failed_attempts.inc();
    }

    pub(crate) fn yielded(&self, seconds: f64) {
        self.yielded_seconds.inc_by(seconds);
    }

    /// Sets the gauges from `figures` and `pools`, and renders every metric.
    pub(crate) fn render(&self, figures: &Figures, pools: &[(&'static str, PoolUsage)]) -> String {
        // A table not applied yet counts as behind since start (an alert must not wait for a
        // first batch that never comes); /status keeps saying "not known yet".
        let now = std::time::SystemTime::now();
        let lag = figures
            .tables
            .values()
            .map(|t| {
                now.duration_since(t.applied_as_of.unwrap_or(figures.started_at))
                    .unwrap_or_default()
                    .as_secs_f64()
            })
            .fold(None, |worst: Option<f64>, lag| {
                Some(worst.map_or(lag, |w| w.max(lag)))
            });
        self.lag.set(lag.unwrap_or(f64::NAN));
        // Per-table series of tables this process no longer applies go (another process, or no
        // longer configured): an alert must not stay on an old value.
        for vec in [
            &self.journal_pending,
            &self.journal_stuck,
            &self.unresolved,
            &self.divergent_rows,
            &self.capture_intact,
        ] {
            vec.reset();
        }
        self.last_verification.reset();
        for (table, t) in &figures.tables {
            if let Some(pending) = t.pending {
                self.journal_pending
                    .with_label_values(&[table])
                    .set(pending);
            }
            if let Some(stuck) = t.stuck {
                self.journal_stuck.with_label_values(&[table]).set(stuck);
            }
            self.unresolved
                .with_label_values(&[table])
                .set(i64::try_from(t.unresolved).unwrap_or(i64::MAX));
            if let Some(intact) = t.capture_intact {
                self.capture_intact
                    .with_label_values(&[table])
                    .set(i64::from(intact && t.capture_lost.is_none()));
            }
            if let Some(verified) = &t.verified {
                self.divergent_rows
                    .with_label_values(&[table])
                    .set(i64::try_from(verified.divergent_rows).unwrap_or(i64::MAX));
                self.last_verification.with_label_values(&[table]).set(
                    verified
                        .at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64()),
                );
            }
        }
        for (database, usage) in pools {
            let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.pool_size
                .with_label_values(&[database])
                .set(as_i64(usage.size));
            self.pool_in_use
                .with_label_values(&[database])
                .set(as_i64(usage.in_use));
            self.pool_max
                .with_label_values(&[database])
                .set(as_i64(usage.max_size));
        }
        // Before the first sweep: the start, so that "no sweep for N minutes" counts from it.
        let last_sweep = figures
            .last_sweep
            .as_ref()
            .map_or(figures.started_at, |sweep| sweep.finished_at);
        self.last_sweep.set(
            last_sweep
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(f64::NAN, |d| d.as_secs_f64()),
        );
        self.realtime
            .set(i64::from(figures.listener == ListenerState::Listening));
        self.active.set(i64::from(figures.role == Role::Active));
        self.consecutive_failures
            .set(i64::from(figures.consecutive_failures));
        self.yielding.set(i64::from(figures.yielding.is_some()));
        self.source_sessions
            .set(figures.source_active_sessions.map_or(f64::NAN, f64::from));
        let mut out = Vec::new();
        // Encoding into memory fails only on invalid metrics, which the constants rule out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::telemetry::Telemetry;
    use crate::pipeline::apply::Counts;
    use std::time::SystemTime;

    #[test]
    fn renders_every_family_in_text_format() {
        let telemetry = Telemetry::new();
        telemetry.batch(
            "public.users",
            Counts {
                created: 3,
                updated: 2,
                ..Counts::default()
            },
            SystemTime::now(),
        );
        telemetry.recorded("CONSTRAINT_VIOLATION");
        telemetry.source_load(11);
        telemetry.yield_started(10.5);
        let pools = [(
            "source",
            PoolUsage {
                max_size: 10,
                size: 2,
                in_use: 1,
            },
        )];
        let text = telemetry.metrics().render(&telemetry.figures(), &pools);
        for expected in [
            "rowsync_changes_applied_total{operation=\"created\",table=\"public.users\"} 3",
            "rowsync_sync_errors_total{type=\"CONSTRAINT_VIOLATION\"} 1",
            "rowsync_sweep_duration_seconds_bucket{le=\"+Inf\"} 0",
            "rowsync_pool_in_use{database=\"source\"} 1",
            "rowsync_realtime_connected 0",
            "rowsync_build_info{version=",
            "# TYPE rowsync_lag_seconds gauge",
            "rowsync_yielding 1",
            "rowsync_source_active_sessions 11",
            "rowsync_yielded_seconds_total 0",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Every sample line belongs to a family declared before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let metric = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.iter().any(|d| metric.starts_with(d.as_str())),
                    "{metric} has no TYPE line"
                );
            }
        }
    }
}
