//! The sync loop: one task that applies, so batches of a table never run concurrently and are
//! applied in snapshot order.
//!
//! It runs a batch per table ([`SyncLoop::pass`]) whenever the listener rings, after every listener
//! (re)connect, on a short poll timer while idle (the doorbell can race), on `POST /sync`, and as a
//! sweep every `SYNC_INTERVAL_MINUTES` ([`sweep`]). Sweeps are scheduled from the end of the
//! previous one, so they never overlap; a sweep that takes more than 80% of the interval logs a
//! warning.
//!
//! Before it waits, the loop arms the source's doorbell (only while the listener is listening) and
//! looks at the journals once more, so a change committed just before arming is not left waiting for
//! the poll timer; it does so again only once the bell has rung (an idle poll is one look). While
//! the source is busy the loop yields: it takes no batches for up to `YIELD_MAX_SECONDS`
//! ([`crate::runtime::yielding`]). A failed pass is retried with backoff
//! ([`failures`]).
//!
//! Shutdown: cancellation is checked between batches, never inside one; the caller bounds how long
//! the in-flight batch may take (`SHUTDOWN_TIMEOUT_SECONDS`).

mod configuration;
mod failures;
mod sweep;
mod tables;

pub(crate) use self::tables::Table;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::ident::QualifiedName;
use crate::config::DatabaseRole;
use crate::config::TableSpec;
use crate::connection::{SessionLimits, Within};
use crate::error::{Result, SqlContext};
use crate::pipeline::batch::{BatchKind, BatchOutcome, Look, TableSync};
use crate::runtime::daemon::{Context, Ownership, Started};
use crate::runtime::yielding::{Yield, Yielder};
use crate::source::capture::{self, CaptureState};
use crate::source::listener::ListenerState;
use crate::target::sync_errors::{self, OpenRow};

use self::configuration::configuration_changed;

/// Under a continuous stream of changes, how long to let changes gather before the next batch,
/// given how many rows the last pass applied: 0.2 ms per row, between 10 and 40 ms.
///
/// Each batch has a fixed cost (about a dozen round trips, a snapshot and a commit on each side),
/// so bigger batches cost both servers much less per change. The rule settles by itself: below
/// about 5,000 changes/s the last pass is small and the spacing stays at 10 ms (latency first);
/// above, it grows to 40 ms and batches grow with it (throughput first, when the source is busy).
/// Measured on a 1M-row table under 16 writers: ~47 µs of consumer CPU per change at 10 ms,
/// ~34 µs at 40 ms.
fn batch_spacing(last_rows: u64) -> Duration {
    Duration::from_micros(last_rows.saturating_mul(200))
        .clamp(Duration::from_millis(10), Duration::from_millis(40))
}

pub(crate) struct SyncLoop {
    context: Context,
    tables: Vec<Table>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    yielder: Yielder,
    next_sweep: Instant,
    /// The configured table list, which a reload may change (see [`configuration`]).
    configured: watch::Receiver<Vec<TableSpec>>,
    /// The tables whose locks this process holds, which may change too.
    ownership: Ownership,
    /// The table list before the last change.
    configured_before: Vec<TableSpec>,
    /// Tables a reload added that are not set up yet: set up first when this process holds them
    /// (a table this process takes over is only loaded).
    to_set_up: Vec<TableSpec>,
    /// Tables added by a reload, being set up (capture, copy) in the background; each joins
    /// `tables` when its setup ends, set up or failing.
    adding: Vec<(Table, JoinHandle<Result<()>>)>,
    /// Setups of tables handed over to another process while they ran, finishing here.
    finishing: Vec<(TableSpec, JoinHandle<Result<()>>)>,
    /// Not a turn yet: the first follows the configuration whether or not it changed since the
    /// start read it (tables to set up, a reload in between).
    first_turn: bool,
    /// The doorbell is armed as far as this loop knows: it armed it, looked at the journals once
    /// more after, and has heard no ring since (a writer that finds it armed disarms it and
    /// rings). While so, an idle poll is one look at the journals, without arming it again and
    /// looking twice.
    bell_armed: bool,
}

/// What one pass (or several) did.
#[derive(Debug, Default)]
struct PassOutcome {
    /// Rows applied; None when nothing changed anywhere.
    applied: Option<u64>,
    /// Tables whose attempt went through.
    succeeded: usize,
    /// Tables whose attempt failed: `table: error`.
    failed: Vec<String>,
}

impl PassOutcome {
    fn add(&mut self, other: PassOutcome) {
        if let Some(rows) = other.applied {
            *self.applied.get_or_insert(0) += rows;
        }
        self.succeeded += other.succeeded;
        self.failed.extend(other.failed);
    }
}

/// What the loop does after one turn.
enum Next {
    /// Take the next batch at once (a failure's backoff, if any, is over).
    Again,
    /// Changes are flowing: the next batch after the batch spacing, unless the source is busy.
    Spaced {
        rows: u64,
        pass_started: Instant,
    },
    /// Nothing to do: wait for a doorbell, the poll timer, a request or the next sweep.
    Idle,
    Stop,
}

impl SyncLoop {
    pub(crate) fn new(
        context: Context,
        ownership: Ownership,
        started: Started,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Self {
        let Started {
            tables,
            to_set_up,
            configured: configured_before,
        } = started;
        Self {
            yielder: Yielder::new(&context.settings),
            // The first sweep runs at once: it catches up on everything journaled while rowsync
            // was stopped, and on rows updated within the lookback window.
            next_sweep: Instant::now(),
            configured: context.tables.clone(),
            configured_before,
            first_turn: true,
            to_set_up,
            ownership,
            adding: Vec::new(),
            finishing: Vec::new(),
            bell_armed: false,
            context,
            tables,
            wake,
            shutdown,
        }
    }

    pub(crate) async fn run(&mut self) {
        let settings = &self.context.settings;
        info!(
            tables = self.tables.len(),
            interval_ms = settings.sync_interval.as_millis() as u64,
            lookback_ms = settings.sweep_lookback.as_millis() as u64,
            "sync loop started"
        );
        while !self.shutdown.is_cancelled() {
            let next = match self.turn().await {
                Next::Spaced { rows, pass_started } => self.space_out(rows, pass_started).await,
                Next::Idle => self.idle().await,
                other => other,
            };
            if matches!(next, Next::Stop) {
                break;
            }
        }
        // The totals are logged once, by the caller, when the process stops.
        info!("sync loop stopped");
    }

    /// One pass, or the sweep when it is due; then what to do next.
    async fn turn(&mut self) -> Next {
        self.context.telemetry.beat();
        self.follow_configuration().await;
        let pass_started = Instant::now();
        let sweep_due = pass_started >= self.next_sweep;
        let outcome = if sweep_due {
            self.sweep().await
        } else {
            self.pass(BatchKind::Stream).await
        };
        if sweep_due {
            self.next_sweep = Instant::now() + self.context.settings.sync_interval;
        }
        match outcome.applied {
            Some(rows) => Next::Spaced { rows, pass_started },
            None => {
                if outcome.failed.is_empty() {
                    self.yielder.caught_up();
                }
                Next::Idle
            }
        }
    }

    /// After a pass that applied rows: yield to a busy source, then wait out the batch spacing.
    async fn space_out(&mut self, rows: u64, pass_started: Instant) -> Next {
        let context = &self.context;
        match self.yielder.yield_if_busy(context, &self.shutdown).await {
            Yield::Go => {}
            Yield::SweepRequested => {
                self.next_sweep = Instant::now();
                return Next::Again;
            }
            Yield::Shutdown => return Next::Stop,
        }
        let until = pass_started + batch_spacing(rows);
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Next::Stop,
            _ = tokio::time::sleep_until(until.into()) => Next::Again,
        }
    }

    /// Nothing to apply: arm the doorbell and look once more (unless it is still armed), then
    /// wait.
    async fn idle(&mut self) -> Next {
        if self.context.telemetry.listener() != ListenerState::Listening {
            self.bell_armed = false;
        } else if !self.bell_armed {
            match self.arm_doorbell().await {
                // Something may have been committed just before the bell was armed.
                Ok(armed) => {
                    if self.pass(BatchKind::Stream).await.applied.is_some() {
                        return Next::Again;
                    }
                    self.bell_armed = armed;
                }
                Err(err) => {
                    debug!(error = %crate::error::chain(&err), "could not arm the doorbell")
                }
            }
        }
        let context = &self.context;
        tokio::select! {
            biased;
            // Each arm is cancel-safe: they only wait.
            _ = self.shutdown.cancelled() => return Next::Stop,
            _ = context.requests.requested() => self.next_sweep = Instant::now(),
            // A ring (or the listener listening again): the bell is not armed any more.
            _ = self.wake.notified() => self.bell_armed = false,
            _ = configuration_changed(self.configured.clone()) => {}
            _ = configuration_changed(self.ownership.owned.clone()) => {}
            _ = tokio::time::sleep(context.settings.poll_interval) => {}
            _ = tokio::time::sleep_until(self.next_sweep.into()) => {}
        }
        Next::Again
    }

    /// One batch per table whose turn it is (a table that failed waits out its backoff; the
    /// others go on). A table not loaded yet is loaded first.
    async fn pass(&mut self, kind: BatchKind) -> PassOutcome {
        let mut outcome = PassOutcome::default();
        let now = Instant::now();
        // A stream batch reads only the journal: a table whose journal is empty has nothing for
        // it. One look at every journal spares each idle table its own transaction (hundreds of
        // idle tables cost next to nothing); a sweep still checks each table's capture and
        // retries, and opens a batch only when they ask for one.
        let quiet = self.quiet_tables().await;
        let mut swept = match kind {
            BatchKind::Sweep { .. } => self.sweep_look().await,
            BatchKind::Stream => Vec::new(),
        }
        .into_iter();
        for index in 0..self.tables.len() {
            let (capture, open) = swept.next().unwrap_or_default();
            if self.shutdown.is_cancelled() {
                break;
            }
            // (A table whose setup failed is set up again, not loaded: see `configuration`.)
            if !self.tables[index].due(now) || self.tables[index].setup_failed {
                continue;
            }
            // (A table that has been failing gets its batch all the same: succeeding is how it
            // is seen to have recovered.)
            let quiet_since = quiet
                .as_ref()
                .filter(|(quiet, _)| quiet.get(index).copied().unwrap_or(false))
                .filter(|_| self.tables[index].failures() == 0)
                .map(|(_, looked_at)| *looked_at);
            if let (Some(looked_at), BatchKind::Stream) = (quiet_since, kind) {
                // Everything committed before the look is applied (journal rows go only once
                // applied, by every mapping of their source).
                self.context
                    .telemetry
                    .checked(&self.tables[index].name, looked_at);
                continue;
            }
            let look = Look {
                quiet_since,
                capture,
                open,
            };
            match self.attempt(index, kind, look).await {
                Ok(applied) => {
                    outcome.succeeded += 1;
                    if let Some(rows) = applied {
                        *outcome.applied.get_or_insert(0) += rows;
                    }
                    self.table_succeeded(index).await;
                }
                Err(error) => {
                    let name = self.tables[index].name.clone();
                    outcome
                        .failed
                        .push(format!("{name}: {}", crate::error::chain(&error)));
                    self.table_failed(index, error).await;
                }
            }
        }
        outcome
    }

    /// The table's batch (after loading it if need be). Returns how many rows it applied, or
    /// None when nothing changed.
    async fn attempt(&mut self, index: usize, kind: BatchKind, look: Look) -> Result<Option<u64>> {
        let table = &mut self.tables[index];
        if table.load(&self.context).await? {
            // Loaded just now: its first batch runs at once.
            return Ok(Some(0));
        }
        let Some(sync) = &mut table.sync else {
            return Ok(None);
        };
        let outcome = sync.run_batch(&self.context.pools, kind, look).await?;
        // A batch went through on this mapping: a later schema failure may read it again.
        table.reloaded_for_schema = false;
        Ok(match outcome {
            BatchOutcome::Applied(report) => {
                debug!(
                    table = %report.table,
                    created = report.counts.created,
                    updated = report.counts.updated,
                    deleted = report.counts.deleted,
                    unchanged = report.counts.unchanged,
                    failed = report.counts.failed,
                    duration_ms = report.duration.as_millis() as u64,
                    "batch applied"
                );
                Some(report.counts.total())
            }
            BatchOutcome::Nothing => None,
            BatchOutcome::ProgressMoved => {
                info!(table = %sync.name(), "progress was moved by another process; reloaded it");
                // Not idle: the table's batch runs again at once.
                Some(0)
            }
        })
    }

    /// For each table, whether it is loaded and its journal holds no row at all, from one query
    /// over every journal; and when the look was taken. None when it cannot be told now (every
    /// table then gets its batch, as without this).
    async fn quiet_tables(&self) -> Option<(Vec<bool>, std::time::SystemTime)> {
        let journals: Vec<Option<String>> = self
            .tables
            .iter()
            .map(|t| {
                let sync = t.sync.as_ref()?;
                sync.mapping.journal.as_ref().map(|j| j.quoted())
            })
            .collect();
        if journals.iter().all(Option::is_none) {
            return None;
        }
        let sql = format!(
            "SELECT ARRAY[{}]",
            journals
                .iter()
                .map(|journal| match journal {
                    Some(journal) => format!("NOT EXISTS (SELECT 1 FROM {journal})"),
                    None => "false".to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        let looked_at = std::time::SystemTime::now();
        // Bounded as a whole (the session, the statement, the answer): a source that went away
        // must not stall the loop here.
        let looking = || "looking at the journals".to_string();
        let looked = async {
            let source = self.context.pools.source().await?;
            let statement = source
                .prepare_cached(&sql)
                .await
                .context(DatabaseRole::Source, looking)?;
            source
                .query_one(&statement, &[])
                .await
                .context(DatabaseRole::Source, looking)
        }
        .within(self.limit(), DatabaseRole::Source, looking)
        .await;
        match looked {
            Ok(row) => Some((row.get(0), looked_at)),
            Err(err) => {
                debug!(error = %crate::error::chain(&err), "could not look at the journals; every table gets its batch");
                None
            }
        }
    }

    /// For a sweep, each table's capture and unresolved rows, from one query on each side for
    /// all of them (in the tables' order; a table not loaded, or whatever could not be told now,
    /// is None, and its batch asks for itself).
    async fn sweep_look(&self) -> Vec<(Option<CaptureState>, Option<Vec<OpenRow>>)> {
        let loaded: Vec<Option<&TableSync>> = self.tables.iter().map(|t| t.sync.as_ref()).collect();
        let sources: Vec<&QualifiedName> =
            loaded.iter().flatten().map(|s| &s.mapping.source).collect();
        if sources.is_empty() {
            return Vec::new();
        }
        let names: Vec<String> = loaded.iter().flatten().map(|s| s.name()).collect();
        let pools = &self.context.pools;
        let captures = async {
            let source = pools.source().await?;
            capture::capture_states(&**source, &sources).await
        }
        .within(self.limit(), DatabaseRole::Source, || {
            "checking capture".into()
        });
        let open = async {
            let target = pools.target().await?;
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            sync_errors::unresolved_rows_of(&**target, &names).await
        }
        .within(self.limit(), DatabaseRole::Target, || {
            "reading sync_errors".into()
        });
        let (captures, open) = tokio::join!(captures, open);
        let mut captures = captures
            .map_err(|err| warn!(error = %crate::error::chain(&err), "could not check the tables' capture at once; each table checks its own this sweep"))
            .ok()
            .map(Vec::into_iter);
        let mut open = open
            .map_err(|err| warn!(error = %crate::error::chain(&err), "could not read sync_errors at once; each table reads its own this sweep"))
            .ok();
        loaded
            .iter()
            .map(|sync| {
                let Some(sync) = sync else {
                    return (None, None);
                };
                let capture = captures.as_mut().and_then(|c| c.next()).flatten();
                let rows = open
                    .as_mut()
                    .map(|open| open.remove(&sync.name()).unwrap_or_default());
                (capture, rows)
            })
            .collect()
    }

    /// True when the bell is armed now; false when a writer is ringing it (its notification
    /// is on the way).
    async fn arm_doorbell(&self) -> Result<bool> {
        let source = self.context.pools.source().await?;
        capture::arm_doorbell(&**source)
            .within(self.limit(), DatabaseRole::Source, || {
                "arming the doorbell".into()
            })
            .await
    }

    fn limit(&self) -> Duration {
        SessionLimits::from_settings(&self.context.settings).client_timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_spacing_favours_latency_when_light_and_throughput_when_busy() {
        assert_eq!(batch_spacing(0), Duration::from_millis(10));
        assert_eq!(batch_spacing(10), Duration::from_millis(10));
        assert_eq!(batch_spacing(100), Duration::from_millis(20));
        assert_eq!(batch_spacing(5_000), Duration::from_millis(40));
        assert_eq!(batch_spacing(u64::MAX), Duration::from_millis(40));
    }
}
