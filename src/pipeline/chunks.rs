//! Chunks bounded by bytes as well as rows.
//!
//! Rows are read from a portal, so how many to ask for must be chosen before their size is known:
//! [`ChunkSizer`] asks for as many as fit the byte budget at the size of the widest row seen lately
//! (remembered, and forgotten slowly: by an eighth per chunk; a handful of rows for a table's
//! first chunk), and [`by_bytes`] splits whatever arrived into apply statements that stay within
//! the budget. A statement therefore never nears
//! PostgreSQL's 1 GiB message limit (which ends the session, and would end it again on every
//! retry), and the rows held in memory are about the budget, not `BATCH_SIZE` times the widest row.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, Type};

/// How many rows a table's first chunk asks for, before any row's size is known.
const FIRST_CHUNK: usize = 8;

/// The row count of the next read. Learning takes `&self`: the next chunk is read while the
/// current one is applied.
#[derive(Debug)]
pub(crate) struct ChunkSizer {
    max_rows: usize,
    max_bytes: usize,
    /// The widest row seen lately, in bytes; 0 before the first chunk.
    widest: AtomicUsize,
}

impl ChunkSizer {
    pub(crate) fn new(max_rows: usize, max_bytes: usize) -> Self {
        Self {
            max_rows,
            max_bytes,
            widest: AtomicUsize::new(0),
        }
    }

    /// How many rows to ask for now.
    pub(crate) fn rows(&self) -> usize {
        match self.widest.load(Ordering::Relaxed) {
            0 => FIRST_CHUNK.min(self.max_rows),
            widest => (self.max_bytes / widest).clamp(1, self.max_rows),
        }
    }

    /// Learns from the chunk just read. An empty chunk teaches nothing.
    pub(crate) fn observe(&self, rows: &[Row]) {
        let Some(widest) = rows.iter().map(row_bytes).max() else {
            return;
        };
        let remembered = self.widest.load(Ordering::Relaxed);
        let widest = widest.max(remembered - remembered / 8);
        self.widest.store(widest, Ordering::Relaxed);
    }
}

/// Splits `rows` into runs whose row data stays within `max_bytes` (a row wider than that on its
/// own makes a run of one).
pub(crate) fn by_bytes<'a, 'r>(rows: &'a [&'r Row], max_bytes: usize) -> Vec<&'a [&'r Row]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let size = row_bytes(row);
        if i > start && bytes + size > max_bytes {
            runs.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < rows.len() {
        runs.push(&rows[start..]);
    }
    runs
}

/// The bytes of a row's values as they came over the wire.
pub(crate) fn row_bytes(row: &Row) -> usize {
    (0..row.len())
        .map(|i| row.try_get::<_, WireSize>(i).map_or(0, |size| size.0))
        .sum()
}

/// The size of any value, read without decoding it.
struct WireSize(usize);

impl<'a> FromSql<'a> for WireSize {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(raw.len()))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(0))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}
