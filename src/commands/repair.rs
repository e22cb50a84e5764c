//! `rowsync repair [TABLE…] [--dry-run]`: finds the rows that differ as `verify` does and fixes
//! exactly those, through the normal apply path.
//!
//! The differing keys are written to the table's journal on the source, as if a writer had
//! changed those rows. The process that applies the table (the running daemon, or else this
//! command, holding the table's lock meanwhile) reads them in its next batch like any change: it
//! reads each key's row as it is in the batch's snapshot, upserts it into the target or deletes
//! it there when the source has none, and records progress with the rows. So a repair is correct
//! while the daemon runs and the source is written: it never writes an older row over a newer
//! one, and a row rejected by the target is isolated and recorded in `sync_errors` as any other.
//! Then the repaired keys are compared again; the repair succeeds when they all match.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::mapping::{TableMapping, join, key_record, load_mapping_pooled};
use crate::commands::setup::configured;
use crate::commands::verify::{Listing, checks, for_diffs, keys_report};
use crate::config::TableSpec;
use crate::config::{DatabaseRole, Settings};
use crate::connection::Pools;
use crate::error::{Error, Result, SqlContext};
use crate::ops::telemetry::Telemetry;
use crate::pipeline::apply::Counts;
use crate::pipeline::batch::{BatchKind, Look, TableSync};
use crate::pipeline::diff::{self, Difference, KeyCheck, Sink, Summary};
use crate::runtime::leader;
use crate::target::{migrate, progress, runs};

/// How long a repair waits for the process that applies a table to apply the repaired keys.
const WAIT_FOR_APPLIER: Duration = Duration::from_secs(120);

/// Keys journaled, and re-checked, per statement.
const WINDOW: usize = 5_000;

/// What `rowsync repair` is asked for.
#[derive(Debug, Clone, Copy)]
pub struct RepairOptions {
    pub dry_run: bool,
    /// Checks of each differing row in all (as verify's `--attempts`).
    pub attempts: u32,
    /// Keys listed per table.
    pub keys: usize,
}

/// What a repair found and did in one table.
#[derive(Debug)]
pub struct TableRepair {
    pub(crate) table: String,
    pub(crate) found: Summary,
    /// Who applied the repaired keys (None: nothing to repair, or a dry run).
    pub(crate) applied_by: Option<String>,
    /// Rows that still differ after the repair (the target rejects them: see sync_errors), and the
    /// first of them.
    pub(crate) remaining: u64,
    pub(crate) remaining_first: Vec<Difference>,
    pub(crate) listing: Listing,
    pub(crate) duration: Duration,
}

impl TableRepair {
    /// The table matches (after the repair; before it, for a dry run).
    pub fn consistent(&self, dry_run: bool) -> bool {
        if dry_run {
            self.found.differing() == 0
        } else {
            self.remaining == 0
        }
    }
}

/// Repairs the named tables of `SYNC_TABLES` (all of them when none is named).
pub async fn repair(
    settings: &Settings,
    names: &[String],
    options: RepairOptions,
) -> Result<Vec<TableRepair>> {
    let tables = if names.is_empty() {
        settings.tables.clone()
    } else {
        configured(settings, names, "repaired")?
    };
    let pools = Pools::new(&for_diffs(settings))?;
    let result = async {
        if !options.dry_run {
            // sync_runs must know kind 'repair' (migration 5), also before the daemon restarts on
            // a new version; a role that may not migrate still repairs, unrecorded.
            if let Err(error) = migrate::migrate(&mut *pools.target().await?).await {
                tracing::warn!(error = %crate::error::chain(&error), "cannot apply the target's migrations; the repair may not be recorded in sync_runs");
            }
        }
        let mut done = Vec::new();
        for table in &tables {
            done.push(repair_table(settings, &pools, table, options).await?);
        }
        Ok(done)
    }
    .await;
    pools.close();
    result
}

async fn repair_table(
    settings: &Settings,
    pools: &Pools,
    table: &TableSpec,
    options: RepairOptions,
) -> Result<TableRepair> {
    let started = Instant::now();
    let mapping = load_mapping_pooled(pools, table).await?;
    let name = mapping.name();
    if options.dry_run {
        let mut listing = Listing::new(options.keys, false)?;
        let found = diff::diff(pools, &mapping, checks(options.attempts), &mut listing).await?;
        return Ok(TableRepair {
            table: name,
            found,
            applied_by: None,
            remaining: 0,
            remaining_first: Vec::new(),
            listing,
            duration: started.elapsed(),
        });
    }
    mapping.journal()?;
    let run = runs::start(&**pools.target().await?, runs::Kind::Repair, Some(&name))
        .await
        .inspect_err(|error| {
            tracing::warn!(table = %name, error = %crate::error::chain(error), "cannot record the repair in sync_runs");
        })
        .ok();
    let outcome = fix(settings, pools, table, &mapping, options).await;
    let (counts, error) = match &outcome {
        Ok(done) => (
            Counts {
                created: done.found.missing,
                updated: done.found.different,
                deleted: done.found.extra,
                failed: done.remaining,
                ..Counts::default()
            },
            (done.remaining > 0).then(|| {
                format!(
                    "{} rows still differ after the repair (see sync_errors)",
                    done.remaining
                )
            }),
        ),
        Err(err) => (Counts::default(), Some(crate::error::chain(err))),
    };
    if let Some(run) = run {
        runs::finish(&**pools.target().await?, run, counts, error.as_deref()).await?;
    }
    let mut done = outcome?;
    done.duration = started.elapsed();
    Ok(done)
}

/// Finds, journals and applies the differing rows of one table, then checks them again.
async fn fix(
    settings: &Settings,
    pools: &Pools,
    table: &TableSpec,
    mapping: &TableMapping,
    options: RepairOptions,
) -> Result<TableRepair> {
    let mut journaler = Journaler::new(pools, mapping, Listing::new(options.keys, true)?)?;
    let found = diff::diff(pools, mapping, checks(options.attempts), &mut journaler).await?;
    let mut listing = journaler.listing;
    let Some(txid) = journaler.last_txid else {
        return Ok(TableRepair {
            table: mapping.name(),
            found,
            applied_by: None,
            remaining: 0,
            remaining_first: Vec::new(),
            listing,
            duration: Duration::ZERO,
        });
    };
    let applied_by = apply(settings, pools, table, mapping, &txid).await?;
    let key_check = KeyCheck::new(pools, mapping).await?;
    let (mut remaining, mut remaining_first) = (0, Vec::new());
    let mut reader = listing.reader()?;
    loop {
        let window = reader.next_window(WINDOW)?;
        if window.is_empty() {
            break;
        }
        let still = key_check
            .still_differing(pools, window, checks(options.attempts))
            .await?;
        remaining += still.len() as u64;
        let room = options.keys.saturating_sub(remaining_first.len());
        remaining_first.extend(still.into_iter().take(room));
    }
    Ok(TableRepair {
        table: mapping.name(),
        found,
        applied_by: Some(applied_by),
        remaining,
        remaining_first,
        listing,
        duration: Duration::ZERO,
    })
}

/// `$1` keys as jsonb text: journals them, as the capture triggers journal changed keys.
fn journal_insert(mapping: &TableMapping) -> Result<String> {
    let journal = mapping.journal()?;
    let keys = join(mapping.key_columns().map(|c| c.quoted()));
    Ok(format!(
        "INSERT INTO {journal} ({keys}) \
         SELECT {values} FROM unnest($1::text[]) AS r(key) CROSS JOIN LATERAL {record}",
        journal = journal.quoted(),
        values = join(mapping.key_columns().map(|c| format!("p.{}", c.quoted()))),
        record = key_record(mapping, "r.key::jsonb", "p", DatabaseRole::Source),
    ))
}

/// Journals each window of differing keys as the diff confirms them, in a transaction of its own,
/// and hands them on to a listing.
pub(crate) struct Journaler<'a> {
    pools: &'a Pools,
    insert: String,
    pub(crate) listing: Listing,
    /// The transaction id of the last window journaled: once it is applied, all are.
    pub(crate) last_txid: Option<String>,
}

impl<'a> Journaler<'a> {
    pub(crate) fn new(pools: &'a Pools, mapping: &TableMapping, listing: Listing) -> Result<Self> {
        Ok(Self {
            pools,
            insert: journal_insert(mapping)?,
            listing,
            last_txid: None,
        })
    }
}

impl Sink for Journaler<'_> {
    async fn found(&mut self, differences: Vec<Difference>) -> Result<()> {
        let keys: Vec<&str> = differences.iter().map(|d| d.key.as_str()).collect();
        let mut source = self.pools.source().await?;
        match journal_keys(&mut source, &self.insert, &keys).await {
            Ok(txid) => self.last_txid = Some(txid),
            // A key the source's type cannot hold (an extra target row): journal the others one
            // by one; that one cannot be repaired through the source and is reported as it stays.
            Err(err) if diff::is_data_error(&err) => {
                for key in &keys {
                    match journal_keys(&mut source, &self.insert, &[key]).await {
                        Ok(txid) => self.last_txid = Some(txid),
                        Err(err) if diff::is_data_error(&err) => tracing::warn!(
                            key = %key,
                            error = %crate::error::chain(&err),
                            "a differing key cannot be journaled on the source (its type cannot hold it); it is left as it is"
                        ),
                        Err(err) => {
                            return Err(err).context(DatabaseRole::Source, || {
                                "journaling the differing keys".into()
                            });
                        }
                    }
                }
            }
            Err(err) => {
                return Err(err).context(DatabaseRole::Source, || {
                    "journaling the differing keys".into()
                });
            }
        }
        self.listing.found(differences).await
    }
}

/// Journals `keys` in a transaction of its own; returns its transaction id.
async fn journal_keys(
    source: &mut deadpool_postgres::Object,
    insert: &str,
    keys: &[&str],
) -> Result<String, tokio_postgres::Error> {
    let tx = source.transaction().await?;
    tx.execute(insert, &[&keys]).await?;
    let txid: String = tx
        .query_one("SELECT pg_catalog.pg_current_xact_id()::text", &[])
        .await?
        .get(0);
    tx.commit().await?;
    Ok(txid)
}

/// Waits until the journaled keys up to transaction `txid` are applied: by the process holding the
/// table's lock, or, whenever none does, by this one. Returns who applied them.
async fn apply(
    settings: &Settings,
    pools: &Pools,
    table: &TableSpec,
    mapping: &TableMapping,
    txid: &str,
) -> Result<String> {
    let name = mapping.name();
    let deadline = Instant::now() + WAIT_FOR_APPLIER;
    loop {
        if applied(pools, &name, txid).await? {
            return Ok("the running daemon".to_string());
        }
        let lock = pools.target().await?;
        if leader::try_lock_table(&**lock, table).await? {
            let applied = async {
                let telemetry = Arc::new(Telemetry::new());
                let mut sync = TableSync::load(pools, table, settings, telemetry).await?;
                while !applied(pools, &name, txid).await? {
                    sync.run_batch(pools, BatchKind::Stream, Look::default())
                        .await?;
                }
                Ok(())
            }
            .await;
            leader::unlock_table(&**lock, table).await?;
            return applied.map(|()| "this repair".to_string());
        }
        drop(lock);
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                role: DatabaseRole::Target,
                action: format!(
                    "waiting {} s for the process that applies {name} to apply the repaired \
                     rows (the keys are journaled: it will apply them)",
                    WAIT_FOR_APPLIER.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the table's applied snapshot includes transaction `txid`.
async fn applied(pools: &Pools, table: &str, txid: &str) -> Result<bool> {
    let Some(snapshot) = progress::load(&**pools.target().await?, table).await? else {
        return Err(Error::NotSetUp {
            table: table.to_string(),
        });
    };
    Ok(pools
        .source()
        .await?
        .query_one(
            "SELECT pg_catalog.pg_visible_in_snapshot($1::text::xid8, $2::text::pg_snapshot)",
            &[&txid, &snapshot.to_string()],
        )
        .await
        .context(DatabaseRole::Source, || "comparing snapshots".into())?
        .get(0))
}

/// The report `rowsync repair` prints.
pub fn report(repairs: &[TableRepair], dry_run: bool) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    for r in repairs {
        let f = &r.found;
        let found = format!(
            "{} missing in the target, {} extra, {} different",
            f.missing, f.extra, f.different
        );
        let _ = if dry_run {
            writeln!(
                text,
                "{}: {found} (dry run: nothing changed; {:.1} s)",
                r.table,
                r.duration.as_secs_f64()
            )
        } else if f.differing() == 0 {
            writeln!(text, "{}: consistent, nothing to repair", r.table)
        } else {
            writeln!(
                text,
                "{}: {found}; fixed {} of them, applied by {} ({:.1} s); {}",
                r.table,
                f.differing().saturating_sub(r.remaining),
                r.applied_by.as_deref().unwrap_or("nobody"),
                r.duration.as_secs_f64(),
                if r.remaining == 0 {
                    "now CONSISTENT".to_string()
                } else {
                    format!(
                        "{} still differ: INCONSISTENT (see sync_errors)",
                        r.remaining
                    )
                }
            )
        };
        let (what, total, listed) = if dry_run {
            ("differing rows", f.differing(), &r.listing.first[..])
        } else if r.remaining == 0 {
            ("repaired rows", f.differing(), &r.listing.first[..])
        } else {
            ("rows still differing", r.remaining, &r.remaining_first[..])
        };
        text.push_str(&keys_report(&r.table, what, total, listed));
    }
    text
}
