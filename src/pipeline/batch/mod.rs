//! One batch of one table: from the previous snapshot to now, read, applied and recorded at once.
//!
//! The steps ([`TableSync::run_batch`]), and why they are in this order:
//! 1. [`open_read`]: source `BEGIN ISOLATION LEVEL REPEATABLE READ`, take `pg_current_snapshot()`
//!    (= `cur`).
//! 2. [`TableSync::read_changes`]: run the change query ([`crate::pipeline::changes`]) for
//!    (`prev`, `cur`], reading rows in chunks. Nothing found: roll back, done (an idle table costs
//!    one short read-only transaction).
//! 3. [`TableSync::lock_progress`]: target, lock the progress row; it must still say `prev` (else
//!    another process moved it: reload).
//! 4. [`TableSync::stream`], [`TableSync::commit`]: apply the chunks (the next one is read while the
//!    current one is applied); record rejected rows in `sync_errors`, resolve rows that succeeded;
//!    set progress to `cur`; COMMIT. Rows and progress become visible together, or not at all. If
//!    the target rejected a row, the target transaction rolls back and the batch is replayed under
//!    savepoints from the same source snapshot, isolating the row.
//! 5. [`delete_consumed`]: source, delete the journal rows of every transaction visible in `cur`;
//!    COMMIT. Then journal upkeep, when due.
//!
//! A crash before 4 commits leaves `prev`: the batch is redone. A crash between 4 and 5 leaves
//! journal rows whose transactions are visible in the recorded snapshot: they are skipped by the next
//! batch and deleted by its step 5. So every change is applied, and none twice.
//!
//! Every call is bounded on the client side; a batch that times out is abandoned (both transactions
//! roll back with their sessions) and redone later.

mod capture_watch;
mod retry_queue;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::{Object, Transaction};
use postgres_types::{ToSql, Type};
use serde_json::Value;
use tokio_postgres::{IsolationLevel, Portal, Row};
use tracing::{debug, info, warn};

use self::capture_watch::CaptureWatch;
use self::retry_queue::RetryQueue;
use crate::catalog::mapping::{Column, TableMapping, load_mapping};
use crate::config::TableSpec;
use crate::config::{DatabaseRole, RetrySettings, Settings};
use crate::connection::{Pools, SessionLimits, Within, end_abandoned_sessions};
use crate::error::{Error, Result, policy};
use crate::ops::telemetry::Telemetry;
use crate::pipeline::apply::{Applier, ChunkOutcome, Counts, Mode, connection_lost};
use crate::pipeline::changes::ChangeQueries;
use crate::pipeline::chunks::ChunkSizer;
use crate::source::capture::{self, CaptureState};
use crate::source::journal::JournalUpkeep;
use crate::source::snapshot::PgSnapshot;
use crate::target::progress;
use crate::target::sync_errors::{self, OpenRow};

/// Why a batch runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum BatchKind {
    /// The real-time path: only the journal.
    Stream,
    /// A sweep: the journal, rows updated within `lookback`, and rows whose apply failed before
    /// and whose retry is due.
    Sweep { lookback: Duration },
}

/// What one look at every table before a pass told about one of them, so that hundreds of idle
/// tables do not cost a query each (see `SyncLoop::pass`). Whatever is None, the batch asks for
/// itself.
#[derive(Debug, Default)]
pub(crate) struct Look {
    /// When its journal was seen holding no row; None when it held some or could not be told.
    pub(crate) quiet_since: Option<SystemTime>,
    /// Its capture, for a sweep.
    pub(crate) capture: Option<CaptureState>,
    /// Its unresolved rows in `sync_errors`, for a sweep.
    pub(crate) open: Option<Vec<OpenRow>>,
}

/// What one batch did.
#[derive(Debug, Clone)]
pub(crate) struct BatchReport {
    pub(crate) table: String,
    pub(crate) counts: Counts,
    pub(crate) duration: Duration,
}

/// How a batch ended.
#[derive(Debug)]
pub(crate) enum BatchOutcome {
    /// Rows were applied, and progress moved with them.
    Applied(BatchReport),
    /// Nothing changed since the previous batch.
    Nothing,
    /// Another process moved this table's progress: it is reloaded, and the batch can run again.
    ProgressMoved,
}

/// A synced table and its replication state.
pub(crate) struct TableSync {
    pub(crate) mapping: TableMapping,
    queries: ChangeQueries,
    applier: Applier,
    journal: JournalUpkeep,
    /// The applied snapshot as last read or written; None means "reload from the target".
    progress: Option<PgSnapshot>,
    /// The applied snapshots of the other mappings of this source table, as the last progress
    /// lock saw them: journal rows go once all have applied them.
    others: Vec<String>,
    /// See [`TableSync::was_quiet`].
    was_quiet: bool,
    /// Rows the target rejected, waiting for their retry.
    retries: RetryQueue,
    capture: CaptureWatch,
    /// The table is partitioned and a sweep runs: after the batch, capture partitions created or
    /// attached since and let go of detached ones.
    partitions_due: bool,
    /// The last attempt to do so failed (said once, until it works).
    partitions_failing: bool,
    /// How many change rows each read asks for (`BATCH_SIZE`, fewer for wide rows).
    chunks: ChunkSizer,
    /// Client-side bound of each call.
    limit: Duration,
    retry: RetrySettings,
    telemetry: Arc<Telemetry>,
}

const SOURCE: DatabaseRole = DatabaseRole::Source;
const TARGET: DatabaseRole = DatabaseRole::Target;

/// The change query's parameters: `$1` the previous snapshot, `$2` the look-back in seconds (or
/// NULL), `$3` the keys to retry.
const CHANGE_PARAMS: [Type; 3] = [Type::TEXT, Type::FLOAT8, Type::JSONB_ARRAY];

/// What a batch asks of the source besides the journal.
struct ChangeRequest {
    lookback: Option<f64>,
    retry_keys: Vec<Value>,
}

/// The source side of a batch: its REPEATABLE READ transaction and the snapshot it took.
struct SourceRead<'a> {
    stx: Transaction<'a>,
    cur: PgSnapshot,
    /// When `cur` was taken, for the lag.
    taken_at: SystemTime,
}

/// The change rows of a batch, being read in chunks through a portal.
struct Changes {
    portal: Portal,
    first: Chunk,
}

/// Rows read from the change query's portal, and whether it may hold more.
struct Chunk {
    rows: Vec<Row>,
    more: bool,
}

/// How applying the change rows ended.
enum Streamed {
    /// Every chunk was applied (some rows may have been rejected and isolated, in careful mode).
    Done {
        outcome: ChunkOutcome,
        resolved: Vec<String>,
    },
    /// The target rejected a row in fast mode: the transaction is aborted; replay carefully.
    Rejected,
}

/// How the target side of a batch ended.
enum Applied {
    Committed(ChunkOutcome),
    Nothing,
    ProgressMoved,
}

impl TableSync {
    /// Loads the mapping and state of a table that `setup` has prepared.
    pub(crate) async fn load(
        pools: &Pools,
        table: &TableSpec,
        settings: &Settings,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self> {
        let limit = SessionLimits::from_settings(settings).client_timeout();
        let source = pools.source().await?;
        let target = pools.target().await?;
        let mapping = load_mapping(&**source, &**target, table)
            .within(limit, SOURCE, || "reading the table definitions".into())
            .await?;
        let journal = mapping.journal_for_key()?.clone();
        let name = mapping.name();
        let upkeep = JournalUpkeep::new(&source, &name, &journal.quoted(), limit).await?;
        progress::adopt_legacy(&**target, &mapping.source)
            .within(limit, TARGET, || {
                "moving progress to the table's name".into()
            })
            .await?;
        let progress = progress::load(&**target, &name)
            .within(limit, TARGET, || "reading progress".into())
            .await?;
        if progress.is_none() {
            return Err(Error::NotSetUp { table: name });
        }
        let open = sync_errors::unresolved_rows(&**target, &name)
            .within(limit, TARGET, || "reading sync_errors".into())
            .await?;
        let sync = Self {
            queries: ChangeQueries::new(&mapping, &journal),
            applier: Applier::new(&mapping, limit, settings.batch_bytes),
            journal: upkeep,
            mapping,
            progress,
            others: Vec::new(),
            was_quiet: false,
            retries: RetryQueue::from_records(open),
            capture: CaptureWatch::new(settings.lookback),
            partitions_due: false,
            partitions_failing: false,
            chunks: ChunkSizer::new(settings.batch_size, settings.batch_bytes),
            limit,
            retry: settings.retry,
            telemetry,
        };
        sync.telemetry.add_table(&name);
        sync.telemetry
            .set_table_backlog(&name, None, sync.unresolved_count());
        Ok(sync)
    }

    pub(crate) fn name(&self) -> String {
        self.mapping.name()
    }

    /// The snapshot applied so far, as last seen (None while a batch runs or before the first).
    pub(crate) fn applied(&self) -> Option<&PgSnapshot> {
        self.progress.as_ref()
    }

    /// The last batch found the journal empty without opening a transaction (see
    /// [`TableSync::run_batch`]): it holds no row, pending or stuck, as of then.
    pub(crate) fn was_quiet(&self) -> bool {
        self.was_quiet
    }

    /// The applied snapshots of the other mappings of this source, as last read.
    pub(crate) fn others(&self) -> &[String] {
        &self.others
    }

    /// Rows of this table whose apply failed and that are waiting for a retry.
    pub(crate) fn unresolved_count(&self) -> usize {
        self.retries.len()
    }

    /// Runs one batch: the steps in the module's documentation. Then, when the batch's sweep found
    /// partitions (created or attached since) without capture, captures them.
    ///
    /// `look`: what was seen of the table before the pass. When its journal was seen empty, a
    /// sweep only checks capture and retries, and opens no batch when neither asks for one.
    pub(crate) async fn run_batch(
        &mut self,
        pools: &Pools,
        kind: BatchKind,
        look: Look,
    ) -> Result<BatchOutcome> {
        let outcome = self.batch(pools, kind, look).await;
        if matches!(kind, BatchKind::Sweep { .. })
            && matches!(
                outcome,
                Ok(BatchOutcome::Applied(_) | BatchOutcome::Nothing)
            )
        {
            // The sweep's batch went through, with its look-back if it had one.
            self.capture.looked_back();
        }
        if std::mem::take(&mut self.partitions_due) {
            self.capture_partitions(pools).await;
        }
        outcome
    }

    /// Gives the table's partitions their capture triggers, journaling the rows of those that had
    /// none (so rows written into them meanwhile are read), and lets go of detached ones
    /// (`rowsync.capture_partitions`). It waits for no writer: with the partition locked, it gives
    /// up and the next sweep tries again.
    async fn capture_partitions(&mut self, pools: &Pools) {
        let name = self.name();
        let captured = async {
            let mut source = pools.source().await?;
            capture::capture_partitions(&mut source, &self.mapping.source).await
        }
        .within(self.limit, SOURCE, || {
            format!("capturing the partitions of {name}")
        })
        .await;
        match captured {
            Ok(done) => {
                self.partitions_failing = false;
                for line in done {
                    if line.starts_with("dropped") {
                        warn!(table = %name, "{line} (run rowsync setup to copy the table again)");
                    } else {
                        info!(table = %name, "{line}");
                    }
                }
            }
            Err(_) if self.partitions_failing => {}
            Err(err) => {
                self.partitions_failing = true;
                warn!(table = %name, error = %crate::error::chain(&err), "partitions without capture: writes into them wait until they are captured (rowsync's source role needs EXECUTE on rowsync.capture_partitions, or run rowsync setup)");
            }
        }
    }

    /// The mapping was read again because the tables' columns changed (it was `before`). Rows
    /// written since a column came to be synced may have been applied without it: the rows whose
    /// value there is not NULL (what the target column holds) are journaled, so they are read
    /// again.
    pub(crate) async fn columns_changed(&self, pools: &Pools, before: &TableMapping) -> Result<()> {
        let name = self.name();
        let added: Vec<&Column> = self
            .mapping
            .columns
            .iter()
            .filter(|c| {
                !before
                    .columns
                    .iter()
                    .any(|b| b.target_name == c.target_name)
            })
            .collect();
        let dropped: Vec<&str> = before
            .columns
            .iter()
            .filter(|b| {
                !self
                    .mapping
                    .columns
                    .iter()
                    .any(|c| c.target_name == b.target_name)
            })
            .map(|b| b.target_name.as_str())
            .collect();
        if !dropped.is_empty() {
            info!(table = %name, columns = ?dropped, "columns no longer on both sides are not written any more");
        }
        if added.is_empty() {
            return Ok(());
        }
        // Target rows holding values in the new columns (a default of a column the target added
        // first) must be written again too, and the source cannot tell which: then every row.
        let any_value = |value: &dyn Fn(&Column) -> String| {
            added
                .iter()
                .map(|c| format!("{} IS NOT NULL", value(c)))
                .collect::<Vec<_>>()
                .join(" OR ")
        };
        let target_has_values = format!(
            "SELECT EXISTS (SELECT 1 FROM {} t WHERE {})",
            self.mapping.target.quoted(),
            any_value(&|c| c.target_ref("t"))
        );
        let target = pools.target().await?;
        let everything: bool = target
            .query_one(&target_has_values, &[])
            .within(self.limit, TARGET, || {
                format!("looking at the new columns of {name} in the target")
            })
            .await?
            .get(0);
        drop(target);
        let condition = if everything {
            "true".to_string()
        } else {
            any_value(&|c| c.source_ref("s"))
        };
        let journaled = self
            .journal_rows(pools, &condition, "with values in new columns")
            .await?;
        info!(
            table = %name,
            columns = ?added.iter().map(|c| c.target_name.as_str()).collect::<Vec<_>>(),
            rows = journaled,
            "columns now synced; rows with values in them are read again"
        );
        Ok(())
    }

    /// The configured mapping (filter, columns, key, target) differs from the one the target's
    /// rows were written with, as the progress row records it: every source row is journaled, so
    /// the next batches read each again the new way (rows the filter now leaves out leave the
    /// target, computed columns are recomputed), without a copy. Recorded once journaled.
    pub(crate) async fn mapping_changed(&self, pools: &Pools) -> Result<()> {
        let name = self.name();
        let target = pools.target().await?;
        let recorded = match progress::mapping(&**target, &name)
            .within(self.limit, TARGET, || "reading the recorded mapping".into())
            .await
        {
            Ok(recorded) => recorded,
            Err(err)
                if err.postgres().and_then(|e| e.code())
                    == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) =>
            {
                warn!(table = %name, "the target lacks migration 006 (run rowsync setup): a changed mapping is not noticed");
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        if recorded == self.mapping.definition {
            return Ok(());
        }
        let journaled = self
            .journal_rows(pools, "true", "for its new mapping")
            .await?;
        progress::set_mapping(&**target, &name, self.mapping.definition.as_deref())
            .within(self.limit, TARGET, || "recording the mapping".into())
            .await?;
        info!(table = %name, rows = journaled, "the mapping changed since the target's rows were written: every row is read again");
        Ok(())
    }

    /// Journals the keys of the source rows (as `s`) for which `condition` holds, so that they are
    /// read again; `why` says what for, in errors.
    async fn journal_rows(&self, pools: &Pools, condition: &str, why: &str) -> Result<u64> {
        let journal = self.mapping.journal()?;
        let keys = self.mapping.key_list();
        pools
            .source()
            .await?
            .execute(
                &format!(
                    "INSERT INTO {journal} ({keys}) SELECT {keys} FROM {table} s WHERE {condition}",
                    journal = journal.quoted(),
                    table = self.mapping.source.quoted(),
                ),
                &[],
            )
            .within(self.limit, SOURCE, || {
                format!("journaling the rows of {} {why}", self.name())
            })
            .await
    }

    async fn batch(&mut self, pools: &Pools, kind: BatchKind, look: Look) -> Result<BatchOutcome> {
        let started = Instant::now();
        let name = self.name();
        self.was_quiet = false;
        let prev = self.applied_snapshot(pools).await?;
        let request = match kind {
            BatchKind::Stream => ChangeRequest {
                lookback: None,
                retry_keys: Vec::new(),
            },
            BatchKind::Sweep { lookback } => {
                match look.open {
                    Some(open) => self.retries_read(open),
                    None => self.reload_retries(pools).await,
                }
                let capture = match look.capture {
                    Some(capture) => capture,
                    None => self.capture_state(pools).await?,
                };
                self.request(lookback, capture)
            }
        };
        // An empty journal, no look-back wanted, no retry due: nothing for a batch to read.
        if let (Some(looked_at), None, true) = (
            look.quiet_since,
            request.lookback,
            request.retry_keys.is_empty(),
        ) {
            self.telemetry.checked(&name, looked_at);
            self.progress = Some(prev);
            self.was_quiet = true;
            return Ok(BatchOutcome::Nothing);
        }
        let mut source = pools.source().await?;
        let read = open_read(&mut source, self.limit, &name, &self.queries.lock).await?;
        let outcome = match self.apply(pools, &read, &prev, &request).await? {
            Applied::Committed(outcome) => outcome,
            Applied::Nothing => {
                // Nothing visible since `prev`; the snapshot need not move.
                self.telemetry.checked(&name, read.taken_at);
                self.progress = Some(prev);
                return Ok(BatchOutcome::Nothing);
            }
            Applied::ProgressMoved => return Ok(BatchOutcome::ProgressMoved),
        };
        crate::failpoint::crash_point!("batch-after-target-commit");
        let taken_at = read.taken_at;
        self.progress = Some(read.cur.clone());
        // The target has the batch; the journal rows behind it can go. If this fails they are
        // skipped by later batches anyway (visible in the recorded snapshot) and deleted next time.
        match delete_consumed(read, &self.queries.cleanup, &self.others, self.limit).await {
            Ok(deleted) => self.journal.consumed(deleted, &mut source).await,
            Err(err) => {
                warn!(table = %name, error = %crate::error::chain(&err), "could not delete consumed journal rows; will retry");
                // The session may be hung or broken: keep it out of the pool.
                drop(Object::take(source));
            }
        }
        self.telemetry.batch(&name, outcome.counts, taken_at);
        self.telemetry
            .set_table_backlog(&name, None, self.retries.len());
        Ok(BatchOutcome::Applied(BatchReport {
            table: name,
            counts: outcome.counts,
            duration: started.elapsed(),
        }))
    }

    /// Reads the table's unresolved rows from `sync_errors` again, so that what operators did
    /// there (`rowsync errors retry`, `resolve`, or SQL) counts from this sweep on: a retry asked
    /// for is due now, a row resolved by hand is not retried any more. Best effort: when the
    /// target cannot tell now, the queue stays as it is.
    async fn reload_retries(&mut self, pools: &Pools) {
        let name = self.name();
        let open = async {
            let target = pools.target().await?;
            sync_errors::unresolved_rows(&**target, &name)
                .within(self.limit, TARGET, || "reading sync_errors".into())
                .await
        }
        .await;
        match open {
            Ok(open) => self.retries_read(open),
            Err(err) => {
                debug!(table = %name, error = %crate::error::chain(&err), "could not read sync_errors again; retrying rows as known");
            }
        }
    }

    /// The table's unresolved rows, as just read from `sync_errors`, are the ones to retry.
    fn retries_read(&mut self, open: Vec<OpenRow>) {
        self.retries = RetryQueue::from_records(open);
        self.telemetry
            .set_table_backlog(&self.name(), None, self.retries.len());
    }

    async fn capture_state(&self, pools: &Pools) -> Result<CaptureState> {
        let source = pools.source().await?;
        capture::capture_state(&**source, &self.mapping.source)
            .within(self.limit, SOURCE, || "checking capture".into())
            .await
    }

    /// The snapshot applied so far: as last seen, or read from the target.
    async fn applied_snapshot(&mut self, pools: &Pools) -> Result<PgSnapshot> {
        if let Some(prev) = self.progress.take() {
            return Ok(prev);
        }
        let target = pools.target().await?;
        progress::load(&**target, &self.name())
            .within(self.limit, TARGET, || "reading progress".into())
            .await?
            .ok_or_else(|| Error::NotSetUp { table: self.name() })
    }

    /// What a sweep's batch asks for besides the journal, given the table's capture as it is
    /// now: the look-back (when capture may have been bypassed, see [`CaptureWatch`]) and the
    /// rejected rows whose retry is due.
    fn request(&mut self, lookback: Duration, state: CaptureState) -> ChangeRequest {
        let name = self.name();
        self.telemetry
            .set_capture(&name, state.intact, state.lost.clone());
        // Every sweep: a detached partition leaves the triggers of the others intact.
        self.partitions_due = state.partitioned;
        let wanted = self.capture.look_back(&name, state);
        ChangeRequest {
            lookback: (wanted && self.mapping.updated_at.is_some())
                .then_some(lookback.as_secs_f64()),
            retry_keys: self.retries.due(Instant::now()),
        }
    }

    /// Steps 2 to 4: reads the changes and applies them under the progress lock; when the target
    /// rejects a row, replays the batch carefully from the same source snapshot.
    async fn apply(
        &mut self,
        pools: &Pools,
        read: &SourceRead<'_>,
        prev: &PgSnapshot,
        request: &ChangeRequest,
    ) -> Result<Applied> {
        let mut mode = Mode::Fast;
        loop {
            let changes = self.read_changes(&read.stx, prev, request, mode).await?;
            if changes.first.rows.is_empty() {
                return Ok(Applied::Nothing);
            }
            let mut target = pools.target().await?;
            let ttx = target
                .transaction()
                .within(self.limit, TARGET, || {
                    format!("starting the apply of {}", self.name())
                })
                .await?;
            match self.lock_progress(&ttx, prev).await {
                Ok(true) => {}
                Ok(false) => return Ok(Applied::ProgressMoved),
                Err(err) => {
                    if policy::waited_for_a_lock(&err) {
                        drop(ttx);
                        self.end_abandoned_sessions(&target).await?;
                    }
                    return Err(err);
                }
            }
            crate::failpoint::crash_point!("batch-after-progress-lock");
            match self.stream(&ttx, &read.stx, changes, mode).await? {
                Streamed::Rejected => {
                    // The transaction is aborted; start again under savepoints. The source
                    // transaction still has the same snapshot, so the replay sees the same rows.
                    let _ = ttx.rollback().await;
                    mode = Mode::Careful;
                }
                Streamed::Done { outcome, resolved } => {
                    self.commit(ttx, &outcome, &resolved, &read.cur).await?;
                    return Ok(Applied::Committed(outcome));
                }
            }
        }
    }

    /// Step 2: binds the change query and reads its first chunk.
    async fn read_changes(
        &self,
        stx: &Transaction<'_>,
        prev: &PgSnapshot,
        request: &ChangeRequest,
        mode: Mode,
    ) -> Result<Changes> {
        let name = self.name();
        // Keys as JSON are needed only to record rejected rows (careful mode) or to notice
        // earlier ones going through.
        let keyed = mode == Mode::Careful || !self.retries.is_empty();
        let statement = stx
            .prepare_typed_cached(self.queries.changes(keyed), &CHANGE_PARAMS)
            .within(self.limit, SOURCE, || {
                format!("preparing the change query of {name}")
            })
            .await?;
        let params: [&(dyn ToSql + Sync); 3] = [prev, &request.lookback, &request.retry_keys];
        let portal = stx
            .bind(&statement, &params)
            .within(self.limit, SOURCE, || format!("reading changes of {name}"))
            .await?;
        let first = self.next_chunk(stx, &portal).await?;
        Ok(Changes { portal, first })
    }

    async fn next_chunk(&self, stx: &Transaction<'_>, portal: &Portal) -> Result<Chunk> {
        let asked = self.chunks.rows();
        let rows = stx
            .query_portal(portal, asked as i32)
            .within(self.limit, SOURCE, || {
                format!("reading changes of {}", self.name())
            })
            .await?;
        self.chunks.observe(&rows);
        Ok(Chunk {
            more: rows.len() >= asked,
            rows,
        })
    }

    /// Step 3: locks the table's progress row. False when it no longer says `prev` (another
    /// process moved it): the progress is reloaded before the next batch.
    async fn lock_progress(&mut self, ttx: &Transaction<'_>, prev: &PgSnapshot) -> Result<bool> {
        let name = self.name();
        let statement = ttx
            .prepare_cached(progress::LOCK)
            .within(self.limit, TARGET, || {
                format!("locking the progress of {name}")
            })
            .await?;
        let source = self.mapping.source.to_string();
        let locked = progress::lock_with(&**ttx, &statement, &name, &source)
            .within(self.limit, TARGET, || "locking progress".into())
            .await?;
        self.others = locked.others;
        Ok(locked.snapshot.as_ref() == Some(prev))
    }

    /// The progress lock could not be had: most likely a session of ours that hung and was given
    /// up on still holds it, idle in its transaction. Ends such sessions (the batch is retried).
    async fn end_abandoned_sessions(&self, target: &Object) -> Result<()> {
        let ended = end_abandoned_sessions(&***target, TARGET, self.limit)
            .within(self.limit, TARGET, || "ending abandoned sessions".into())
            .await?;
        if ended > 0 {
            warn!(table = %self.name(), sessions = ended, "ended abandoned rowsync sessions that held the progress lock");
        }
        Ok(())
    }

    /// Step 4, apply: every chunk into the target, the next chunk read from the source while the
    /// current one is applied (two sessions, two servers: a large batch costs max(read, apply), not
    /// the sum).
    async fn stream(
        &self,
        ttx: &Transaction<'_>,
        stx: &Transaction<'_>,
        changes: Changes,
        mode: Mode,
    ) -> Result<Streamed> {
        let mut outcome = ChunkOutcome::default();
        let mut resolved = Vec::new();
        let mut chunk = changes.first;
        loop {
            let (rows, more) = (std::mem::take(&mut chunk.rows), chunk.more);
            let next = async {
                if more {
                    self.next_chunk(stx, &changes.portal).await
                } else {
                    Ok(Chunk {
                        rows: Vec::new(),
                        more: false,
                    })
                }
            };
            let (applied, next) = tokio::join!(self.applier.apply(ttx, &rows, mode), next);
            match applied {
                Ok(applied) => {
                    self.retries.went_through(&rows, &applied, &mut resolved);
                    outcome.counts += applied.counts;
                    outcome.failures.extend(applied.failures);
                }
                Err(Error::Sql { source, .. })
                    if mode == Mode::Fast && !connection_lost(&source) =>
                {
                    debug!(
                        table = %self.name(),
                        sqlstate = source.code().map(|c| c.code()).unwrap_or(""),
                        "target rejected a row; replaying the batch to isolate it"
                    );
                    return Ok(Streamed::Rejected);
                }
                Err(other) => return Err(other),
            }
            self.telemetry.beat();
            // The applied rows go before the next chunk is taken on: two chunks at most in memory.
            drop(rows);
            chunk = next?;
            if chunk.rows.is_empty() {
                return Ok(Streamed::Done { outcome, resolved });
            }
        }
    }

    /// Step 4, commit: records the rejected rows, resolves the ones that went through, moves the
    /// progress to `cur`, all in the target transaction; then updates the retry queue.
    async fn commit(
        &mut self,
        ttx: Transaction<'_>,
        outcome: &ChunkOutcome,
        resolved: &[String],
        cur: &PgSnapshot,
    ) -> Result<()> {
        let name = self.name();
        let limit = self.limit;
        let mut delays = Vec::with_capacity(outcome.failures.len());
        for failure in &outcome.failures {
            let retry_count = self.retries.retries_of(&failure.key);
            self.telemetry.recorded(failure.error_type.as_str());
            let delay =
                sync_errors::record_rejected(&*ttx, &name, failure, retry_count, &self.retry)
                    .within(limit, TARGET, || "recording a rejected row".into())
                    .await?;
            delays.push(delay);
        }
        sync_errors::resolve_rows(&*ttx, &name, resolved)
            .within(limit, TARGET, || "resolving sync_errors".into())
            .await?;
        let statement = ttx
            .prepare_cached(progress::ADVANCE)
            .within(limit, TARGET, || {
                format!("recording the progress of {name}")
            })
            .await?;
        progress::advance_with(&*ttx, &statement, &name, cur, false)
            .within(limit, TARGET, || "recording progress".into())
            .await?;
        ttx.commit()
            .within(limit, TARGET, || format!("committing changes of {name}"))
            .await?;
        self.retries
            .committed(&name, resolved, &outcome.failures, &delays);
        Ok(())
    }

    /// Deletes journal rows already covered by the recorded progress (left over by a crash between
    /// a batch's commit and its cleanup).
    pub(crate) async fn clean_journal(&mut self, pools: &Pools) -> Result<u64> {
        let target = pools.target().await?;
        let snapshot = progress::load(&**target, &self.name())
            .within(self.limit, TARGET, || "reading progress".into())
            .await?;
        let Some(snapshot) = snapshot else {
            return Ok(0);
        };
        let others = progress::others(&**target, &self.name(), &self.mapping.source.to_string())
            .within(self.limit, TARGET, || "reading progress".into())
            .await?;
        drop(target);
        let source = pools.source().await?;
        let deleted = source
            .execute(&self.queries.cleanup, &[&snapshot, &others])
            .within(self.limit, SOURCE, || {
                "deleting consumed journal rows".into()
            })
            .await?;
        self.progress = Some(snapshot);
        self.others = others;
        Ok(deleted)
    }
}

/// Step 1: the source transaction of a batch, and its snapshot.
async fn open_read<'a>(
    source: &'a mut Object,
    limit: Duration,
    table: &str,
    lock: &str,
) -> Result<SourceRead<'a>> {
    let stx = source
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .within(limit, SOURCE, || format!("starting a batch of {table}"))
        .await?;
    let taken_at = SystemTime::now();
    // The lock first, then the snapshot (see ChangeQueries::lock), pipelined: polled in order
    // (biased), the lock goes out first, so the server has it before the snapshot query, and before that query
    // is even parsed (parsing takes the transaction's snapshot too). Statements of the hot path
    // are prepared once per pooled session.
    let snapshot = async {
        let current = stx
            .prepare_cached(PgSnapshot::CURRENT)
            .within(limit, SOURCE, || "preparing the snapshot query".into())
            .await?;
        stx.query_one(&current, &[])
            .within(limit, SOURCE, || "taking a snapshot".into())
            .await
    };
    let ((), cur) = tokio::try_join!(
        biased;
        stx.batch_execute(lock)
            .within(limit, SOURCE, || format!("locking {table} for a batch")),
        snapshot,
    )?;
    let cur: PgSnapshot = cur.get(0);
    Ok(SourceRead { stx, cur, taken_at })
}

/// Step 5: deletes the journal rows of every transaction visible in the batch's snapshot (all are
/// applied now) and ends the source transaction. Returns how many rows went.
async fn delete_consumed(
    read: SourceRead<'_>,
    cleanup: &str,
    others: &[String],
    limit: Duration,
) -> Result<u64> {
    let SourceRead { stx, cur, .. } = read;
    let cleanup = stx
        .prepare_cached(cleanup)
        .within(limit, SOURCE, || "preparing the journal cleanup".into())
        .await?;
    // Losing this commit in a crash is harmless (the recorded progress makes the next batch skip
    // these rows and delete them again), so it need not wait for the WAL flush. The two statements
    // are pipelined: one round trip.
    let params: [&(dyn ToSql + Sync); 2] = [&cur, &others];
    let ((), deleted) = tokio::try_join!(
        stx.batch_execute("SET LOCAL synchronous_commit TO off")
            .within(limit, SOURCE, || "relaxing the cleanup's commit".into()),
        stx.execute(&cleanup, &params)
            .within(limit, SOURCE, || "deleting consumed journal rows".into()),
    )?;
    stx.commit()
        .within(limit, SOURCE, || "ending the batch".into())
        .await?;
    Ok(deleted)
}
