//! The initial copy: every existing source row into the target, seamlessly merged with the stream.
//!
//! Capture is installed first. Its CREATE TRIGGER waits for every transaction that had written the
//! table to finish, and every write after it is journaled. The copy then reads the table in one
//! REPEATABLE READ snapshot and records that snapshot as the table's progress, in the same target
//! transaction as the copied rows: journaled changes of transactions visible in it are in the copy;
//! all later ones are applied by the stream. Nothing written during setup is lost or left stale.
//!
//! Rows stream from `COPY … TO STDOUT` straight into `COPY … FROM STDIN` (binary when every column
//! has the same built-in type on both sides), so memory stays flat whatever the table's size. An
//! empty target takes the rows directly; otherwise they go through a temporary table and are merged:
//! new rows inserted, changed rows updated, identical rows left alone, and target rows whose key is
//! not in the source deleted (the target table mirrors the source).
//!
//! If the target rejects a row (a constraint or a type the source does not have), COPY fails as a
//! whole. Then the copy starts over row by row, through the same careful apply as batches: rejected
//! rows are isolated and recorded in `sync_errors` (and retried by the daemon's sweeps), every other
//! row is copied.
//!
//! Either way the copy shows its progress as it goes ([`progress_line`]).

pub(crate) mod progress_line;

use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::{Object, Transaction};
use futures_util::{SinkExt, TryStreamExt, pin_mut};
use tokio_postgres::{CopyInSink, CopyOutStream, IsolationLevel};

use self::progress_line::{CopyProgress, estimate_rows};
use crate::catalog::mapping::{TableMapping, join};
use crate::config::{DatabaseRole, Settings};
use crate::connection::{APP_COPY, Pools, SessionLimits, Within};
use crate::error::policy::{self, Action};
use crate::error::{Error, Result, SqlContext};
use crate::pipeline::apply::statements::{on_conflict, overriding};
use crate::pipeline::apply::{Applier, Counts, Mode, RowFailure};
use crate::pipeline::changes::{full_table_query, journal_cleanup};
use crate::pipeline::chunks::ChunkSizer;
use crate::source::snapshot::PgSnapshot;
use crate::target::{progress, sync_errors};

/// What the copy of one table did.
#[derive(Debug, Clone)]
pub(crate) struct CopyReport {
    /// Rows read from the source.
    pub(crate) rows: u64,
    pub(crate) counts: Counts,
    pub(crate) duration: Duration,
}

const SOURCE: DatabaseRole = DatabaseRole::Source;
const TARGET: DatabaseRole = DatabaseRole::Target;

/// A COPY may run far longer than any statement timeout, and the source transaction is idle while
/// the target catches up: lift both limits for the copy's two transactions only. They are named
/// `rowsync-copy` ([`APP_COPY`]) for as long as they last.
fn copy_session() -> String {
    format!(
        "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0; \
         SET LOCAL application_name = '{APP_COPY}'"
    )
}

/// Copies every row of `mapping`'s source table into its target table and records the snapshot.
pub(crate) async fn copy_table(
    settings: &Settings,
    pools: &Pools,
    mapping: &TableMapping,
) -> Result<CopyReport> {
    let started = Instant::now();
    let estimate = estimate_rows(&**pools.source().await?, &mapping.source).await;
    let mut progress = CopyProgress::start(&mapping.name(), estimate);
    // A computed value of another type than its column's is cast on the target as the stream
    // casts it (COPY would read its text with the column's input function instead).
    if mapping.columns.iter().any(|c| c.via.is_some()) {
        let copied = copy_careful(settings, pools, mapping, &mut progress).await?;
        progress.finish(copied.rows);
        return Ok(CopyReport {
            rows: copied.rows,
            counts: copied.counts,
            duration: started.elapsed(),
        });
    }
    let copied = match copy_streaming(settings, pools, mapping, &mut progress).await {
        Err(Error::Sql {
            role: DatabaseRole::Target,
            source,
            ..
        }) if policy::decide_driver(&source).action == Action::IsolateRow => {
            // Not the server's message: it quotes the value (`invalid input value for enum
            // mood: "nope"`), and logs carry no row contents. sync_errors has the message.
            tracing::warn!(
                table = %mapping.name(),
                sqlstate = source.code().map(|c| c.code()).unwrap_or(""),
                "the target rejected a row during COPY; copying row by row to isolate it"
            );
            progress.restart();
            copy_careful(settings, pools, mapping, &mut progress).await?
        }
        other => other?,
    };
    progress.finish(copied.rows);
    Ok(CopyReport {
        rows: copied.rows,
        counts: copied.counts,
        duration: started.elapsed(),
    })
}

/// Rows read and what became of them.
struct Copied {
    rows: u64,
    counts: Counts,
}

/// The copy's two sessions, from the pools.
struct CopySessions {
    target: Object,
    source: Object,
}

/// The copy's two transactions: the target's holds the table's progress row locked, the
/// source's reads one REPEATABLE READ snapshot.
struct CopyTransactions<'a> {
    target: Transaction<'a>,
    source: Transaction<'a>,
    snapshot: PgSnapshot,
    table: String,
    /// The applied snapshots of the other mappings of the source table (see
    /// [`progress::others`]), as the lock saw them.
    others: Vec<String>,
    limit: Duration,
}

impl CopySessions {
    async fn open(pools: &Pools) -> Result<Self> {
        Ok(Self {
            target: pools.target().await?,
            source: pools.source().await?,
        })
    }

    /// Starts both transactions. From the progress lock until the commit no batch of this table
    /// can commit (it would need the lock), so the snapshot taken next is the newest state anyone
    /// has applied.
    async fn begin(
        &mut self,
        mapping: &TableMapping,
        limit: Duration,
    ) -> Result<CopyTransactions<'_>> {
        let table = mapping.name();
        let starting = || format!("starting the copy of {table}");
        progress::ensure_row(&**self.target, &table).await?;
        let target = self
            .target
            .transaction()
            .within(limit, TARGET, starting)
            .await?;
        target
            .batch_execute(&copy_session())
            .within(limit, TARGET, || "lifting the statement timeout".into())
            .await?;
        let others = progress::lock(&*target, &table, &mapping.source.to_string())
            .await?
            .others;
        let source = self
            .source
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .start()
            .within(limit, SOURCE, starting)
            .await?;
        source
            .batch_execute(&copy_session())
            .within(limit, SOURCE, || "lifting the statement timeout".into())
            .await?;
        // A rewrite of the table committed after the snapshot would make it look empty (see
        // ChangeQueries::lock): the lock comes first.
        source
            .batch_execute(&crate::pipeline::changes::snapshot_lock(
                mapping,
                mapping.journal()?,
            ))
            .within(limit, SOURCE, || format!("locking {}", mapping.source))
            .await?;
        let snapshot: PgSnapshot = source
            .query_one(PgSnapshot::CURRENT, &[])
            .within(limit, SOURCE, || "taking the copy snapshot".into())
            .await?
            .get(0);
        Ok(CopyTransactions {
            target,
            source,
            snapshot,
            table,
            others,
            limit,
        })
    }
}

impl CopyTransactions<'_> {
    /// Records the copy's snapshot as the table's progress and commits the copied rows with it;
    /// then deletes the journal rows of transactions visible in the snapshot (they are in the copy).
    async fn finish(self, mapping: &TableMapping) -> Result<()> {
        let journal = mapping.journal()?;
        let Self {
            target,
            source,
            snapshot,
            table,
            others,
            limit,
        } = self;
        progress::advance(&*target, &table, &snapshot, true).await?;
        progress::set_mapping(&*target, &table, mapping.definition.as_deref()).await?;
        target
            .commit()
            .within(limit, TARGET, || format!("committing the copy of {table}"))
            .await?;
        source
            .execute(&journal_cleanup(journal), &[&snapshot, &others])
            .await
            .context(SOURCE, || {
                "deleting journal rows covered by the copy".into()
            })?;
        source
            .commit()
            .await
            .context(SOURCE, || "ending the copy transaction".into())
    }
}

/// The fast path: COPY piped from source to target, straight into an empty target table, else
/// through a staging table and merged.
async fn copy_streaming(
    settings: &Settings,
    pools: &Pools,
    mapping: &TableMapping,
    progress: &mut CopyProgress,
) -> Result<Copied> {
    mapping.journal()?;
    let limit = SessionLimits::from_settings(settings).client_timeout();
    let mut sessions = CopySessions::open(pools).await?;
    let tx = sessions.begin(mapping, limit).await?;
    let target_table = mapping.target.quoted();
    let target_empty: bool = tx
        .target
        .query_one(
            &format!("SELECT NOT EXISTS (SELECT 1 FROM {target_table})"),
            &[],
        )
        .await
        .context(TARGET, || format!("looking into {}", mapping.target))?
        .get(0);
    let copied = if target_empty {
        let rows = pipe(&tx, mapping, &target_table, progress).await?;
        let counts = Counts {
            created: rows,
            ..Counts::default()
        };
        Copied { rows, counts }
    } else {
        tx.target
            .batch_execute(&format!(
                "CREATE TEMPORARY TABLE rowsync_stage ON COMMIT DROP AS \
                 SELECT {} FROM {target_table} WITH NO DATA",
                mapping.target_column_list()
            ))
            .await
            .context(TARGET, || "creating the staging table".into())?;
        let rows = pipe(&tx, mapping, "rowsync_stage", progress).await?;
        let counts = merge(&tx.target, mapping, rows).await?;
        Copied { rows, counts }
    };
    tx.finish(mapping).await?;
    Ok(copied)
}

/// Streams the source table into `into` (quoted) with COPY, binary when every column has the same
/// built-in type on both sides. Memory holds a few messages, whatever the table size. The server
/// sends one message per row (in binary, the trailer is one more), so counting all but the newest
/// counts rows for `progress`.
async fn pipe(
    tx: &CopyTransactions<'_>,
    mapping: &TableMapping,
    into: &str,
    progress: &mut CopyProgress,
) -> Result<u64> {
    let table = &tx.table;
    let format = if mapping.copy_binary {
        " (FORMAT binary)"
    } else {
        ""
    };
    // In text, as the stream sends them: a row copied and the same row streamed are the same
    // target row. In binary (every column of the same type on both sides, arrays and ranges
    // included), each value as it is.
    let selected = join(mapping.columns.iter().map(|c| {
        if mapping.copy_binary {
            c.source_ref("s")
        } else {
            c.sent_ref("s")
        }
    }));
    let rows: CopyOutStream = tx
        .source
        .copy_out(&format!(
            "COPY (SELECT {selected} FROM {} s WHERE true{}) TO STDOUT{format}",
            mapping.source.quoted(),
            mapping.and_filter()
        ))
        .await
        .context(SOURCE, || format!("reading {}", mapping.source))?;
    let sink: CopyInSink<Bytes> = tx
        .target
        .copy_in(&format!(
            "COPY {into} ({}) FROM STDIN{format}",
            mapping.target_column_list()
        ))
        .await
        .context(TARGET, || format!("writing {}", mapping.target))?;
    pin_mut!(rows);
    pin_mut!(sink);
    let mut previous = false;
    while let Some(chunk) = rows
        .try_next()
        .await
        .context(SOURCE, || format!("reading {table}"))?
    {
        if previous {
            progress.add(1);
            crate::failpoint::crash_point!("copy-mid-stream");
        }
        previous = true;
        sink.feed(chunk)
            .await
            .context(TARGET, || format!("writing {table}"))?;
    }
    sink.as_mut()
        .finish()
        .await
        .context(TARGET, || format!("finishing the copy of {table}"))
}

/// `s.k = t.k AND …` over the key columns.
fn key_match(mapping: &TableMapping) -> String {
    mapping
        .key_columns()
        .map(|k| format!("s.{0} = t.{0}", k.target_quoted()))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Deletes the target rows whose key is not in `staged` (a temporary table of copied keys): the
/// target table mirrors the source.
async fn delete_missing(tx: &Transaction<'_>, mapping: &TableMapping, staged: &str) -> Result<u64> {
    tx.execute(
        &format!(
            "DELETE FROM {} AS t WHERE NOT EXISTS (SELECT 1 FROM {staged} s WHERE {})",
            mapping.target.quoted(),
            key_match(mapping)
        ),
        &[],
    )
    .await
    .context(TARGET, || {
        format!("deleting rows of {} not in the source", mapping.target)
    })
}

/// Merges `rowsync_stage` into the target: delete what the source lacks, upsert the rest.
async fn merge(tx: &Transaction<'_>, mapping: &TableMapping, rows: u64) -> Result<Counts> {
    let target = mapping.target.quoted();
    let columns = mapping.target_column_list();
    tx.batch_execute("ANALYZE rowsync_stage")
        .await
        .context(TARGET, || "analyzing the staging table".into())?;
    let deleted = delete_missing(tx, mapping, "rowsync_stage").await?;
    let written = tx
        .query_one(
            &format!(
                "WITH w AS ( \
                    INSERT INTO {target} AS t ({columns}) {}SELECT {columns} FROM rowsync_stage {} \
                    RETURNING (t.xmax = 0) AS created) \
                 SELECT count(*) FILTER (WHERE created), count(*) FROM w",
                overriding(mapping),
                on_conflict(mapping)
            ),
            &[],
        )
        .await
        .context(TARGET, || format!("merging into {}", mapping.target))?;
    let created = written.get::<_, i64>(0) as u64;
    let total_written = written.get::<_, i64>(1) as u64;
    Ok(Counts {
        created,
        updated: total_written - created,
        deleted,
        unchanged: rows - total_written,
        failed: 0,
    })
}

/// The careful path: every source row applied like a batch in [`Mode::Careful`], so rejected rows
/// are isolated and recorded instead of failing the copy. Same snapshot discipline as the fast path.
async fn copy_careful(
    settings: &Settings,
    pools: &Pools,
    mapping: &TableMapping,
    progress: &mut CopyProgress,
) -> Result<Copied> {
    mapping.journal()?;
    let limit = SessionLimits::from_settings(settings).client_timeout();
    let mut sessions = CopySessions::open(pools).await?;
    let tx = sessions.begin(mapping, limit).await?;
    tx.target
        .batch_execute(&format!(
            "CREATE TEMPORARY TABLE rowsync_stage_keys ON COMMIT DROP AS \
             SELECT {} FROM {} WITH NO DATA",
            mapping.target_key_list(),
            mapping.target.quoted()
        ))
        .await
        .context(TARGET, || "creating the key staging table".into())?;
    let (rows, mut counts, failures) = apply_every_row(&tx, settings, mapping, progress).await?;
    counts.deleted += delete_missing(&tx.target, mapping, "rowsync_stage_keys").await?;
    for failure in &failures {
        sync_errors::record_rejected(&*tx.target, &tx.table, failure, 0, &settings.retry).await?;
    }
    tx.finish(mapping).await?;
    Ok(Copied { rows, counts })
}

/// Reads every source row in chunks of `BATCH_SIZE` (fewer for wide rows) and applies each chunk carefully, recording
/// its keys in `rowsync_stage_keys`. Returns the rows read, the counts and the rejected rows.
async fn apply_every_row(
    tx: &CopyTransactions<'_>,
    settings: &Settings,
    mapping: &TableMapping,
    progress: &mut CopyProgress,
) -> Result<(u64, Counts, Vec<RowFailure>)> {
    let limit = tx.limit;
    let applier = Applier::new(mapping, limit, settings.batch_bytes);
    let reading = || format!("reading {}", mapping.source);
    let statement = tx
        .source
        .prepare(&full_table_query(mapping))
        .within(limit, SOURCE, reading)
        .await?;
    let portal = tx
        .source
        .bind(&statement, &[])
        .within(limit, SOURCE, reading)
        .await?;
    let chunks = ChunkSizer::new(settings.batch_size, settings.batch_bytes);
    let (mut rows_read, mut counts, mut failures) = (0u64, Counts::default(), Vec::new());
    loop {
        let asked = chunks.rows();
        let rows = tx
            .source
            .query_portal(&portal, asked as i32)
            .within(limit, SOURCE, reading)
            .await?;
        if rows.is_empty() {
            break;
        }
        chunks.observe(&rows);
        rows_read += rows.len() as u64;
        progress.add(rows.len() as u64);
        let outcome = applier.apply(&tx.target, &rows, Mode::Careful).await?;
        applier.stage_keys(&tx.target, &rows).await?;
        counts += outcome.counts;
        failures.extend(outcome.failures);
        if rows.len() < asked {
            break;
        }
    }
    Ok((rows_read, counts, failures))
}
