//! What rowsync is doing, for operators: written by the sync loop, read by the HTTP endpoints,
//! the systemd notifications, the metrics and `rowsync status`.
//!
//! Everything is in one mutex-guarded struct with short critical sections (no I/O under the lock),
//! plus an atomic heartbeat that the sync loop beats whenever it makes progress: the systemd
//! watchdog is only fed while the heartbeat is fresh.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::ops::metrics::Metrics;
use crate::pipeline::apply::Counts;
use crate::source::capture::JournalRows;
use crate::source::listener::ListenerState;

/// Whether this process applies changes or waits as a hot standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Not yet connected or not yet elected.
    Starting,
    /// Another rowsync process holds the leader lock; this one takes over if it goes away.
    Standby,
    /// This process applies changes.
    Active,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Standby => "standby",
            Self::Active => "active",
        }
    }
}

/// Per-table figures.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct TableFigures {
    /// Since this process started.
    pub counts: Counts,
    /// Journaled changes not yet applied (as of the last sweep).
    pub pending: Option<i64>,
    /// Journal rows that no batch will consume (as of the last sweep; see `JournalRows`).
    pub stuck: Option<i64>,
    /// Rows the target rejected that wait for a retry.
    pub unresolved: usize,
    /// All capture triggers exist and are `ENABLE ALWAYS` (as of the last sweep; None before).
    pub capture_intact: Option<bool>,
    /// Since when and why writes could not be journaled (a migration capture could not follow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_lost: Option<String>,
    /// Set while the table's attempts fail (the others go on meanwhile).
    pub failing: Option<TableFailure>,
    /// The last verification of the table (`VERIFY_INTERVAL_MINUTES`), once there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verification>,
    /// The source snapshot most recently known to be fully applied was taken at this time.
    #[serde(skip)]
    pub applied_as_of: Option<SystemTime>,
    #[serde(skip)]
    pub last_batch_at: Option<SystemTime>,
    /// Rows written (created, updated, deleted) per minute, the last hour.
    #[serde(skip)]
    pub per_minute: PerMinute,
}

/// Counts per wall-clock minute over the last [`PerMinute::MINUTES`] minutes: a ring indexed by
/// the minute, each slot knowing which minute it holds (so a clock set back or forward never
/// mixes minutes up, and nothing grows).
#[derive(Debug, Clone)]
pub(crate) struct PerMinute {
    /// (minute since the Unix epoch, count) per `minute % MINUTES`.
    slots: [(u64, u64); PerMinute::MINUTES as usize],
}

impl Default for PerMinute {
    fn default() -> Self {
        Self {
            slots: [(u64::MAX, 0); Self::MINUTES as usize],
        }
    }
}

impl PerMinute {
    pub(crate) const MINUTES: u64 = 60;

    fn minute(at: SystemTime) -> u64 {
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / 60
    }

    /// Adds `count` to the minute of `at`.
    pub(crate) fn add(&mut self, at: SystemTime, count: u64) {
        let minute = Self::minute(at);
        let slot = &mut self.slots[(minute % Self::MINUTES) as usize];
        if slot.0 == minute {
            slot.1 += count;
        } else {
            *slot = (minute, count);
        }
    }

    /// One count per minute of the last hour up to the minute of `now`, oldest first (0 for a
    /// minute without any).
    pub(crate) fn last_hour(&self, now: SystemTime) -> Vec<u64> {
        let current = Self::minute(now);
        (0..Self::MINUTES)
            .rev()
            .map(|ago| {
                let minute = current.saturating_sub(ago);
                let (held, count) = self.slots[(minute % Self::MINUTES) as usize];
                if held == minute { count } else { 0 }
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SweepSummary {
    #[serde(skip)]
    pub finished_at: SystemTime,
    pub duration: Duration,
    pub counts: Counts,
}

/// A copy of the figures at one moment.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figures {
    pub role: Role,
    /// Which rowsync process (`host:pid`) applies each configured table, as this one's lock
    /// session last saw it ("nobody" while no process holds it).
    pub owners: BTreeMap<String, String>,
    #[serde(skip)]
    pub started_at: SystemTime,
    pub totals: Counts,
    pub tables: BTreeMap<String, TableFigures>,
    pub batches: u64,
    pub sweeps: u64,
    pub last_sweep: Option<SweepSummary>,
    pub sweep_in_progress: bool,
    /// Failed attempts (batches, sweeps, listener connections) since start.
    pub errors: u64,
    /// Failures recorded in sync_errors, by error_type, since start.
    pub errors_by_type: BTreeMap<String, u64>,
    pub consecutive_failures: u32,
    pub listener: ListenerState,
    /// The start-up catch-up is done.
    pub caught_up: bool,
    /// Share of failed work (rows rejected, attempts failed) over the last ten minutes.
    pub error_rate: f64,
    /// Seconds since the newest source snapshot known to be fully applied, as an upper bound on
    /// how far the target is behind (None before the first batch).
    pub lag_seconds: Option<f64>,
    /// Set while rowsync defers its work because the source is busy.
    pub yielding: Option<Yielding>,
    /// Time spent yielding since start.
    pub yielded: Duration,
    /// Active sessions on the source at the last look (rowsync's own not counted).
    pub source_active_sessions: Option<u32>,
    /// Since when, and why, this process cannot open its lock session on the target (so holds
    /// and applies no table, whatever its role says). None while it can.
    #[serde(skip)]
    pub lock_unreachable: Option<(SystemTime, String)>,
}

/// What the daemon's last verification of a table found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verification {
    #[serde(serialize_with = "serialize_rfc3339")]
    pub at: SystemTime,
    pub divergent_rows: u64,
    pub missing: u64,
    pub extra: u64,
    pub different: u64,
    /// The rows found were journaled for the daemon to apply (`REPAIR_AUTOMATICALLY`).
    pub repaired: bool,
}

fn serialize_rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*time))
}

/// A table whose attempts fail.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TableFailure {
    /// Failed attempts in a row.
    pub failures: u32,
    /// The last error.
    pub error: String,
    /// Retrying will not fix it by itself (a schema problem, a missing privilege).
    pub permanent: bool,
}

/// A period of deferring work to a busy source.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Yielding {
    #[serde(skip)]
    pub since: SystemTime,
    /// Why: the mean of the last looks at the source's active sessions.
    pub active_sessions: f64,
}

/// Figures, and the few signals that go with them.
pub(crate) struct Telemetry {
    state: Mutex<State>,
    metrics: Metrics,
    started: Instant,
    heartbeat_ms: AtomicU64,
}

struct State {
    figures: Figures,
    /// Per second: (second since start, work done, work failed), the last ten minutes.
    recent: VecDeque<(u64, u64, u64)>,
}

const RECENT_WINDOW_SECS: u64 = 600;

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                figures: Figures {
                    role: Role::Starting,
                    owners: BTreeMap::new(),
                    started_at: SystemTime::now(),
                    totals: Counts::default(),
                    tables: BTreeMap::new(),
                    batches: 0,
                    sweeps: 0,
                    last_sweep: None,
                    sweep_in_progress: false,
                    errors: 0,
                    errors_by_type: BTreeMap::new(),
                    consecutive_failures: 0,
                    listener: ListenerState::Connecting,
                    caught_up: false,
                    error_rate: 0.0,
                    lag_seconds: None,
                    yielding: None,
                    yielded: Duration::ZERO,
                    source_active_sessions: None,
                    lock_unreachable: None,
                },
                recent: VecDeque::new(),
            }),
            metrics: Metrics::new(),
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Figures are plain numbers: a panic elsewhere cannot leave them in a harmful state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The Prometheus metrics, kept as things happen.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn figures(&self) -> Figures {
        let now = SystemTime::now();
        let state = self.lock();
        let mut figures = state.figures.clone();
        let (done, failed) = state
            .recent
            .iter()
            .fold((0, 0), |(d, f), (_, done, failed)| (d + done, f + failed));
        figures.error_rate = if done == 0 {
            0.0
        } else {
            failed as f64 / done as f64
        };
        figures.lag_seconds = figures
            .tables
            .values()
            .map(|t| t.applied_as_of)
            .collect::<Option<Vec<_>>>()
            .and_then(|times| times.into_iter().min())
            .map(|oldest| now.duration_since(oldest).unwrap_or_default().as_secs_f64());
        figures
    }

    /// The sync loop made progress (a call returned, a batch ended, an idle wait passed).
    pub(crate) fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last [`beat`](Self::beat).
    pub(crate) fn heartbeat_age(&self) -> Duration {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }

    /// The source's active sessions, as last seen.
    pub(crate) fn source_load(&self, active_sessions: u32) {
        self.lock().figures.source_active_sessions = Some(active_sessions);
    }

    /// rowsync starts deferring its work to a busy source.
    pub(crate) fn yield_started(&self, active_sessions: f64) {
        self.lock().figures.yielding = Some(Yielding {
            since: SystemTime::now(),
            active_sessions,
        });
    }

    /// The yield is over; its duration is added to the total.
    pub(crate) fn yield_ended(&self) {
        let mut state = self.lock();
        if let Some(yielding) = state.figures.yielding.take() {
            let yielded = yielding.since.elapsed().unwrap_or_default();
            state.figures.yielded += yielded;
            self.metrics.yielded(yielded.as_secs_f64());
        }
    }

    pub(crate) fn set_role(&self, role: Role) {
        self.lock().figures.role = role;
    }

    /// The lock session on the target could not be opened (`error`), or could again (None).
    pub(crate) fn lock_session(&self, error: Option<String>) {
        let figures = &mut self.lock().figures;
        figures.lock_unreachable = match (error, figures.lock_unreachable.take()) {
            (None, _) => None,
            (Some(error), Some((since, _))) => Some((since, error)),
            (Some(error), None) => Some((SystemTime::now(), error)),
        };
    }

    pub(crate) fn set_owners(&self, owners: BTreeMap<String, String>) {
        self.lock().figures.owners = owners;
    }

    pub(crate) fn set_listener(&self, listener: ListenerState) {
        self.lock().figures.listener = listener;
    }

    pub(crate) fn listener(&self) -> ListenerState {
        self.lock().figures.listener
    }

    /// A listener connection attempt failed (not a sync failure: sweeps and polling go on).
    pub(crate) fn listener_failure(&self) {
        self.lock().figures.errors += 1;
        self.metrics.failed_attempt();
    }

    pub(crate) fn add_table(&self, table: &str) {
        self.lock()
            .figures
            .tables
            .entry(table.to_string())
            .or_default();
        self.metrics.table(table);
    }

    /// A batch of `table` was applied; its snapshot was taken at `snapshot_at`.
    pub(crate) fn batch(&self, table: &str, counts: Counts, snapshot_at: SystemTime) {
        let second = self.started.elapsed().as_secs();
        let mut state = self.lock();
        state.figures.totals += counts;
        state.figures.batches += 1;
        let figures = state.figures.tables.entry(table.to_string()).or_default();
        figures.counts += counts;
        figures.applied_as_of = Some(snapshot_at);
        let now = SystemTime::now();
        figures.last_batch_at = Some(now);
        figures
            .per_minute
            .add(now, counts.created + counts.updated + counts.deleted);
        record_recent(&mut state.recent, second, counts.total(), counts.failed);
        self.metrics.applied(table, counts);
        self.metrics.batch();
    }

    /// `table` had nothing to apply in the snapshot taken at `snapshot_at`.
    pub(crate) fn checked(&self, table: &str, snapshot_at: SystemTime) {
        let mut state = self.lock();
        let figures = state.figures.tables.entry(table.to_string()).or_default();
        figures.applied_as_of = Some(snapshot_at);
    }

    pub(crate) fn set_table_backlog(
        &self,
        table: &str,
        journal: Option<JournalRows>,
        unresolved: usize,
    ) {
        let mut state = self.lock();
        let figures = state.figures.tables.entry(table.to_string()).or_default();
        if let Some(journal) = journal {
            figures.pending = Some(journal.rows);
            figures.stuck = Some(journal.stuck);
        }
        figures.unresolved = unresolved;
    }

    pub(crate) fn set_capture(&self, table: &str, intact: bool, lost: Option<String>) {
        let mut state = self.lock();
        let figures = state.figures.tables.entry(table.to_string()).or_default();
        figures.capture_intact = Some(intact);
        figures.capture_lost = lost;
    }

    /// An attempt failed (`consecutive` in a row so far).
    pub(crate) fn failure(&self, consecutive: u32) {
        let second = self.started.elapsed().as_secs();
        let mut state = self.lock();
        state.figures.errors += 1;
        state.figures.consecutive_failures = consecutive;
        record_recent(&mut state.recent, second, 1, 1);
        self.metrics.failed_attempt();
    }

    /// An attempt of `table` failed (`failures` in a row); `permanent` when retrying will not fix
    /// it by itself.
    pub(crate) fn table_failing(&self, table: &str, failures: u32, error: &str, permanent: bool) {
        let mut state = self.lock();
        state
            .figures
            .tables
            .entry(table.to_string())
            .or_default()
            .failing = Some(TableFailure {
            failures,
            error: error.to_string(),
            permanent,
        });
    }

    /// A verification of `table` ended.
    pub(crate) fn verified(&self, table: &str, verification: Verification) {
        if let Some(figures) = self.lock().figures.tables.get_mut(table) {
            figures.verified = Some(verification);
        }
    }

    /// `table` is known by another name now.
    pub(crate) fn forget_table(&self, table: &str) {
        self.lock().figures.tables.remove(table);
    }

    /// `table` works again.
    pub(crate) fn table_recovered(&self, table: &str) {
        if let Some(figures) = self.lock().figures.tables.get_mut(table) {
            figures.failing = None;
        }
    }

    pub(crate) fn recovered(&self) {
        self.lock().figures.consecutive_failures = 0;
    }

    /// A failure of `error_type` was recorded in sync_errors.
    pub(crate) fn recorded(&self, error_type: &str) {
        *self
            .lock()
            .figures
            .errors_by_type
            .entry(error_type.to_string())
            .or_default() += 1;
        self.metrics.recorded(error_type);
    }

    pub(crate) fn sweep_started(&self) {
        self.lock().figures.sweep_in_progress = true;
    }

    pub(crate) fn sweep_finished(&self, summary: Option<SweepSummary>) {
        let mut state = self.lock();
        state.figures.sweep_in_progress = false;
        if let Some(summary) = summary {
            state.figures.sweeps += 1;
            self.metrics.sweep(summary.duration.as_secs_f64());
            state.figures.last_sweep = Some(summary);
            state.figures.caught_up = true;
        }
    }
}

fn record_recent(recent: &mut VecDeque<(u64, u64, u64)>, second: u64, done: u64, failed: u64) {
    match recent.back_mut() {
        Some((s, d, f)) if *s == second => {
            *d += done;
            *f += failed;
        }
        _ => recent.push_back((second, done, failed)),
    }
    while recent
        .front()
        .is_some_and(|(s, _, _)| s + RECENT_WINDOW_SECS < second)
    {
        recent.pop_front();
    }
}

/// `2026-11-22T18:09:08.741Z`: RFC 3339 in UTC, to the millisecond.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn rfc3339_formats_utc_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.000Z");
    }

    #[test]
    fn error_rate_counts_failed_work_over_recent_work() {
        let telemetry = Telemetry::new();
        telemetry.add_table("t");
        telemetry.batch(
            "t",
            Counts {
                created: 97,
                failed: 1,
                ..Counts::default()
            },
            SystemTime::now(),
        );
        telemetry.failure(1);
        telemetry.failure(2);
        let figures = telemetry.figures();
        assert_eq!(figures.errors, 2);
        assert_eq!(figures.consecutive_failures, 2);
        assert!(
            (figures.error_rate - 3.0 / 100.0).abs() < 1e-9,
            "{}",
            figures.error_rate
        );
    }

    #[test]
    fn lag_is_the_oldest_tables_staleness() {
        let telemetry = Telemetry::new();
        assert_eq!(telemetry.figures().lag_seconds, None);
        let now = SystemTime::now();
        telemetry.checked("a", now - Duration::from_secs(5));
        telemetry.checked("b", now);
        let lag = telemetry.figures().lag_seconds.unwrap();
        assert!((5.0..6.0).contains(&lag), "{lag}");
    }

    #[test]
    fn per_minute_counts_keep_the_last_hour_by_wall_clock_minute() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000 * 60);
        let mut counts = PerMinute::default();
        counts.add(start, 5);
        counts.add(start + Duration::from_secs(30), 2);
        counts.add(start + Duration::from_secs(120), 1);
        let hour = counts.last_hour(start + Duration::from_secs(120));
        assert_eq!(hour.len(), 60);
        assert_eq!(&hour[57..], &[7, 0, 1]);
        // An hour on, the first minute has gone.
        counts.add(start + Duration::from_secs(3600), 4);
        let hour = counts.last_hour(start + Duration::from_secs(3600));
        assert_eq!(hour.iter().sum::<u64>(), 5);
        assert_eq!(hour[59], 4);
        // The clock set back a minute and forward again: each minute keeps its own count.
        let now = start + Duration::from_secs(3600);
        counts.add(now - Duration::from_secs(60), 3);
        counts.add(now, 1);
        let hour = counts.last_hour(now);
        assert_eq!(&hour[58..], &[3, 5]);
    }
}
