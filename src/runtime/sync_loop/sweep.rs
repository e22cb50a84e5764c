//! Sweeps: every `SYNC_INTERVAL_MINUTES`, or on request, the journal is drained and then one batch
//! per table adds the look-back (when capture may have been bypassed) and the rows whose retry is
//! due. Each sweep is a row in `sync_runs`, and refreshes the figures of the journals' backlog.

use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use super::{PassOutcome, SyncLoop};
use crate::catalog::mapping::{Shapes, TableMapping};
use crate::config::DatabaseRole;
use crate::connection::{Pools, Within};
use crate::ops::telemetry::SweepSummary;
use crate::pipeline::apply::Counts;
use crate::pipeline::batch::{BatchKind, TableSync};
use crate::runtime::daemon::Context;
use crate::source::capture::{self, JournalRows};
use crate::target::runs::{self, Kind};

impl SyncLoop {
    /// A sweep, recorded in `sync_runs` (failed when a table failed in it).
    pub(super) async fn sweep(&mut self) -> PassOutcome {
        let started = Instant::now();
        let telemetry = self.context.telemetry.clone();
        let before = telemetry.figures().totals;
        telemetry.sweep_started();
        self.context.requests.answered();
        // Armed again after the sweep: a bell disarmed without a ring (the rowsync schema
        // installed afresh under a running daemon) costs a sweep's interval of polling at most.
        self.bell_armed = false;
        debug!("sweep started");
        let run = self.run_started().await;
        self.follow_schemas().await;
        let outcome = self.drain_then_sweep().await;
        let duration = started.elapsed();
        let counts = telemetry.figures().totals - before;
        let error = (!outcome.failed.is_empty()).then(|| outcome.failed.join("; "));
        self.run_finished(run, counts, error.as_deref()).await;
        if outcome.succeeded == 0 && !outcome.failed.is_empty() {
            // Nothing worked: not a sweep that finished.
            telemetry.sweep_finished(None);
            return outcome;
        }
        self.update_backlog().await;
        telemetry.sweep_finished(Some(SweepSummary {
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
        let interval = self.context.settings.sync_interval;
        if duration > interval.mul_f64(0.8) {
            warn!(
                duration_ms = duration.as_millis() as u64,
                interval_ms = interval.as_millis() as u64,
                "sweep took more than 80% of the interval; the next one waits for it \
                 (consider a longer SYNC_INTERVAL_MINUTES)"
            );
        }
        outcome
    }

    /// Applies what the journal holds with plain batches first (a backlog after a restart must not
    /// wait for the look-back's re-read), for at most one interval under continuous writes, then
    /// runs the sweep's own batch: look-back (when due) and retries.
    async fn drain_then_sweep(&mut self) -> PassOutcome {
        let deadline = Instant::now() + self.context.settings.sync_interval;
        let mut total = PassOutcome::default();
        loop {
            let pass = self.pass(BatchKind::Stream).await;
            let more = pass.applied.is_some();
            total.add(pass);
            if !more || Instant::now() >= deadline || self.shutdown.is_cancelled() {
                break;
            }
        }
        let lookback = self.context.settings.sweep_lookback;
        let sweep = self.pass(BatchKind::Sweep { lookback }).await;
        total.add(sweep);
        total
    }

    /// Records the sweep's start in `sync_runs` (best effort: history must not stop syncing).
    async fn run_started(&self) -> Option<i64> {
        let started = async {
            let target = self.context.pools.target().await?;
            runs::start(&**target, Kind::Sweep, None).await
        }
        .within(self.limit(), DatabaseRole::Target, || {
            "recording a sweep".into()
        })
        .await;
        started
            .map_err(|err| warn!(error = %crate::error::chain(&err), "could not record the sweep in sync_runs"))
            .ok()
    }

    async fn run_finished(&self, run: Option<i64>, counts: Counts, error: Option<&str>) {
        let Some(id) = run else {
            return;
        };
        let recorded = async {
            let target = self.context.pools.target().await?;
            runs::finish(&**target, id, counts, error).await?;
            runs::prune(&**target, self.context.settings.sync_runs_retention).await
        }
        .within(self.limit(), DatabaseRole::Target, || {
            "recording a sweep".into()
        })
        .await;
        if let Err(err) = recorded {
            warn!(error = %crate::error::chain(&err), "could not complete the sweep's sync_runs row");
        }
    }

    /// Tables whose columns changed on either side since their mapping was read are unloaded, so
    /// that this sweep reads it again (see [`TableSync::columns_changed`]).
    async fn follow_schemas(&mut self) {
        let loaded: Vec<&TableMapping> = self
            .tables
            .iter()
            .filter_map(|t| t.sync.as_ref().map(|sync| &sync.mapping))
            .collect();
        if loaded.is_empty() {
            return;
        }
        let pools = &self.context.pools;
        let shapes = async {
            let source = pools.source().await?;
            let target = pools.target().await?;
            Shapes::read_all(&**source, &**target, &loaded).await
        }
        .within(self.limit(), DatabaseRole::Source, || {
            "reading the columns of the synced tables".into()
        })
        .await;
        let shapes = match shapes {
            Ok(shapes) => shapes,
            Err(err) => {
                // The tables' batches meet the same trouble and report it.
                debug!(error = %crate::error::chain(&err), "could not read the tables' columns");
                return;
            }
        };
        let mut changed = false;
        let mut shapes = shapes.into_iter();
        for table in self.tables.iter_mut().filter(|t| t.sync.is_some()) {
            let now = shapes.next();
            if now.as_ref() == table.sync.as_ref().map(|sync| &sync.mapping.shapes) {
                continue;
            }
            info!(table = %table.name, "the table's columns changed; reading its column mapping again");
            table.changed_from = table.sync.take().map(|sync| sync.mapping);
            changed = true;
        }
        if changed {
            // Pooled sessions cache statements prepared for the old columns.
            self.context.pools.evict_idle();
        }
    }

    /// Journal depth and open row failures per table, for /status and /metrics. A journal that
    /// holds rows no batch will consume is cleaned now (rather than at its next batch, which
    /// may be long in coming), and what stays is what the `journal` health check reports.
    async fn update_backlog(&mut self) {
        let limit = self.limit();
        let Context {
            pools, telemetry, ..
        } = &self.context;
        for sync in self.tables.iter_mut().filter_map(|t| t.sync.as_mut()) {
            // Seen empty by this sweep's look at every journal: no need to count.
            let mut journal = if sync.was_quiet() {
                Some(JournalRows { rows: 0, stuck: 0 })
            } else {
                count_journal(pools, sync, limit).await
            };
            if let Some(stuck) = journal.map(|j| j.stuck).filter(|&n| n > 0) {
                match sync.clean_journal(pools).await {
                    Ok(deleted) => {
                        if deleted > 0 {
                            warn!(table = %sync.name(), stuck, deleted, "deleted journal rows that no batch would consume (rows of applied changes left behind, or written by hand with a txid from the future)");
                        }
                        // (Counted again with the other mappings' progress as it is now.)
                        journal = count_journal(pools, sync, limit).await;
                    }
                    Err(err) => {
                        warn!(table = %sync.name(), stuck, error = %crate::error::chain(&err), "cannot delete journal rows that no batch will consume");
                    }
                }
            }
            telemetry.set_table_backlog(&sync.name(), journal, sync.unresolved_count());
        }
    }
}

/// What the table's journal holds, or None when the source cannot tell now.
async fn count_journal(pools: &Pools, sync: &TableSync, limit: Duration) -> Option<JournalRows> {
    let journal = sync.mapping.journal.as_ref()?;
    let source = pools.source().await.ok()?;
    capture::journal_rows(&**source, journal, sync.applied(), sync.others())
        .within(limit, DatabaseRole::Source, || {
            "counting the journal".into()
        })
        .await
        .ok()
}
