//! Rows the target rejected, waiting for their retry: what the sweeps' batches retry, and what a
//! batch that applies one of them again marks resolved in `sync_errors`.
//!
//! Each entry mirrors an open row record in `sync_errors` (loaded from there at start), so the
//! backoff survives a restart: a row is retried once its `next_retry_at` has come.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Row;

use crate::pipeline::apply::{ChunkOutcome, RowFailure};
use crate::pipeline::changes::Layout;
use crate::target::sync_errors::{self, OpenRow};

/// A row the target rejected, waiting for a retry.
#[derive(Debug, Clone)]
struct Pending {
    key: Value,
    retry_count: u32,
    due: Instant,
}

/// The rejected rows of one table, by `record_id`.
#[derive(Debug, Default)]
pub(crate) struct RetryQueue {
    rows: HashMap<String, Pending>,
}

impl RetryQueue {
    /// The queue of the open row records read from `sync_errors`.
    pub(crate) fn from_records(open: Vec<OpenRow>) -> Self {
        let rows = open
            .into_iter()
            .map(|open| {
                let pending = Pending {
                    key: open.key,
                    retry_count: open.retry_count,
                    due: open.due,
                };
                (open.record_id, pending)
            })
            .collect();
        Self { rows }
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The keys whose retry is due, as the change query takes them.
    pub(crate) fn due(&self, now: Instant) -> Vec<Value> {
        self.rows
            .values()
            .filter(|pending| pending.due <= now)
            .map(|pending| pending.key.clone())
            .collect()
    }

    /// How many times the row of `key` failed before (0: never).
    pub(crate) fn retries_of(&self, key: &Value) -> u32 {
        self.rows
            .get(&sync_errors::record_id(key))
            .map_or(0, |pending| pending.retry_count + 1)
    }

    /// Adds to `resolved` the rows of `rows` (change rows with keys) that had failed before and
    /// went through in `outcome`.
    pub(crate) fn went_through(
        &self,
        rows: &[Row],
        outcome: &ChunkOutcome,
        resolved: &mut Vec<String>,
    ) {
        if self.rows.is_empty() {
            return;
        }
        for row in rows {
            let Ok(key) = row.try_get::<_, Value>(Layout::KEY_JSON) else {
                continue;
            };
            let record_id = sync_errors::record_id(&key);
            if self.rows.contains_key(&record_id) && !outcome.failures.iter().any(|f| f.key == key)
            {
                resolved.push(record_id);
            }
        }
    }

    /// A batch committed: `resolved` rows went through, `failures` failed again (or for the first
    /// time), each to be retried after its delay.
    pub(crate) fn committed(
        &mut self,
        table: &str,
        resolved: &[String],
        failures: &[RowFailure],
        delays: &[Duration],
    ) {
        for record_id in resolved {
            self.rows.remove(record_id);
            tracing::info!(table = %table, record_id = %record_id, "previously failed row is now synced");
        }
        let now = Instant::now();
        for (failure, delay) in failures.iter().zip(delays) {
            let retry_count = self.retries_of(&failure.key);
            self.rows.insert(
                sync_errors::record_id(&failure.key),
                Pending {
                    key: failure.key.clone(),
                    retry_count,
                    due: now + *delay,
                },
            );
        }
    }
}
