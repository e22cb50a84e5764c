//! Keeping a journal small on disk.
//!
//! A journal has no index (one slowed every source write), so every batch scans it whole, twice:
//! once to read the changes and once to delete them. What that costs is set by the journal's size
//! on disk, not by the rows left in it. Deleted rows stay until a vacuum, and autovacuum visits a
//! table at most once per `autovacuum_naptime` (a minute by default), so under 10,000 changes/s a
//! journal collects half a million dead rows between visits. A vacuum makes the pages reusable but
//! seldom hands them back, so after a burst the journal keeps its largest size. Measured on the
//! benchmark's source: with a 690-page journal, each batch cost the source about 3 ms of CPU, which
//! at 1,000 changes/s was 0.25 of a core for a few hundred changed rows per second.
//!
//! So rowsync looks after its journals itself: after every [`VACUUM_EVERY_ROWS`] consumed rows it
//! vacuums the journal, and once the journal has grown past [`TRUNCATE_ABOVE_BYTES`] it empties the
//! file at a moment the journal holds no row at all:
//! 1. `LOCK … IN ACCESS EXCLUSIVE MODE NOWAIT`. A writer that has journaled a row holds a lock on
//!    the journal until it commits, so the attempt fails at once while one is in flight; it never
//!    waits in front of writers. It is tried again after the next vacuum.
//! 2. Under the lock, in a fresh snapshot, look for any row (one committed a moment ago included).
//! 3. None: `TRUNCATE`. Rows already applied but not yet deleted count as rows: nothing unapplied or
//!    in doubt is ever removed here.
//!
//! Both need the journal's owner (the role that ran `rowsync setup`). With another role rowsync
//! leaves the journal to autovacuum.

use std::time::Duration;

use deadpool_postgres::Object;

use crate::config::DatabaseRole;
use crate::connection::Within;
use crate::error::Result;
use crate::error::policy::{self, ErrorType};

/// Consumed rows after which rowsync vacuums a journal (about a second at 10,000 changes/s).
pub(crate) const VACUUM_EVERY_ROWS: u64 = 10_000;

/// Size on disk above which an empty journal is truncated.
pub(crate) const TRUNCATE_ABOVE_BYTES: i64 = 1 << 20;

const SOURCE: DatabaseRole = DatabaseRole::Source;

/// What [`upkeep`] did besides the vacuum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truncation {
    /// The journal was small enough to leave alone.
    NotNeeded,
    /// A writer held the journal, or it still had rows: tried again after the next vacuum.
    Deferred,
    /// The journal was emptied; it had taken this many bytes.
    Done { bytes: i64 },
    /// Our role may not truncate the journal (it does not own it).
    NotPermitted,
}

/// The upkeep of one journal: counts the rows consumed from it and looks after it when due.
#[derive(Debug)]
pub(crate) struct JournalUpkeep {
    table: String,
    /// The journal's quoted name.
    journal: String,
    /// Whether our role owns the journal, as upkeep needs.
    owned: bool,
    /// Rows consumed since the last vacuum.
    consumed: u64,
    limit: Duration,
}

impl JournalUpkeep {
    /// Upkeep of `journal` (quoted), the journal of `table`; says once if it is not ours to keep.
    pub(crate) async fn new(
        client: &Object,
        table: &str,
        journal: &str,
        limit: Duration,
    ) -> Result<Self> {
        let owned = owned(client, journal, limit).await?;
        if !owned {
            not_ours(table);
        }
        Ok(Self {
            table: table.to_string(),
            journal: journal.to_string(),
            owned,
            consumed: 0,
            limit,
        })
    }

    /// `rows` journal rows were consumed; vacuums (and maybe truncates) the journal on `client`
    /// once [`VACUUM_EVERY_ROWS`] have been. Failing here fails nothing: autovacuum remains, and the
    /// next attempt comes after as many rows again. `client` must not be in a transaction.
    pub(crate) async fn consumed(&mut self, rows: u64, client: &mut Object) {
        self.consumed += rows;
        if self.consumed < VACUUM_EVERY_ROWS || !self.owned {
            return;
        }
        self.consumed = 0;
        match upkeep(client, &self.journal, self.limit).await {
            Ok(Truncation::Done { bytes }) => {
                tracing::info!(table = %self.table, freed_bytes = bytes, "truncated the emptied journal");
            }
            Ok(Truncation::NotPermitted) => {
                self.owned = false;
                not_ours(&self.table);
            }
            Ok(Truncation::NotNeeded | Truncation::Deferred) => {}
            Err(err) => {
                tracing::debug!(table = %self.table, error = %crate::error::chain(&err), "journal upkeep failed; will retry");
            }
        }
    }
}

/// Says once why rowsync does not vacuum or truncate a table's journal.
fn not_ours(table: &str) {
    tracing::info!(table = %table, "the journal is owned by another role: leaving its upkeep to autovacuum");
}

/// Whether our role owns `journal` (already quoted), as upkeep needs.
async fn owned(client: &Object, journal: &str, limit: Duration) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_has_role(c.relowner, 'MEMBER') FROM pg_catalog.pg_class c \
              WHERE c.oid = $1::text::regclass",
            &[&journal],
        )
        .within(limit, SOURCE, || format!("reading the owner of {journal}"))
        .await?;
    Ok(row.get(0))
}

/// Vacuums `journal` (already quoted) and, if it has grown large, truncates it when it is empty.
/// `client` must not be in a transaction.
async fn upkeep(client: &mut Object, journal: &str, limit: Duration) -> Result<Truncation> {
    // SKIP_LOCKED: never wait for autovacuum working on the same journal. TRUNCATE false: the
    // vacuum's own truncation may wait seconds for its lock; ours below does not wait at all.
    client
        .batch_execute(&format!("VACUUM (SKIP_LOCKED, TRUNCATE false) {journal}"))
        .within(limit, SOURCE, || format!("vacuuming {journal}"))
        .await?;
    let bytes: i64 = client
        .query_one(
            "SELECT pg_catalog.pg_relation_size($1::text::regclass)",
            &[&journal],
        )
        .within(limit, SOURCE, || format!("measuring {journal}"))
        .await?
        .get(0);
    if bytes <= TRUNCATE_ABOVE_BYTES {
        return Ok(Truncation::NotNeeded);
    }
    truncate_if_empty(client, journal, limit)
        .await
        .map(|truncated| {
            if truncated {
                Truncation::Done { bytes }
            } else {
                Truncation::Deferred
            }
        })
        .or_else(|err| {
            let decision = policy::decide(&err);
            match decision.error_type {
                ErrorType::PermissionDenied => Ok(Truncation::NotPermitted),
                // A writer holds the journal (LOCK … NOWAIT): try again after the next vacuum.
                ErrorType::Timeout if decision.retry() => Ok(Truncation::Deferred),
                _ => Err(err),
            }
        })
}

async fn truncate_if_empty(client: &mut Object, journal: &str, limit: Duration) -> Result<bool> {
    let tx = client
        .transaction()
        .within(limit, SOURCE, || "starting a journal truncation".into())
        .await?;
    tx.batch_execute(&format!(
        "LOCK TABLE {journal} IN ACCESS EXCLUSIVE MODE NOWAIT"
    ))
    .within(limit, SOURCE, || format!("locking {journal}"))
    .await?;
    // READ COMMITTED: this statement's snapshot is taken after the lock was granted, so it sees
    // every row committed before then, and no writer can add one until we commit.
    let empty: bool = tx
        .query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {journal})"), &[])
        .within(limit, SOURCE, || format!("looking into {journal}"))
        .await?
        .get(0);
    if empty {
        tx.batch_execute(&format!("TRUNCATE {journal}"))
            .within(limit, SOURCE, || format!("truncating {journal}"))
            .await?;
    }
    tx.commit()
        .within(limit, SOURCE, || {
            format!("ending the truncation of {journal}")
        })
        .await?;
    Ok(empty)
}
