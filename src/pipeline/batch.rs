//! One batch of one table: from the previous snapshot to now, read, applied and recorded at once.
//!
//! The steps, and why they are in this order:
//! 1. Source: `BEGIN ISOLATION LEVEL REPEATABLE READ`, take `pg_current_snapshot()` (= `cur`).
//! 2. Source: run the change query ([`crate::pipeline::changes`]) for (`prev`, `cur`], reading rows in chunks.
//!    Nothing found: roll back, done (an idle table costs one short read-only transaction).
//! 3. Target: lock the progress row; it must still say `prev` (else another process moved it: reload).
//! 4. Target: apply the chunks; record rejected rows in `sync_errors`, resolve rows that succeeded;
//!    set progress to `cur`; COMMIT. Rows and progress become visible together, or not at all.
//! 5. Source: delete the journal rows of every transaction visible in `cur`; COMMIT.
//!
//! A crash before 4 commits leaves `prev`: the batch is redone. A crash between 4 and 5 leaves
//! journal rows whose transactions are visible in the recorded snapshot: they are skipped by the next
//! batch and deleted by its step 5. So every change is applied, and none twice.
//!
//! Every call is bounded on the client side; a batch that times out is abandoned (both transactions
//! roll back with their sessions) and redone later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use postgres_types::{ToSql, Type};
use serde_json::Value;
use tokio_postgres::IsolationLevel;
use tracing::{debug, info, warn};

use crate::catalog::ident::TableRef;
use crate::catalog::mapping::{TableMapping, load_mapping};
use crate::config::{DatabaseRole, LookbackMode, RetrySettings, Settings};
use crate::connection::{Pools, SessionLimits, Within, bounded, end_abandoned_sessions};
use crate::error::{Error, Result, SqlContext};
use crate::ops::telemetry::Telemetry;
use crate::pipeline::apply::{Applier, ChunkOutcome, Counts, Mode, RowFailure, connection_lost};
use crate::pipeline::changes::{Layout, change_query, journal_cleanup};
use crate::source::capture;
use crate::source::journal::{self, Truncation};
use crate::target::{progress, sync_errors};

/// Why a batch runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum BatchKind {
    /// The real-time path: only the journal.
    Stream,
    /// A sweep: the journal, rows updated within `lookback`, and rows whose apply failed before
    /// and whose retry is due.
    Sweep { lookback: Duration },
}

/// What one batch did.
#[derive(Debug, Clone)]
pub(crate) struct BatchReport {
    pub table: String,
    pub counts: Counts,
    pub duration: Duration,
}

/// A row the target rejected, waiting for a retry.
#[derive(Debug, Clone)]
struct Pending {
    key: Value,
    retry_count: u32,
    due: Instant,
}

/// A synced table and its replication state.
pub(crate) struct TableSync {
    pub mapping: TableMapping,
    /// The change query without and with the rows' keys as JSON (see [`change_query`]).
    change_sql: String,
    change_sql_keyed: String,
    cleanup_sql: String,
    /// The journal's quoted name.
    journal: String,
    /// Journal rows deleted since rowsync last vacuumed it (see [`crate::source::journal`]).
    consumed_since_vacuum: u64,
    /// Whether our role owns the journal, as its upkeep needs.
    owns_journal: bool,
    applier: Applier,
    /// The applied snapshot as last read or written; None means "reload from the target".
    progress: Option<String>,
    /// Open row failures in `sync_errors`, by record_id.
    unresolved: HashMap<String, Pending>,
    batch_size: usize,
    /// Client-side bound of each call.
    limit: Duration,
    retry: RetrySettings,
    telemetry: Arc<Telemetry>,
    lookback_mode: LookbackMode,
    /// The capture fingerprint seen by the previous sweep; None before the first sweep.
    capture_seen: Option<String>,
}

const SOURCE: DatabaseRole = DatabaseRole::Source;
const TARGET: DatabaseRole = DatabaseRole::Target;

impl TableSync {
    /// Loads the mapping and state of a table that `setup` has prepared.
    pub(crate) async fn load(
        pools: &Pools,
        table: &TableRef,
        settings: &Settings,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self> {
        let limit = SessionLimits::from_settings(settings).client_timeout();
        let source = pools.source().await?;
        let target = pools.target().await?;
        let mapping = bounded(
            limit,
            SOURCE,
            "reading the table definitions",
            load_mapping(&**source, &**target, table),
        )
        .await?;
        let journal = mapping.journal()?.quoted();
        let name = mapping.name();
        let owns_journal = journal::owned(&source, &journal, limit).await?;
        if !owns_journal {
            not_our_journal(&name);
        }
        let progress = bounded(
            limit,
            TARGET,
            "reading progress",
            progress::load(&**target, &name),
        )
        .await?;
        if progress.is_none() {
            return Err(Error::NotSetUp { table: name });
        }
        let now = Instant::now();
        let unresolved = bounded(
            limit,
            TARGET,
            "reading sync_errors",
            sync_errors::unresolved_rows(&**target, &name),
        )
        .await?
        .into_iter()
        .map(|open| {
            let pending = Pending {
                key: open.key,
                retry_count: open.retry_count,
                due: now + open.due_in,
            };
            (open.record_id, pending)
        })
        .collect();
        let sync = Self {
            change_sql: change_query(&mapping, &journal, false),
            change_sql_keyed: change_query(&mapping, &journal, true),
            cleanup_sql: journal_cleanup(&journal),
            journal,
            consumed_since_vacuum: 0,
            owns_journal,
            applier: Applier::new(&mapping, limit),
            mapping,
            progress,
            unresolved,
            batch_size: settings.batch_size,
            limit,
            retry: settings.retry,
            telemetry,
            lookback_mode: settings.lookback,
            capture_seen: None,
        };
        sync.telemetry.add_table(&sync.name());
        sync.telemetry
            .set_table_backlog(&sync.name(), None, sync.unresolved_count());
        Ok(sync)
    }

    pub(crate) fn name(&self) -> String {
        self.mapping.name()
    }

    /// Rows of this table whose apply failed and that are waiting for a retry.
    pub(crate) fn unresolved_count(&self) -> usize {
        self.unresolved.len()
    }

    /// Runs one batch. Returns None when there was nothing to do.
    pub(crate) async fn run_batch(
        &mut self,
        pools: &Pools,
        kind: BatchKind,
    ) -> Result<Option<BatchReport>> {
        let started = Instant::now();
        let name = self.name();
        let limit = self.limit;
        let prev = match self.progress.take() {
            Some(prev) => prev,
            None => {
                let target = pools.target().await?;
                bounded(
                    limit,
                    TARGET,
                    "reading progress",
                    progress::load(&**target, &name),
                )
                .await?
                .ok_or_else(|| Error::NotSetUp {
                    table: name.clone(),
                })?
            }
        };

        let mut source = pools.source().await?;
        let stx = source
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()
            .within(limit, SOURCE, || format!("starting a batch of {name}"))
            .await?;
        let snapshot_at = SystemTime::now();
        // Statements of the hot path are prepared once per pooled session.
        let take_snapshot = stx
            .prepare_cached("SELECT pg_catalog.pg_current_snapshot()::text")
            .within(limit, SOURCE, || "preparing the snapshot query".into())
            .await?;
        let cur: String = stx
            .query_one(&take_snapshot, &[])
            .within(limit, SOURCE, || "taking a snapshot".into())
            .await?
            .get(0);

        let now = Instant::now();
        let (lookback, retry_keys): (Option<f64>, Vec<Value>) = match kind {
            BatchKind::Stream => (None, Vec::new()),
            BatchKind::Sweep { lookback } => (
                self.look_back(&stx, lookback).await?,
                self.unresolved
                    .values()
                    .filter(|pending| pending.due <= now)
                    .map(|pending| pending.key.clone())
                    .collect(),
            ),
        };
        let params: [&(dyn ToSql + Sync); 3] = [&prev, &lookback, &retry_keys];
        let chunk = self.batch_size as i32;

        let mut mode = Mode::Fast;
        let outcome = loop {
            // Keys as JSON are needed only to record rejected rows (careful mode) or to notice
            // earlier ones going through.
            let sql = if mode == Mode::Careful || !self.unresolved.is_empty() {
                &self.change_sql_keyed
            } else {
                &self.change_sql
            };
            let statement = stx
                .prepare_typed_cached(sql, &[Type::TEXT, Type::FLOAT8, Type::JSONB_ARRAY])
                .within(limit, SOURCE, || {
                    format!("preparing the change query of {name}")
                })
                .await?;
            let portal = stx
                .bind(&statement, &params)
                .within(limit, SOURCE, || format!("reading changes of {name}"))
                .await?;
            let mut rows = stx
                .query_portal(&portal, chunk)
                .within(limit, SOURCE, || format!("reading changes of {name}"))
                .await?;
            if rows.is_empty() {
                // Nothing visible since `prev`; the snapshot need not move.
                self.progress = Some(prev);
                self.telemetry.checked(&name, snapshot_at);
                return Ok(None);
            }

            let mut target = pools.target().await?;
            let ttx = target
                .transaction()
                .within(limit, TARGET, || format!("starting the apply of {name}"))
                .await?;
            let locked = match bounded(
                limit,
                TARGET,
                "locking progress",
                lock_progress(&ttx, &name),
            )
            .await
            {
                Ok(locked) => locked,
                Err(err) => {
                    if waited_for_a_lock(&err) {
                        // Most likely a session of ours that hung and was given up on still holds
                        // the progress row, idle in its transaction. End it, then retry.
                        drop(ttx);
                        let ended = bounded(
                            limit,
                            TARGET,
                            "ending abandoned sessions",
                            end_abandoned_sessions(&**target, TARGET, limit),
                        )
                        .await?;
                        if ended > 0 {
                            warn!(table = %name, sessions = ended, "ended abandoned rowsync sessions that held the progress lock");
                        }
                    }
                    return Err(err);
                }
            };
            if locked.as_deref() != Some(prev.as_str()) {
                return Err(Error::ProgressMoved { table: name });
            }

            let mut outcome = ChunkOutcome::default();
            let mut resolved = Vec::new();
            let replay = loop {
                // While this chunk is applied to the target, the next one is read from the source
                // (two sessions, two servers): a large batch costs max(read, apply), not the sum.
                let more = rows.len() >= chunk as usize;
                let next = async {
                    if more {
                        stx.query_portal(&portal, chunk)
                            .within(limit, SOURCE, || format!("reading changes of {name}"))
                            .await
                    } else {
                        Ok(Vec::new())
                    }
                };
                let (applied, next) = tokio::join!(self.applier.apply(&ttx, &rows, mode), next);
                match applied {
                    Ok(chunk_outcome) => {
                        self.note_resolved(&rows, &chunk_outcome, &mut resolved);
                        outcome.counts += chunk_outcome.counts;
                        outcome.failures.extend(chunk_outcome.failures);
                    }
                    Err(Error::Sql { source, .. })
                        if mode == Mode::Fast && !connection_lost(&source) =>
                    {
                        debug!(
                            table = %name,
                            sqlstate = source.code().map(|c| c.code()).unwrap_or(""),
                            "target rejected a row; replaying the batch to isolate it"
                        );
                        break true;
                    }
                    Err(other) => return Err(other),
                }
                self.telemetry.beat();
                rows = next?;
                if rows.is_empty() {
                    break false;
                }
            };
            if replay {
                // The transaction is aborted; start again under savepoints. The source transaction
                // still has the same snapshot, so the replay sees exactly the same rows.
                let _ = ttx.rollback().await;
                mode = Mode::Careful;
                continue;
            }

            let mut delays = Vec::with_capacity(outcome.failures.len());
            for failure in &outcome.failures {
                let delay = self.record_failure(&ttx, &name, failure).await?;
                delays.push(delay);
            }
            bounded(
                limit,
                TARGET,
                "resolving sync_errors",
                sync_errors::resolve_rows(&*ttx, &name, &resolved),
            )
            .await?;
            bounded(
                limit,
                TARGET,
                "recording progress",
                advance_progress(&ttx, &name, &cur),
            )
            .await?;
            ttx.commit()
                .within(limit, TARGET, || format!("committing changes of {name}"))
                .await?;

            for record_id in &resolved {
                self.unresolved.remove(record_id);
                info!(table = %name, record_id = %record_id, "previously failed row is now synced");
            }
            let now = Instant::now();
            for (failure, delay) in outcome.failures.iter().zip(delays) {
                let record_id = sync_errors::record_id(&failure.key);
                let retry_count = self
                    .unresolved
                    .get(&record_id)
                    .map_or(0, |p| p.retry_count + 1);
                self.unresolved.insert(
                    record_id,
                    Pending {
                        key: failure.key.clone(),
                        retry_count,
                        due: now + delay,
                    },
                );
            }
            break outcome;
        };
        self.progress = Some(cur.clone());

        // The target has the batch; the journal rows behind it can go. If this fails they are
        // skipped by later batches anyway (visible in the recorded snapshot) and deleted next time.
        let cleanup = async {
            let cleanup = stx
                .prepare_cached(&self.cleanup_sql)
                .within(limit, SOURCE, || "preparing the journal cleanup".into())
                .await?;
            // Losing this commit in a crash is harmless (the recorded progress makes the next batch
            // skip these rows and delete them again), so it need not wait for the WAL flush. The
            // two statements are pipelined: one round trip.
            let params: [&(dyn ToSql + Sync); 1] = [&cur];
            let ((), deleted) = tokio::try_join!(
                stx.batch_execute("SET LOCAL synchronous_commit TO off")
                    .within(limit, SOURCE, || "relaxing the cleanup's commit".into()),
                stx.execute(&cleanup, &params)
                    .within(limit, SOURCE, || "deleting consumed journal rows".into()),
            )?;
            stx.commit()
                .within(limit, SOURCE, || "ending the batch".into())
                .await
                .map(|()| deleted)
        };
        match cleanup.await {
            Ok(deleted) => {
                self.consumed_since_vacuum += deleted;
                if self.consumed_since_vacuum >= journal::VACUUM_EVERY_ROWS {
                    self.consumed_since_vacuum = 0;
                    self.look_after_journal(&mut source).await;
                }
            }
            Err(err) => {
                warn!(table = %name, error = %crate::error::chain(&err), "could not delete consumed journal rows; will retry");
                // The session may be hung or broken: keep it out of the pool.
                drop(deadpool_postgres::Object::take(source));
            }
        }

        self.telemetry.batch(&name, outcome.counts, snapshot_at);
        self.telemetry
            .set_table_backlog(&name, None, self.unresolved.len());
        Ok(Some(BatchReport {
            table: name,
            counts: outcome.counts,
            duration: started.elapsed(),
        }))
    }

    /// Whether this sweep re-reads recently updated rows (see [`LookbackMode`]), and how far
    /// back. Also reports capture that is disabled or missing, which needs `rowsync setup`.
    async fn look_back(
        &mut self,
        stx: &tokio_postgres::Transaction<'_>,
        lookback: Duration,
    ) -> Result<Option<f64>> {
        let name = self.name();
        let state = bounded(
            self.limit,
            SOURCE,
            "checking capture",
            capture::capture_state(stx, &self.mapping.source),
        )
        .await?;
        if !state.intact {
            warn!(
                table = %name,
                "capture triggers are disabled or missing: changes are not captured; run `rowsync setup` to repair"
            );
        }
        self.telemetry.set_capture(&name, state.intact);
        let changed = self
            .capture_seen
            .as_ref()
            .is_some_and(|seen| *seen != state.fingerprint);
        if changed {
            warn!(table = %name, "capture triggers were altered since the last sweep; looking back for changes they missed");
        }
        let first = self.capture_seen.is_none();
        self.capture_seen = Some(state.fingerprint);
        let wanted = match self.lookback_mode {
            LookbackMode::Always => true,
            LookbackMode::Never => false,
            LookbackMode::Auto => first || changed || state.subscriber || !state.intact,
        };
        Ok((wanted && self.mapping.updated_at.is_some()).then_some(lookback.as_secs_f64()))
    }

    /// Records a rejected row in `sync_errors` (inside the batch's target transaction) and returns
    /// when to retry it.
    async fn record_failure(
        &self,
        ttx: &deadpool_postgres::Transaction<'_>,
        table: &str,
        failure: &RowFailure,
    ) -> Result<Duration> {
        let record_id = sync_errors::record_id(&failure.key);
        let retry_count = self
            .unresolved
            .get(&record_id)
            .map_or(0, |p| p.retry_count + 1);
        self.telemetry.recorded(failure.error_type.as_str());
        bounded(
            self.limit,
            TARGET,
            "recording a rejected row",
            sync_errors::record_rejected(&**ttx, table, failure, retry_count, &self.retry),
        )
        .await
    }

    /// Keys that had failed before and went through in this chunk.
    fn note_resolved(
        &self,
        rows: &[tokio_postgres::Row],
        outcome: &ChunkOutcome,
        resolved: &mut Vec<String>,
    ) {
        if self.unresolved.is_empty() {
            return;
        }
        for row in rows {
            let Ok(key) = row.try_get::<_, Value>(Layout::KEY_JSON) else {
                continue;
            };
            let record_id = sync_errors::record_id(&key);
            if self.unresolved.contains_key(&record_id)
                && !outcome.failures.iter().any(|f| f.key == key)
            {
                resolved.push(record_id);
            }
        }
    }

    /// Vacuums the journal, and truncates it when it has grown large and is empty (see
    /// [`crate::source::journal`]). Failing here fails nothing: autovacuum remains, and the next attempt
    /// comes after the next [`journal::VACUUM_EVERY_ROWS`] rows.
    async fn look_after_journal(&mut self, source: &mut deadpool_postgres::Object) {
        if !self.owns_journal {
            return;
        }
        let name = self.name();
        match journal::upkeep(source, &self.journal, self.limit).await {
            Ok(Truncation::Done { bytes }) => {
                info!(table = %name, freed_bytes = bytes, "truncated the emptied journal");
            }
            Ok(Truncation::NotPermitted) => {
                self.owns_journal = false;
                not_our_journal(&name);
            }
            Ok(Truncation::NotNeeded | Truncation::Deferred) => {}
            Err(err) => {
                debug!(table = %name, error = %crate::error::chain(&err), "journal upkeep failed; will retry");
            }
        }
    }

    /// Deletes journal rows already covered by the recorded progress (left over by a crash between
    /// a batch's commit and its cleanup).
    pub(crate) async fn clean_journal(&mut self, pools: &Pools) -> Result<u64> {
        let target = pools.target().await?;
        let snapshot = bounded(
            self.limit,
            TARGET,
            "reading progress",
            progress::load(&**target, &self.name()),
        )
        .await?;
        let Some(snapshot) = snapshot else {
            return Ok(0);
        };
        drop(target);
        let source = pools.source().await?;
        let deleted = source
            .execute(&self.cleanup_sql, &[&snapshot])
            .within(self.limit, SOURCE, || {
                "deleting consumed journal rows".into()
            })
            .await?;
        self.progress = Some(snapshot);
        Ok(deleted)
    }
}

/// Says once why rowsync does not vacuum or truncate a table's journal.
fn not_our_journal(table: &str) {
    info!(table = %table, "the journal is owned by another role: leaving its upkeep to autovacuum");
}

/// Whether a call failed waiting for a lock (lock_timeout, or statement_timeout while waiting).
fn waited_for_a_lock(error: &Error) -> bool {
    use tokio_postgres::error::SqlState;
    match error {
        Error::Timeout { .. } => true,
        other => other.postgres().and_then(|e| e.code()).is_some_and(|code| {
            code == &SqlState::LOCK_NOT_AVAILABLE || code == &SqlState::QUERY_CANCELED
        }),
    }
}

/// [`progress::lock`] with the statement prepared once per pooled session (the hot path).
async fn lock_progress(
    ttx: &deadpool_postgres::Transaction<'_>,
    table: &str,
) -> Result<Option<String>> {
    let statement = ttx
        .prepare_cached(progress::LOCK)
        .await
        .context(TARGET, || format!("locking the progress of {table}"))?;
    progress::lock_with(&**ttx, &statement, table).await
}

/// [`progress::advance`] with the statement prepared once per pooled session (the hot path).
async fn advance_progress(
    ttx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    snapshot: &str,
) -> Result<()> {
    let statement = ttx
        .prepare_cached(progress::ADVANCE)
        .await
        .context(TARGET, || format!("recording the progress of {table}"))?;
    progress::advance_with(&**ttx, &statement, table, snapshot, false).await
}
