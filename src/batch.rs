//! One batch of one table: from the previous snapshot to now, read, applied and recorded at once.
//!
//! The steps, and why they are in this order:
//! 1. Source: `BEGIN ISOLATION LEVEL REPEATABLE READ`, take `pg_current_snapshot()` (= `cur`).
//! 2. Source: run the change query ([`crate::changes`]) for (`prev`, `cur`], reading rows in chunks.
//!    Nothing found: roll back, done (an idle table costs one short read-only transaction).
//! 3. Target: lock the progress row; it must still say `prev` (else another process moved it: reload).
//! 4. Target: apply the chunks; record rejected rows in `sync_errors`, resolve rows that succeeded;
//!    set progress to `cur`; COMMIT. Rows and progress become visible together, or not at all.
//! 5. Source: delete the journal rows of every transaction visible in `cur`; COMMIT.
//!
//! A crash before 4 commits leaves `prev`: the batch is redone. A crash between 4 and 5 leaves
//! journal rows whose transactions are visible in the recorded snapshot: they are skipped by the next
//! batch and deleted by its step 5. So every change is applied, and none twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use postgres_types::{ToSql, Type};
use serde_json::Value;
use tokio_postgres::IsolationLevel;
use tracing::{debug, info, warn};

use crate::apply::{Applier, ChunkOutcome, Counts, Mode, connection_lost};
use crate::changes::{Layout, change_query, journal_cleanup};
use crate::config::DatabaseRole;
use crate::connection::Pools;
use crate::error::{Error, Result, SqlContext};
use crate::ident::TableRef;
use crate::schema::{TableMapping, load_mapping};
use crate::{progress, sync_errors};

/// Why a batch runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchKind {
    /// The real-time path: only the journal.
    Stream,
    /// A sweep: the journal, rows updated within `lookback`, and rows whose apply failed before.
    Sweep { lookback: Duration },
}

/// What one batch did.
#[derive(Debug, Clone)]
pub struct BatchReport {
    pub table: String,
    pub counts: Counts,
    pub duration: Duration,
}

/// A synced table and its replication state.
pub struct TableSync {
    pub mapping: TableMapping,
    change_sql: String,
    cleanup_sql: String,
    applier: Applier,
    /// The applied snapshot as last read or written; None means "reload from the target".
    progress: Option<String>,
    /// Open row failures in `sync_errors`: record_id → key.
    unresolved: HashMap<String, Value>,
    batch_size: usize,
}

impl TableSync {
    /// Loads the mapping and state of a table that `setup` has prepared.
    pub async fn load(pools: &Pools, table: &TableRef, batch_size: usize) -> Result<Self> {
        let source = pools.source().await?;
        let target = pools.target().await?;
        let mapping = load_mapping(&**source, &**target, table).await?;
        let journal = mapping.journal()?.quoted();
        let name = mapping.name();
        let progress = progress::load(&**target, &name).await?;
        if progress.is_none() {
            return Err(Error::NotSetUp { table: name });
        }
        let unresolved = sync_errors::unresolved_rows(&**target, &name)
            .await?
            .into_iter()
            .collect();
        Ok(Self {
            change_sql: change_query(&mapping, &journal),
            cleanup_sql: journal_cleanup(&journal),
            applier: Applier::new(&mapping),
            mapping,
            progress,
            unresolved,
            batch_size,
        })
    }

    pub fn name(&self) -> String {
        self.mapping.name()
    }

    /// Rows of this table whose apply failed and that are waiting for a retry.
    pub fn unresolved_count(&self) -> usize {
        self.unresolved.len()
    }

    /// Runs one batch. Returns None when there was nothing to do.
    pub async fn run_batch(
        &mut self,
        pools: &Pools,
        kind: BatchKind,
    ) -> Result<Option<BatchReport>> {
        let started = Instant::now();
        let name = self.name();
        let prev = match self.progress.take() {
            Some(prev) => prev,
            None => {
                let target = pools.target().await?;
                progress::load(&**target, &name)
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
            .await
            .context(DatabaseRole::Source, || {
                format!("starting a batch of {name}")
            })?;
        let cur: String = stx
            .query_one("SELECT pg_catalog.pg_current_snapshot()::text", &[])
            .await
            .context(DatabaseRole::Source, || "taking a snapshot".into())?
            .get(0);

        let (lookback, retry_keys): (Option<f64>, Vec<Value>) = match kind {
            BatchKind::Stream => (None, Vec::new()),
            BatchKind::Sweep { lookback } => (
                Some(lookback.as_secs_f64()),
                self.unresolved.values().cloned().collect(),
            ),
        };
        let statement = stx
            .prepare_typed_cached(
                &self.change_sql,
                &[Type::TEXT, Type::FLOAT8, Type::JSONB_ARRAY],
            )
            .await
            .context(DatabaseRole::Source, || {
                format!("preparing the change query of {name}")
            })?;
        let params: [&(dyn ToSql + Sync); 3] = [&prev, &lookback, &retry_keys];
        let chunk = self.batch_size as i32;

        let mut mode = Mode::Fast;
        let outcome = loop {
            let portal = stx
                .bind(&statement, &params)
                .await
                .context(DatabaseRole::Source, || {
                    format!("reading changes of {name}")
                })?;
            let mut rows = stx
                .query_portal(&portal, chunk)
                .await
                .context(DatabaseRole::Source, || {
                    format!("reading changes of {name}")
                })?;
            if rows.is_empty() {
                // Nothing visible since `prev`; the snapshot need not move.
                self.progress = Some(prev);
                return Ok(None);
            }

            let mut target = pools.target().await?;
            let ttx = target
                .transaction()
                .await
                .context(DatabaseRole::Target, || {
                    format!("starting the apply of {name}")
                })?;
            if progress::lock(&*ttx, &name).await?.as_deref() != Some(prev.as_str()) {
                return Err(Error::ProgressMoved { table: name });
            }

            let mut outcome = ChunkOutcome::default();
            let mut resolved = Vec::new();
            let replay = loop {
                match self.applier.apply(&ttx, &rows, mode).await {
                    Ok(chunk_outcome) => {
                        self.note_resolved(&rows, &chunk_outcome, &mut resolved);
                        outcome.counts += chunk_outcome.counts;
                        outcome.failures.extend(chunk_outcome.failures);
                    }
                    Err(err) if mode == Mode::Fast && !connection_lost(&err) => {
                        debug!(table = %name, error = %err, "target rejected a row; replaying the batch to isolate it");
                        break true;
                    }
                    Err(source) => {
                        return Err(Error::Sql {
                            role: DatabaseRole::Target,
                            action: format!("applying changes of {name}"),
                            source,
                        });
                    }
                }
                if rows.len() < chunk as usize {
                    break false;
                }
                rows = stx
                    .query_portal(&portal, chunk)
                    .await
                    .context(DatabaseRole::Source, || {
                        format!("reading changes of {name}")
                    })?;
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

            for failure in &outcome.failures {
                let record_id = sync_errors::record_id(&failure.key);
                let mut metadata = sync_errors::metadata(
                    Some(&name),
                    failure.operation.as_str(),
                    Some(&failure.error),
                    1,
                );
                metadata["key"] = failure.key.clone();
                let record = sync_errors::Failure {
                    error_type: failure.error_type(),
                    table: Some(name.clone()),
                    record_id: Some(record_id.clone()),
                    message: crate::error::chain(&failure.error),
                    stack_trace: sync_errors::stack_trace(&failure.error),
                    metadata,
                };
                sync_errors::record(&*ttx, &record).await?;
                warn!(
                    table = %name,
                    record_id = %record_id,
                    operation = failure.operation.as_str(),
                    error_type = failure.error_type().as_str(),
                    "target rejected a row; recorded in sync_errors, will retry on later sweeps"
                );
            }
            sync_errors::resolve_rows(&*ttx, &name, &resolved).await?;
            progress::advance(&*ttx, &name, &cur, false).await?;
            ttx.commit().await.context(DatabaseRole::Target, || {
                format!("committing changes of {name}")
            })?;
            for record_id in &resolved {
                self.unresolved.remove(record_id);
                info!(table = %name, record_id = %record_id, "previously failed row is now synced");
            }
            for failure in &outcome.failures {
                self.unresolved
                    .insert(sync_errors::record_id(&failure.key), failure.key.clone());
            }
            break outcome;
        };
        self.progress = Some(cur.clone());

        // The target has the batch; the journal rows behind it can go. If this fails they are
        // skipped by later batches anyway (visible in the recorded snapshot) and deleted next time.
        let cleanup = async {
            stx.execute(&self.cleanup_sql, &[&cur]).await?;
            stx.commit().await
        };
        if let Err(err) = cleanup.await {
            warn!(table = %name, error = %err, "could not delete consumed journal rows; will retry");
        }

        Ok(Some(BatchReport {
            table: name,
            counts: outcome.counts,
            duration: started.elapsed(),
        }))
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

    /// Deletes journal rows already covered by the recorded progress (left over by a crash between
    /// a batch's commit and its cleanup).
    pub async fn clean_journal(&mut self, pools: &Pools) -> Result<u64> {
        let target = pools.target().await?;
        let Some(snapshot) = progress::load(&**target, &self.name()).await? else {
            return Ok(0);
        };
        drop(target);
        let source = pools.source().await?;
        let deleted = source
            .execute(&self.cleanup_sql, &[&snapshot])
            .await
            .context(DatabaseRole::Source, || {
                "deleting consumed journal rows".into()
            })?;
        self.progress = Some(snapshot);
        Ok(deleted)
    }
}
