//! The daemon behind `rowsync run`: leadership, the listener, and the sync loop.
//!
//! A process first takes the leader lock ([`crate::runtime::leader`]); until it has it, it stands by. As the
//! active instance it runs the listener and the sync loop. If it loses the lock it stops applying at
//! once (the batch in flight is rolled back) and stands by again.
//!
//! One task applies, so batches of a table never run concurrently and are applied in snapshot
//! order. It runs a batch per table whenever the listener rings, after every listener (re)connect,
//! on a short poll timer while idle (the doorbell can race), on `POST /sync`, and as a sweep every
//! `SYNC_INTERVAL_MINUTES`. Sweeps are scheduled from the end of the previous one, so they never
//! overlap; a sweep that takes more than 80% of the interval logs a warning.
//!
//! Before it waits, the loop arms the source's doorbell (only while the listener is listening) and
//! looks at the journals once more, so a change committed just before arming is not left waiting for
//! the poll timer.
//!
//! While the source is busy the loop yields: it takes no batches for up to `YIELD_MAX_SECONDS`
//! ([`crate::runtime::yielding`]).
//!
//! Shutdown: cancellation is checked between batches, never inside one; the caller bounds how long
//! the in-flight batch may take (`SHUTDOWN_TIMEOUT_SECONDS`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{DatabaseRole, Settings};
use crate::connection::{Pools, SessionLimits, bounded};
use crate::error::policy::{self, ErrorType};
use crate::error::{Error, Result};
use crate::ops::telemetry::{Role, SweepSummary, Telemetry};
use crate::pipeline::apply::Counts;
use crate::pipeline::batch::{BatchKind, TableSync};
use crate::runtime::leader;
use crate::runtime::retry::Backoff;
use crate::runtime::yielding::{self, SourceLoad};
use crate::source::capture;
use crate::source::listener::{self, ListenerState};
use crate::target::runs::{self, Kind};
use crate::target::{migrate, sync_errors};

/// Runs the daemon until `shutdown` is cancelled: standing by, or active, as the leader lock says.
pub(crate) async fn run(
    settings: Arc<Settings>,
    pools: Pools,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut abandoned = None;
    loop {
        let Some(leadership) =
            leader::acquire(&settings, &telemetry, &shutdown, abandoned.take()).await?
        else {
            return Ok(());
        };
        telemetry.set_role(Role::Active);
        let lost = leadership.lost();
        let stop = shutdown.child_token();
        let active = run_active(
            settings.clone(),
            pools.clone(),
            telemetry.clone(),
            stop.clone(),
        );
        tokio::pin!(active);
        let outcome = tokio::select! {
            // Cancel-safe: losing the lock means stopping at once; the batch in flight is dropped
            // and its transactions roll back with their sessions.
            _ = lost.cancelled() => None,
            result = &mut active => Some(result),
        };
        stop.cancel();
        let session = leadership.session();
        drop(leadership);
        match outcome {
            Some(result) => return result,
            None => {
                abandoned = Some(session);
                warn!("lost the leader lock: stopped applying, standing by");
                telemetry.set_role(Role::Standby);
                pools.evict_idle();
            }
        }
    }
}

/// The active instance's work, until `stop`.
async fn run_active(
    settings: Arc<Settings>,
    pools: Pools,
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) -> Result<()> {
    let Some(tables) = start(&settings, &pools, &telemetry, &stop).await? else {
        return Ok(());
    };
    let wake = Arc::new(Notify::new());
    let listener = tokio::spawn(listener::run(
        settings.clone(),
        pools.clone(),
        wake.clone(),
        telemetry.clone(),
        stop.clone(),
    ));
    let mut sync = SyncLoop {
        load: SourceLoad::new(settings.yielding),
        settings,
        pools,
        tables,
        telemetry,
        wake,
        shutdown: stop,
    };
    sync.run().await;
    let _ = listener.await;
    Ok(())
}

/// Migrates the target and loads every table, retrying while the databases are unreachable.
/// Returns None if stopped meanwhile.
async fn start(
    settings: &Settings,
    pools: &Pools,
    telemetry: &Arc<Telemetry>,
    stop: &CancellationToken,
) -> Result<Option<Vec<TableSync>>> {
    let mut backoff = Backoff::new(&settings.retry);
    loop {
        let attempt = async {
            let mut target = pools.target().await?;
            let applied = migrate::migrate(&mut target).await?;
            if !applied.is_empty() {
                info!(migrations = ?applied, "applied target migrations");
            }
            let closed = runs::close_interrupted(&**target).await?;
            if closed > 0 {
                info!(
                    runs = closed,
                    "marked runs cut short by a previous process as failed"
                );
            }
            drop(target);
            let mut tables = Vec::new();
            for table in &settings.tables {
                let mut sync = TableSync::load(pools, table, settings, telemetry.clone()).await?;
                let cleaned = sync.clean_journal(pools).await?;
                if cleaned > 0 {
                    debug!(table = %sync.name(), rows = cleaned, "deleted journal rows applied before a restart");
                }
                if !sync.mapping.source_only.is_empty() {
                    info!(
                        table = %sync.name(),
                        columns = ?sync.mapping.source_only,
                        "source columns missing in the target are not synced"
                    );
                }
                tables.push(sync);
            }
            Ok::<_, Error>(tables)
        };
        match attempt.await {
            Ok(tables) => return Ok(Some(tables)),
            Err(err) if policy::is_transient(&err) => {
                let delay = backoff.next().unwrap_or(settings.retry.max_delay);
                warn!(
                    error = %crate::error::chain(&err),
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot start yet; retrying"
                );
                telemetry.beat();
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => return Err(err),
        }
    }
}

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

struct SyncLoop {
    settings: Arc<Settings>,
    pools: Pools,
    tables: Vec<TableSync>,
    telemetry: Arc<Telemetry>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    load: SourceLoad,
}

/// How a yield to a busy source ended.
enum Yield {
    /// Go on applying.
    Go,
    /// `POST /sync` asked for a sweep.
    SweepRequested,
    Shutdown,
}

/// A failed pass: which table, and what went wrong.
struct PassError {
    table: String,
    error: Error,
}

impl SyncLoop {
    async fn run(&mut self) {
        // The first sweep runs at once: it catches up on everything journaled while rowsync was
        // stopped, and on rows updated within the lookback window.
        let mut next_sweep = Instant::now();
        let mut failures: u32 = 0;
        let mut backoff = Backoff::new(&self.settings.retry);
        info!(
            tables = self.tables.len(),
            interval_ms = self.settings.sync_interval.as_millis() as u64,
            lookback_ms = self.settings.sweep_lookback.as_millis() as u64,
            "sync loop started"
        );
        while !self.shutdown.is_cancelled() {
            self.telemetry.beat();
            let pass_started = Instant::now();
            let sweep_due = Instant::now() >= next_sweep;
            let outcome = if sweep_due {
                self.sweep().await
            } else {
                self.pass(BatchKind::Stream).await
            };
            let applied = match outcome {
                Ok(applied) => {
                    if failures > 0 {
                        info!(failures, "sync recovered");
                        self.resolve_failure_episode().await;
                        failures = 0;
                        backoff = Backoff::new(&self.settings.retry);
                        self.telemetry.recovered();
                    }
                    if sweep_due {
                        next_sweep = Instant::now() + self.settings.sync_interval;
                    }
                    if applied.is_none() {
                        self.load.caught_up();
                    }
                    applied
                }
                Err(PassError {
                    error: Error::ProgressMoved { table },
                    ..
                }) => {
                    info!(table = %table, "progress was moved by another process; reloaded it");
                    continue;
                }
                Err(failure) => {
                    failures += 1;
                    if policy::is_transient(&failure.error) {
                        // A session that timed out or lost its server must not be handed out again.
                        self.pools.evict_idle();
                    }
                    let delay = backoff.next().unwrap_or(self.settings.retry.max_delay);
                    self.fail(&failure, failures, delay).await;
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            if let Some(rows) = applied {
                match self.yield_while_source_busy().await {
                    Yield::Go => {}
                    Yield::SweepRequested => {
                        next_sweep = Instant::now();
                        continue;
                    }
                    Yield::Shutdown => break,
                }
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until((pass_started + batch_spacing(rows)).into()) => {}
                }
                continue;
            }
            if self.telemetry.listener() == ListenerState::Listening {
                match self.arm_doorbell().await {
                    // Something may have been committed just before the bell was armed.
                    Ok(()) => match self.pass(BatchKind::Stream).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => {}
                        Err(_) => continue,
                    },
                    Err(err) => {
                        debug!(error = %crate::error::chain(&err), "could not arm the doorbell")
                    }
                }
            }
            tokio::select! {
                biased;
                // Each arm is cancel-safe: they only wait.
                _ = self.shutdown.cancelled() => break,
                _ = self.telemetry.sweep_requested() => next_sweep = Instant::now(),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = tokio::time::sleep_until(next_sweep.into()) => {}
            }
        }
        // The totals are logged once, by the caller, when the process stops.
        info!("sync loop stopped");
    }

    /// While the source is busy, defers the next batches, for at most `YIELD_MAX_SECONDS` (see
    /// [`crate::runtime::yielding`]).
    async fn yield_while_source_busy(&mut self) -> Yield {
        if !self.load.due(Instant::now()) || !self.look_at_source().await || !self.load.busy() {
            return Yield::Go;
        }
        let started = Instant::now();
        let mean = self.load.mean().unwrap_or_default();
        info!(
            active_sessions = format!("{mean:.1}"),
            threshold = self.load.threshold(),
            max_ms = self.load.max().as_millis() as u64,
            "the source is busy: deferring sync until it is not (changes wait in the journal)"
        );
        self.telemetry.yield_started(mean);
        let outcome = loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break Yield::Shutdown,
                _ = self.telemetry.sweep_requested() => break Yield::SweepRequested,
                _ = tokio::time::sleep(yielding::LOOK_EVERY) => {}
            }
            self.telemetry.beat();
            if started.elapsed() >= self.load.max() {
                self.load.ran_full_length();
                info!(
                    max_ms = self.load.max().as_millis() as u64,
                    "the source is still busy after the longest yield: catching up now"
                );
                break Yield::Go;
            }
            // A source rowsync cannot look at is no reason to wait: the next batch will tell.
            if !self.look_at_source().await || self.load.quiet() {
                break Yield::Go;
            }
        };
        self.telemetry.yield_ended();
        info!(
            yielded_ms = started.elapsed().as_millis() as u64,
            "resuming sync after yielding to the source"
        );
        outcome
    }

    /// Counts the source's active sessions into [`SourceLoad`]; false if it could not.
    async fn look_at_source(&mut self) -> bool {
        let limit = self.limit();
        let counted = async {
            let source = self.pools.source().await?;
            bounded(
                limit,
                DatabaseRole::Source,
                "counting the source's active sessions",
                yielding::active_sessions(&**source),
            )
            .await
        }
        .await;
        match counted {
            Ok(active) => {
                self.load.record(Instant::now(), active);
                self.telemetry.source_load(active);
                true
            }
            Err(err) => {
                debug!(error = %crate::error::chain(&err), "could not count the source's active sessions");
                false
            }
        }
    }

    /// One batch per table. Returns how many rows were applied, or None when nothing changed.
    async fn pass(&mut self, kind: BatchKind) -> Result<Option<u64>, PassError> {
        let mut applied = None;
        for table in &mut self.tables {
            if self.shutdown.is_cancelled() {
                break;
            }
            match table.run_batch(&self.pools, kind).await {
                Ok(Some(report)) => {
                    *applied.get_or_insert(0) += report.counts.total();
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
                }
                Ok(None) => {}
                Err(error) => {
                    return Err(PassError {
                        table: table.name(),
                        error,
                    });
                }
            }
        }
        Ok(applied)
    }

    /// A sweep: one batch per table with the lookback and the retries, recorded in `sync_runs`.
    /// Returns how many rows it applied (None: nothing).
    async fn sweep(&mut self) -> Result<Option<u64>, PassError> {
        let started = Instant::now();
        let before = self.telemetry.snapshot().totals;
        self.telemetry.sweep_started();
        debug!("sweep started");
        let run = self.run_started().await;
        let result = self.drain_then_sweep().await;
        let duration = started.elapsed();
        let after = self.telemetry.snapshot().totals;
        let counts = Counts {
            created: after.created - before.created,
            updated: after.updated - before.updated,
            deleted: after.deleted - before.deleted,
            unchanged: after.unchanged - before.unchanged,
            failed: after.failed - before.failed,
        };
        let error = result
            .as_ref()
            .err()
            .map(|failure| crate::error::chain(&failure.error));
        self.run_finished(run, counts, error.as_deref()).await;
        let found = match result {
            Ok(found) => found,
            Err(failure) => {
                self.telemetry.sweep_finished(None);
                return Err(failure);
            }
        };
        self.update_backlog().await;
        self.telemetry.sweep_finished(Some(SweepSummary {
            finished_at: SystemTime::now(),
            duration,
            counts,
        }));
        info!(
            created = counts.created,
            updated = counts.updated,
            deleted = counts.deleted,
            unchanged = counts.unchanged,
            failed = counts.failed,
            duration_ms = duration.as_millis() as u64,
            "sweep finished"
        );
        if duration > self.settings.sync_interval.mul_f64(0.8) {
            warn!(
                duration_ms = duration.as_millis() as u64,
                interval_ms = self.settings.sync_interval.as_millis() as u64,
                "sweep took more than 80% of the interval; the next one waits for it \
                 (consider a longer SYNC_INTERVAL_MINUTES)"
            );
        }
        Ok(found)
    }

    /// Applies what the journal holds with plain batches first (a backlog after a restart must not
    /// wait for the look-back's re-read), for at most one interval under continuous writes, then
    /// runs the sweep's own batch: look-back (when due) and retries.
    async fn drain_then_sweep(&mut self) -> Result<Option<u64>, PassError> {
        let deadline = Instant::now() + self.settings.sync_interval;
        let mut applied = None;
        while let Some(rows) = self.pass(BatchKind::Stream).await? {
            *applied.get_or_insert(0) += rows;
            if Instant::now() >= deadline || self.shutdown.is_cancelled() {
                break;
            }
        }
        if let Some(rows) = self
            .pass(BatchKind::Sweep {
                lookback: self.settings.sweep_lookback,
            })
            .await?
        {
            *applied.get_or_insert(0) += rows;
        }
        Ok(applied)
    }

    /// Records the sweep's start in `sync_runs` (best effort: history must not stop syncing).
    async fn run_started(&self) -> Option<i64> {
        let target = self.pools.target().await.ok()?;
        let started = bounded(
            self.limit(),
            DatabaseRole::Target,
            "recording a sweep",
            runs::start(&**target, Kind::Sweep, None),
        )
        .await;
        started
            .map_err(|err| warn!(error = %crate::error::chain(&err), "could not record the sweep in sync_runs"))
            .ok()
    }

    async fn run_finished(&self, run: Option<i64>, counts: Counts, error: Option<&str>) {
        let Some(id) = run else {
            return;
        };
        let Ok(target) = self.pools.target().await else {
            return;
        };
        let recorded = bounded(
            self.limit(),
            DatabaseRole::Target,
            "recording a sweep",
            async {
                runs::finish(&**target, id, counts, error).await?;
                runs::prune(&**target, self.settings.sync_runs_retention).await
            },
        )
        .await;
        if let Err(err) = recorded {
            warn!(error = %crate::error::chain(&err), "could not complete the sweep's sync_runs row");
        }
    }

    /// Journal depth and open row failures per table, for /status and /metrics.
    async fn update_backlog(&self) {
        let source = self.pools.source().await.ok();
        for table in &self.tables {
            let pending = match (&source, &table.mapping.journal) {
                (Some(source), Some(journal)) => bounded(
                    self.limit(),
                    DatabaseRole::Source,
                    "counting the journal",
                    capture::journal_depth(&***source, journal),
                )
                .await
                .ok(),
                _ => None,
            };
            self.telemetry
                .set_table_backlog(&table.name(), pending, table.unresolved_count());
        }
    }

    async fn arm_doorbell(&self) -> Result<()> {
        let source = self.pools.source().await?;
        bounded(
            self.limit(),
            DatabaseRole::Source,
            "arming the doorbell",
            capture::arm_doorbell(&**source),
        )
        .await?;
        Ok(())
    }

    fn limit(&self) -> Duration {
        SessionLimits::from_settings(&self.settings).client_timeout()
    }

    async fn fail(&self, failure: &PassError, failures: u32, delay: Duration) {
        self.telemetry.failure(failures);
        let message = crate::error::chain(&failure.error);
        let retries_left = failures <= self.settings.retry.max_retries;
        if retries_left && policy::is_transient(&failure.error) {
            warn!(
                table = %failure.table,
                attempt = failures,
                retry_in_ms = delay.as_millis() as u64,
                error = %message,
                "sync failed; retrying"
            );
            return;
        }
        error!(
            table = %failure.table,
            attempt = failures,
            retry_in_ms = delay.as_millis() as u64,
            error = %message,
            "sync keeps failing; recorded in sync_errors, still retrying"
        );
        let error_type = failure
            .error
            .postgres()
            .map(|e| policy::classify(e).1)
            .unwrap_or(if policy::is_transient(&failure.error) {
                ErrorType::ConnectionError
            } else {
                ErrorType::SyncError
            });
        let record = sync_errors::Failure {
            error_type,
            table: Some(failure.table.clone()),
            record_id: None,
            message,
            stack_trace: sync_errors::stack_trace(&failure.error),
            metadata: sync_errors::metadata(
                Some(&failure.table),
                "batch",
                failure.error.postgres(),
                failures,
            ),
            retry_in: None,
        };
        self.telemetry.recorded(error_type.as_str());
        if let Ok(target) = self.pools.target().await
            && let Err(err) = bounded(
                self.limit(),
                DatabaseRole::Target,
                "recording a failure",
                sync_errors::record(&**target, &record),
            )
            .await
        {
            warn!(error = %crate::error::chain(&err), "could not record the failure in sync_errors");
        }
    }

    /// After a recovery, closes the open records of failures that were not about a row.
    async fn resolve_failure_episode(&self) {
        let Ok(target) = self.pools.target().await else {
            return;
        };
        for table in &self.tables {
            let _ = bounded(
                self.limit(),
                DatabaseRole::Target,
                "resolving sync_errors",
                sync_errors::resolve_episode(
                    &**target,
                    &[
                        ErrorType::ConnectionError,
                        ErrorType::Timeout,
                        ErrorType::SyncError,
                        ErrorType::SchemaMismatch,
                        ErrorType::ConstraintViolation,
                        ErrorType::DataError,
                        ErrorType::PermissionDenied,
                    ],
                    Some(&table.name()),
                ),
            )
            .await;
        }
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
