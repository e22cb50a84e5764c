//! Writing changes into the target: batched, idempotent, rejected rows isolated.
//!
//! A chunk of change rows (see [`crate::changes`]) becomes at most two statements: one DELETE for
//! keys gone from the source, then one upsert for the rest. The upsert skips rows whose content is
//! already identical, so re-applying a chunk writes nothing, and counts what it did.
//!
//! Two modes. [`Mode::Fast`] runs the statements as they are; if the target rejects anything the
//! error goes up, the caller rolls the whole target transaction back and replays the batch in
//! [`Mode::Careful`], where each statement runs under a savepoint and a failing one is split in
//! halves until the rejected rows are isolated. They are returned as [`RowFailure`]s; every other row
//! is applied. (Savepoints are kept off the fast path: each one that writes is a subtransaction,
//! and more than 64 in one transaction slows every snapshot on the target.)

pub(crate) mod statements;
mod values;

use std::ops::AddAssign;

use postgres_types::ToSql;
use tokio_postgres::Row;

pub use self::statements::ApplyStatements;
use self::values::ColumnArray;
use crate::changes::Layout;
use crate::error_policy::{self, Disposition, ErrorType};
use crate::schema::TableMapping;

/// What a batch did to the target.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Keys whose target row already matched (or was already absent).
    pub unchanged: u64,
    /// Rows the target rejected; each is in `sync_errors`.
    pub failed: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.created + self.updated + self.deleted + self.unchanged + self.failed
    }

    /// Rows actually written.
    pub fn written(&self) -> u64 {
        self.created + self.updated + self.deleted
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
pub enum Operation {
    Upsert,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upsert => "upsert",
            Self::Delete => "delete",
        }
    }
}

/// A row the target rejected.
#[derive(Debug)]
pub struct RowFailure {
    /// The key as a JSON object (`{"id": "…"}`).
    pub key: serde_json::Value,
    pub operation: Operation,
    pub error: tokio_postgres::Error,
}

impl RowFailure {
    pub fn error_type(&self) -> ErrorType {
        error_policy::classify(&self.error).1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Fast,
    Careful,
}

/// Per-table apply machinery.
#[derive(Debug, Clone)]
pub struct Applier {
    statements: ApplyStatements,
    layout: Layout,
    columns: usize,
    keys: usize,
}

/// What [`Applier::apply`] did to one chunk.
#[derive(Debug, Default)]
pub struct ChunkOutcome {
    pub counts: Counts,
    pub failures: Vec<RowFailure>,
}

impl Applier {
    pub fn new(mapping: &TableMapping) -> Self {
        Self {
            statements: ApplyStatements::new(mapping),
            layout: Layout::new(mapping),
            columns: mapping.columns.len(),
            keys: mapping.key.len(),
        }
    }

    /// Applies one chunk of change rows in the target transaction `tx`.
    ///
    /// In [`Mode::Fast`] any error is returned (and leaves `tx` aborted). In [`Mode::Careful`] only
    /// a lost connection is; rejected rows come back in [`ChunkOutcome::failures`].
    pub async fn apply(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        rows: &[Row],
        mode: Mode,
    ) -> Result<ChunkOutcome, tokio_postgres::Error> {
        let mut deletes = Vec::new();
        let mut upserts = Vec::new();
        for row in rows {
            if row.try_get::<_, bool>(Layout::PRESENT)? {
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
                Mode::Careful => self.isolate(tx, operation, &group, &mut outcome).await?,
            }
        }
        Ok(outcome)
    }

    /// Runs `rows` under a savepoint; when the target rejects them, splits them in halves until
    /// each rejected row stands alone, and applies the rest.
    async fn isolate(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        operation: Operation,
        rows: &[&Row],
        outcome: &mut ChunkOutcome,
    ) -> Result<(), tokio_postgres::Error> {
        let mut pending = vec![rows];
        while let Some(slice) = pending.pop() {
            tx.batch_execute("SAVEPOINT rowsync_apply").await?;
            match self.execute(tx, operation, slice).await {
                Ok(counts) => {
                    tx.batch_execute("RELEASE SAVEPOINT rowsync_apply").await?;
                    outcome.counts += counts;
                }
                Err(error) if connection_lost(&error) => return Err(error),
                Err(error) => {
                    tx.batch_execute(
                        "ROLLBACK TO SAVEPOINT rowsync_apply; RELEASE SAVEPOINT rowsync_apply",
                    )
                    .await?;
                    if let [row] = slice {
                        outcome.counts.failed += 1;
                        outcome.failures.push(RowFailure {
                            key: row.try_get(Layout::KEY_JSON)?,
                            operation,
                            error,
                        });
                    } else {
                        let (left, right) = slice.split_at(slice.len() / 2);
                        pending.push(right);
                        pending.push(left);
                    }
                }
            }
        }
        Ok(())
    }

    async fn execute(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        operation: Operation,
        rows: &[&Row],
    ) -> Result<Counts, tokio_postgres::Error> {
        let positions: Vec<usize> = match operation {
            Operation::Upsert => (0..self.columns).map(|j| self.layout.column(j)).collect(),
            Operation::Delete => (0..self.keys).map(|i| self.layout.key(i)).collect(),
        };
        let arrays = positions
            .into_iter()
            .map(|position| ColumnArray::from_rows(rows, position))
            .collect::<Result<Vec<_>, _>>()?;
        let params: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let total = rows.len() as u64;
        match operation {
            Operation::Upsert => {
                let statement = tx.prepare_cached(&self.statements.upsert).await?;
                let written = tx.query(&statement, &params).await?;
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
                let statement = tx.prepare_cached(&self.statements.delete).await?;
                let deleted = tx.execute(&statement, &params).await?;
                Ok(Counts {
                    deleted,
                    unchanged: total - deleted,
                    ..Counts::default()
                })
            }
        }
    }
}

/// The session is gone (or going): nothing more can be done in this transaction.
pub fn connection_lost(error: &tokio_postgres::Error) -> bool {
    error.is_closed()
        || matches!(
            error_policy::classify(error),
            (Disposition::Transient, ErrorType::ConnectionError)
        )
}
