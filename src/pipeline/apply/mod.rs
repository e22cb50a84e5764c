//! Writing changes into the target: batched, idempotent, rejected rows isolated.
//!
//! A chunk of change rows (see [`crate::pipeline::changes`]) becomes at most two statements: one DELETE for
//! keys gone from the source, then one upsert for the rest. The upsert skips rows whose content is
//! already identical, so re-applying a chunk writes nothing, and counts what it did.
//!
//! Two modes. [`Mode::Fast`] runs the statements as they are; if the target rejects anything the
//! error goes up, the caller rolls the whole target transaction back and replays the batch in
//! [`Mode::Careful`]. There, rows whose target row another session holds locked are set aside at
//! once (`FOR UPDATE SKIP LOCKED`, no waiting), then each statement runs under a savepoint and a
//! failing one is split in halves until the rejected rows are isolated. They are returned as
//! [`RowFailure`]s; every other row is applied. (Savepoints are kept off the fast path: each one that
//! writes is a subtransaction, and more than 64 in one transaction slow every snapshot on the
//! target.)
//!
//! Every call is bounded on the client side (see [`crate::connection::Within`]).

pub(crate) mod statements;
mod values;

use std::ops::AddAssign;
use std::time::Duration;

use postgres_types::ToSql;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

pub(crate) use self::statements::ApplyStatements;
use self::values::ColumnArray;
use crate::catalog::mapping::TableMapping;
use crate::config::DatabaseRole;
use crate::connection::Within;
use crate::error::policy::{self, ErrorType};
use crate::error::{Error, Result};
use crate::pipeline::changes::Layout;
use crate::pipeline::chunks;

/// What a batch did to the target.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Counts {
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Keys whose target row already matched (or was already absent).
    pub unchanged: u64,
    /// Rows the target rejected; each is in `sync_errors`.
    pub failed: u64,
}

impl Counts {
    pub(crate) fn total(&self) -> u64 {
        self.created + self.updated + self.deleted + self.unchanged + self.failed
    }
}

impl std::ops::Sub for Counts {
    type Output = Self;

    /// What happened between two totals (`later - earlier`).
    fn sub(self, earlier: Self) -> Self {
        Self {
            created: self.created - earlier.created,
            updated: self.updated - earlier.updated,
            deleted: self.deleted - earlier.deleted,
            unchanged: self.unchanged - earlier.unchanged,
            failed: self.failed - earlier.failed,
        }
    }
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.created += other.created;
        self.updated += other.updated;
        self.deleted += other.deleted;
        self.unchanged += other.unchanged;
        self.failed += other.failed;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Upsert,
    Delete,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Upsert => "upsert",
            Self::Delete => "delete",
        }
    }
}

/// A row the target rejected, or could not take now.
#[derive(Debug, Clone)]
pub(crate) struct RowFailure {
    /// The key as a JSON object (`{"id": "…"}`).
    pub key: serde_json::Value,
    pub operation: Operation,
    pub error_type: ErrorType,
    pub sqlstate: Option<String>,
    /// One line: what went wrong.
    pub message: String,
    /// Everything known: the error chain and the server's detail, hint, constraint…
    pub stack_trace: String,
}

impl RowFailure {
    fn from_error(
        key: serde_json::Value,
        operation: Operation,
        error: &tokio_postgres::Error,
    ) -> Self {
        Self {
            key,
            operation,
            error_type: policy::decide_driver(error).error_type,
            sqlstate: error.code().map(|code| code.code().to_string()),
            message: crate::error::chain(error),
            stack_trace: crate::target::sync_errors::stack_trace(error),
        }
    }

    fn locked(key: serde_json::Value, operation: Operation) -> Self {
        let message = "the target row is locked by another session; will retry".to_string();
        Self {
            key,
            operation,
            error_type: ErrorType::Timeout,
            sqlstate: None,
            stack_trace: message.clone(),
            message,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Fast,
    Careful,
}

/// Per-table apply machinery.
#[derive(Debug, Clone)]
pub(crate) struct Applier {
    statements: ApplyStatements,
    layout: Layout,
    columns: usize,
    keys: usize,
    /// Client-side bound of each call.
    limit: Duration,
    /// Bytes of row data per statement, at most (`BATCH_MAX_MB`).
    max_bytes: usize,
}

/// What [`Applier::apply`] did to one chunk.
#[derive(Debug, Default)]
pub(crate) struct ChunkOutcome {
    pub counts: Counts,
    pub failures: Vec<RowFailure>,
}

const ROLE: DatabaseRole = DatabaseRole::Target;

impl Applier {
    pub(crate) fn new(mapping: &TableMapping, limit: Duration, max_bytes: usize) -> Self {
        Self {
            statements: ApplyStatements::new(mapping),
            layout: Layout::new(mapping),
            columns: mapping.columns.len(),
            keys: mapping.key.len(),
            limit,
            max_bytes,
        }
    }

    /// Applies one chunk of change rows in the target transaction `tx`.
    ///
    /// In [`Mode::Fast`] any error is returned (and leaves `tx` aborted). In [`Mode::Careful`] only
    /// a lost or hung connection is; rejected rows come back in [`ChunkOutcome::failures`].
    pub(crate) async fn apply(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        rows: &[Row],
        mode: Mode,
    ) -> Result<ChunkOutcome> {
        let mut deletes = Vec::new();
        let mut upserts = Vec::new();
        for row in rows {
            let present: bool = row
                .try_get(Layout::PRESENT)
                .map_err(|source| sql_error("reading a change row", source))?;
            if present {
                upserts.push(row);
            } else {
                deletes.push(row);
            }
        }
        let mut outcome = ChunkOutcome::default();
        // Deletes first: a deleted row may free a unique value (an email) that an upsert takes.
        for (operation, group) in [(Operation::Delete, deletes), (Operation::Upsert, upserts)] {
            if group.is_empty() {
                continue;
            }
            match mode {
                Mode::Fast => outcome.counts += self.execute(tx, operation, &group).await?,
                Mode::Careful => {
                    let group = self
                        .set_aside_locked(tx, operation, group, &mut outcome)
                        .await?;
                    self.isolate(tx, operation, &group, &mut outcome).await?;
                }
            }
        }
        Ok(outcome)
    }

    /// Adds the keys of `rows` to the temporary table `rowsync_stage_keys` (initial copy).
    pub(crate) async fn stage_keys(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        rows: &[Row],
    ) -> Result<()> {
        let rows: Vec<&Row> = rows.iter().collect();
        let arrays = self.arrays(&rows, Operation::Delete)?;
        let params: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        tx.execute(&self.statements.stage_keys, &params)
            .within(self.limit, ROLE, || "recording copied keys".into())
            .await?;
        Ok(())
    }

    /// Locks the target rows of `rows` that nobody else holds; rows whose target row another
    /// session holds become failures (retried later) instead of waiting for `lock_timeout`.
    async fn set_aside_locked<'r>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        operation: Operation,
        rows: Vec<&'r Row>,
        outcome: &mut ChunkOutcome,
    ) -> Result<Vec<&'r Row>> {
        let arrays = self.arrays(&rows, Operation::Delete)?;
        let params: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let locked = tx
            .query(&self.statements.locked, &params)
            .within(self.limit, ROLE, || "looking for locked target rows".into())
            .await?;
        if locked.is_empty() {
            return Ok(rows);
        }
        let positions: Vec<usize> = locked
            .iter()
            .map(|row| row.get::<_, i64>(0) as usize - 1)
            .collect();
        let mut free = Vec::with_capacity(rows.len());
        for (i, row) in rows.into_iter().enumerate() {
            if positions.contains(&i) {
                outcome.counts.failed += 1;
                outcome
                    .failures
                    .push(RowFailure::locked(key_of(row)?, operation));
            } else {
                free.push(row);
            }
        }
        Ok(free)
    }

    /// Runs `rows` under a savepoint; when the target rejects them, splits them in halves until
    /// each rejected row stands alone, and applies the rest.
    async fn isolate(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        operation: Operation,
        rows: &[&Row],
        outcome: &mut ChunkOutcome,
    ) -> Result<()> {
        let mut pending = if rows.is_empty() { vec![] } else { vec![rows] };
        while let Some(slice) = pending.pop() {
            self.simple(tx, "SAVEPOINT rowsync_apply").await?;
            match self.execute(tx, operation, slice).await {
                Ok(counts) => {
                    self.simple(tx, "RELEASE SAVEPOINT rowsync_apply").await?;
                    outcome.counts += counts;
                }
                Err(Error::Sql { source, .. }) if !connection_lost(&source) => {
                    self.simple(
                        tx,
                        "ROLLBACK TO SAVEPOINT rowsync_apply; RELEASE SAVEPOINT rowsync_apply",
                    )
                    .await?;
                    if let [row] = slice {
                        if operation == Operation::Upsert
                            && source.code() == Some(&SqlState::NOT_NULL_VIOLATION)
                            && let Some(counts) = self.update_only(tx, row).await?
                        {
                            outcome.counts += counts;
                            continue;
                        }
                        outcome.counts.failed += 1;
                        outcome.failures.push(RowFailure::from_error(
                            key_of(row)?,
                            operation,
                            &source,
                        ));
                    } else {
                        let (left, right) = slice.split_at(slice.len() / 2);
                        pending.push(right);
                        pending.push(left);
                    }
                }
                Err(other) => return Err(other),
            }
        }
        Ok(())
    }

    /// A row whose upsert the target refused as NOT NULL (a column rowsync does not write): updated
    /// in place if the target has it, under a savepoint. None when it has not (an insert is what
    /// it needs, and the failure stands) or the update was refused too.
    async fn update_only(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        row: &Row,
    ) -> Result<Option<Counts>> {
        let Some(sql) = &self.statements.update_only else {
            return Ok(None);
        };
        let rows = [row];
        let arrays = self.arrays(&rows, Operation::Upsert)?;
        let params: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        self.simple(tx, "SAVEPOINT rowsync_apply").await?;
        let updated = async {
            let statement = tx.prepare_cached(sql).await?;
            tx.execute(&statement, &params).await
        }
        .await;
        match updated {
            Ok(updated) => {
                self.simple(tx, "RELEASE SAVEPOINT rowsync_apply").await?;
                // Not there: nothing was written, and the row still needs an insert.
                Ok((updated > 0).then(|| Counts {
                    updated,
                    ..Counts::default()
                }))
            }
            Err(source) if !connection_lost(&source) => {
                self.simple(
                    tx,
                    "ROLLBACK TO SAVEPOINT rowsync_apply; RELEASE SAVEPOINT rowsync_apply",
                )
                .await?;
                Ok(None)
            }
            Err(source) => Err(sql_error("updating a row in place", source)),
        }
    }

    /// Applies `rows` in as many statements as their bytes need.
    async fn execute(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        operation: Operation,
        rows: &[&Row],
    ) -> Result<Counts> {
        let mut counts = Counts::default();
        for run in chunks::by_bytes(rows, self.max_bytes) {
            counts += self.statement(tx, operation, run).await?;
        }
        Ok(counts)
    }

    async fn statement(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        operation: Operation,
        rows: &[&Row],
    ) -> Result<Counts> {
        let arrays = self.arrays(rows, operation)?;
        let params: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let total = rows.len() as u64;
        let sql = match operation {
            Operation::Upsert => &self.statements.upsert,
            Operation::Delete => &self.statements.delete,
        };
        let statement = tx
            .prepare_cached(sql)
            .within(self.limit, ROLE, || {
                format!("preparing the {}", operation.as_str())
            })
            .await?;
        match operation {
            Operation::Upsert => {
                let written = tx
                    .query(&statement, &params)
                    .within(self.limit, ROLE, || "upserting changed rows".into())
                    .await?;
                let created = written.iter().filter(|row| row.get::<_, bool>(0)).count() as u64;
                let written = written.len() as u64;
                Ok(Counts {
                    created,
                    updated: written - created,
                    unchanged: total - written,
                    ..Counts::default()
                })
            }
            Operation::Delete => {
                let deleted = tx
                    .execute(&statement, &params)
                    .within(self.limit, ROLE, || "deleting removed rows".into())
                    .await?;
                Ok(Counts {
                    deleted,
                    unchanged: total - deleted,
                    ..Counts::default()
                })
            }
        }
    }

    /// The array parameters of a statement: all synced columns for an upsert, the key columns for
    /// a delete (and for the lock probe).
    fn arrays<'r>(&self, rows: &[&'r Row], operation: Operation) -> Result<Vec<ColumnArray<'r>>> {
        let positions: Vec<usize> = match operation {
            Operation::Upsert => (0..self.columns).map(|j| self.layout.column(j)).collect(),
            Operation::Delete => (0..self.keys).map(|i| self.layout.key(i)).collect(),
        };
        positions
            .into_iter()
            .map(|position| ColumnArray::from_rows(rows, position))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| sql_error("reading change values", source))
    }

    async fn simple(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        sql: &'static str,
    ) -> Result<()> {
        tx.batch_execute(sql)
            .within(self.limit, ROLE, || sql.to_string())
            .await
    }
}

fn key_of(row: &Row) -> Result<serde_json::Value> {
    row.try_get(Layout::KEY_JSON)
        .map_err(|source| sql_error("reading a change key", source))
}

fn sql_error(action: &str, source: tokio_postgres::Error) -> Error {
    Error::Sql {
        role: ROLE,
        action: action.to_string(),
        source,
    }
}

/// The session is gone (or going): nothing more can be done in this transaction.
pub(crate) fn connection_lost(error: &tokio_postgres::Error) -> bool {
    policy::decide_driver(error).connection_lost()
}
