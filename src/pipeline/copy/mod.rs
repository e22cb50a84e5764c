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
use futures_util::{SinkExt, TryStreamExt, pin_mut};
use tokio_postgres::{CopyInSink, CopyOutStream, IsolationLevel};

use crate::catalog::mapping::TableMapping;
use crate::config::{DatabaseRole, Settings};
use crate::connection::{self, APP_COPY, Pools, SessionLimits, Within, session_config};
use crate::error::policy::{self, Action};
use crate::error::{Error, Result, SqlContext};
use crate::pipeline::apply::statements::on_conflict;
use crate::pipeline::apply::{Applier, Counts, Mode};
use crate::pipeline::changes::{full_table_query, journal_cleanup};
use crate::source::snapshot::PgSnapshot;
use crate::target::{progress, sync_errors};

use self::progress_line::{CopyProgress, estimate_rows};

/// What the copy of one table did.
#[derive(Debug, Clone)]
pub(crate) struct CopyReport {
    /// Rows read from the source.
    pub rows: u64,
    pub counts: Counts,
    pub duration: Duration,
}

/// A COPY may run far longer than any statement timeout, and the source transaction is idle while
/// the target catches up: lift both limits for these two sessions only.
const UNBOUNDED: &str =
    "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0";

/// Copies every row of `mapping`'s source table into its target table and records the snapshot.
pub(crate) async fn copy_table(
    settings: &Settings,
    pools: &Pools,
    mapping: &TableMapping,
) -> Result<CopyReport> {
    let started = Instant::now();
    let estimate = estimate_rows(&**pools.source().await?, &mapping.source).await;
    let mut progress = CopyProgress::start(&mapping.name(), estimate);
    let report = match copy_streaming(settings, mapping, &mut progress).await {
        Err(Error::Sql {
            role: DatabaseRole::Target,
            source,
            ..
        }) if policy::decide_driver(&source).action == Action::IsolateRow => {
            tracing::warn!(
                table = %mapping.name(),
                error = %crate::error::chain(&source),
                "the target rejected a row during COPY; copying row by row to isolate it"
            );
            progress.restart();
            let mut report = copy_careful(settings, pools, mapping, &mut progress).await?;
            report.duration = started.elapsed();
            report
        }
        other => other?,
    };
    progress.finish(report.rows);
    Ok(report)
}

/// The fast path: COPY piped from source to target.
async fn copy_streaming(
    settings: &Settings,
    mapping: &TableMapping,
    progress: &mut CopyProgress,
) -> Result<CopyReport> {
    let started = Instant::now();
    let name = mapping.name();
    let journal = mapping.journal()?.quoted();
    let limits = SessionLimits::from_settings(settings);
    let mut target = connection::connect(
        &settings.target,
        &session_config(&settings.target, limits, APP_COPY),
    )
    .await?;
    let mut source = connection::connect(
        &settings.source,
        &session_config(&settings.source, limits, APP_COPY),
    )
    .await?;

    progress::ensure_row(&target, &name).await?;
    let ttx = target
        .transaction()
        .await
        .context(DatabaseRole::Target, || {
            format!("starting the copy of {name}")
        })?;
    ttx.batch_execute(UNBOUNDED)
        .await
        .context(DatabaseRole::Target, || {
            "lifting the statement timeout".into()
        })?;
    // From here until commit no batch of this table can commit (it would need this lock), so the
    // snapshot taken next is the newest state anyone has applied.
    progress::lock(&ttx, &name).await?;

    let stx = source
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
        .context(DatabaseRole::Source, || {
            format!("starting the copy of {name}")
        })?;
    stx.batch_execute(UNBOUNDED)
        .await
        .context(DatabaseRole::Source, || {
            "lifting the statement timeout".into()
        })?;
    let snapshot: PgSnapshot = stx
        .query_one(PgSnapshot::CURRENT, &[])
        .await
        .context(DatabaseRole::Source, || "taking the copy snapshot".into())?
        .get(0);

    let target_table = mapping.target.quoted();
    let columns = mapping.column_list();
    let format = if mapping.copy_binary {
        " (FORMAT binary)"
    } else {
        ""
    };
    let target_empty: bool = ttx
        .query_one(
            &format!("SELECT NOT EXISTS (SELECT 1 FROM {target_table})"),
            &[],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("looking into {}", mapping.target)
        })?
        .get(0);
    let rows_out = stx
        .copy_out(&format!(
            "COPY (SELECT {columns} FROM {}) TO STDOUT{format}",
            mapping.source.quoted()
        ))
        .await
        .context(DatabaseRole::Source, || {
            format!("reading {}", mapping.source)
        })?;

    let (rows, counts) = if target_empty {
        let sink = ttx
            .copy_in(&format!(
                "COPY {target_table} ({columns}) FROM STDIN{format}"
            ))
            .await
            .context(DatabaseRole::Target, || {
                format!("writing {}", mapping.target)
            })?;
        let rows = pipe(rows_out, sink, &name, progress).await?;
        (
            rows,
            Counts {
                created: rows,
                ..Counts::default()
            },
        )
    } else {
        ttx.batch_execute(&format!(
            "CREATE TEMPORARY TABLE rowsync_stage ON COMMIT DROP AS \
             SELECT {columns} FROM {target_table} WITH NO DATA"
        ))
        .await
        .context(DatabaseRole::Target, || "creating the staging table".into())?;
        let sink = ttx
            .copy_in(&format!(
                "COPY rowsync_stage ({columns}) FROM STDIN{format}"
            ))
            .await
            .context(DatabaseRole::Target, || "writing the staging table".into())?;
        let rows = pipe(rows_out, sink, &name, progress).await?;
        let counts = merge(&ttx, mapping, rows).await?;
        (rows, counts)
    };

    progress::advance(&ttx, &name, &snapshot, true).await?;
    ttx.commit().await.context(DatabaseRole::Target, || {
        format!("committing the copy of {name}")
    })?;
    clean_copied_journal(&stx, &journal, &snapshot).await?;
    stx.commit().await.context(DatabaseRole::Source, || {
        "ending the copy transaction".into()
    })?;

    Ok(CopyReport {
        rows,
        counts,
        duration: started.elapsed(),
    })
}

/// Deletes the journal rows of transactions visible in the copy's snapshot: they are in the copy.
async fn clean_copied_journal(
    stx: &tokio_postgres::Transaction<'_>,
    journal: &str,
    snapshot: &PgSnapshot,
) -> Result<()> {
    stx.execute(&journal_cleanup(journal), &[&snapshot])
        .await
        .context(DatabaseRole::Source, || {
            "deleting journal rows covered by the copy".into()
        })?;
    Ok(())
}

/// Streams COPY data from source to target. Memory holds a few messages, whatever the table size.
/// The server sends one message per row (in binary, the trailer is one more), so counting all but
/// the newest counts rows for `progress`.
async fn pipe(
    rows: CopyOutStream,
    sink: CopyInSink<Bytes>,
    table: &str,
    progress: &mut CopyProgress,
) -> Result<u64> {
    pin_mut!(rows);
    pin_mut!(sink);
    let mut previous = false;
    while let Some(chunk) = rows
        .try_next()
        .await
        .context(DatabaseRole::Source, || format!("reading {table}"))?
    {
        if previous {
            progress.add(1);
        }
        previous = true;
        sink.feed(chunk)
            .await
            .context(DatabaseRole::Target, || format!("writing {table}"))?;
    }
    sink.as_mut()
        .finish()
        .await
        .context(DatabaseRole::Target, || {
            format!("finishing the copy of {table}")
        })
}

/// Merges `rowsync_stage` into the target: delete what the source lacks, upsert the rest.
async fn merge(
    tx: &tokio_postgres::Transaction<'_>,
    mapping: &TableMapping,
    rows: u64,
) -> Result<Counts> {
    let target = mapping.target.quoted();
    let columns = mapping.column_list();
    let key_match = mapping
        .key_columns()
        .map(|k| format!("s.{0} = t.{0}", k.quoted()))
        .collect::<Vec<_>>()
        .join(" AND ");
    tx.batch_execute("ANALYZE rowsync_stage")
        .await
        .context(DatabaseRole::Target, || {
            "analyzing the staging table".into()
        })?;
    let deleted = tx
        .execute(
            &format!(
                "DELETE FROM {target} AS t \
                  WHERE NOT EXISTS (SELECT 1 FROM rowsync_stage s WHERE {key_match})"
            ),
            &[],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("deleting rows of {} not in the source", mapping.target)
        })?;
    let written = tx
        .query_one(
            &format!(
                "WITH w AS ( \
                    INSERT INTO {target} AS t ({columns}) SELECT {columns} FROM rowsync_stage {} \
                    RETURNING (t.xmax = 0) AS created) \
                 SELECT count(*) FILTER (WHERE created), count(*) FROM w",
                on_conflict(mapping)
            ),
            &[],
        )
        .await
        .context(DatabaseRole::Target, || {
            format!("merging into {}", mapping.target)
        })?;
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
) -> Result<CopyReport> {
    let started = Instant::now();
    let name = mapping.name();
    let journal = mapping.journal()?.quoted();
    let limit = SessionLimits::from_settings(settings).client_timeout();
    let applier = Applier::new(mapping, limit);

    let mut target = pools.target().await?;
    progress::ensure_row(&**target, &name).await?;
    let ttx = target
        .transaction()
        .within(limit, DatabaseRole::Target, || {
            format!("starting the copy of {name}")
        })
        .await?;
    ttx.batch_execute(UNBOUNDED)
        .await
        .context(DatabaseRole::Target, || {
            "lifting the statement timeout".into()
        })?;
    progress::lock(&*ttx, &name).await?;
    let mut source = pools.source().await?;
    let stx = source
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .within(limit, DatabaseRole::Source, || {
            format!("starting the copy of {name}")
        })
        .await?;
    stx.batch_execute(UNBOUNDED)
        .await
        .context(DatabaseRole::Source, || {
            "lifting the statement timeout".into()
        })?;
    let snapshot: PgSnapshot = stx
        .query_one(PgSnapshot::CURRENT, &[])
        .within(limit, DatabaseRole::Source, || {
            "taking the copy snapshot".into()
        })
        .await?
        .get(0);
    ttx.batch_execute(&format!(
        "CREATE TEMPORARY TABLE rowsync_stage_keys ON COMMIT DROP AS \
         SELECT {} FROM {} WITH NO DATA",
        mapping.key_list(),
        mapping.target.quoted()
    ))
    .await
    .context(DatabaseRole::Target, || {
        "creating the key staging table".into()
    })?;

    let statement = stx
        .prepare(&full_table_query(mapping))
        .within(limit, DatabaseRole::Source, || {
            format!("reading {}", mapping.source)
        })
        .await?;
    let portal = stx
        .bind(&statement, &[])
        .within(limit, DatabaseRole::Source, || {
            format!("reading {}", mapping.source)
        })
        .await?;
    let chunk = settings.batch_size as i32;
    let mut rows_read = 0u64;
    let mut counts = Counts::default();
    let mut failures = Vec::new();
    loop {
        let rows = stx
            .query_portal(&portal, chunk)
            .within(limit, DatabaseRole::Source, || {
                format!("reading {}", mapping.source)
            })
            .await?;
        if rows.is_empty() {
            break;
        }
        rows_read += rows.len() as u64;
        progress.add(rows.len() as u64);
        let outcome = applier.apply(&ttx, &rows, Mode::Careful).await?;
        applier.stage_keys(&ttx, &rows).await?;
        counts += outcome.counts;
        failures.extend(outcome.failures);
        if rows.len() < chunk as usize {
            break;
        }
    }
    let key_match = mapping
        .key_columns()
        .map(|k| format!("s.{0} = t.{0}", k.quoted()))
        .collect::<Vec<_>>()
        .join(" AND ");
    counts.deleted += ttx
        .execute(
            &format!(
                "DELETE FROM {} AS t WHERE NOT EXISTS (SELECT 1 FROM rowsync_stage_keys s WHERE {key_match})",
                mapping.target.quoted()
            ),
            &[],
        )
        .await
        .context(DatabaseRole::Target, || format!("deleting rows of {} not in the source", mapping.target))?;
    for failure in &failures {
        sync_errors::record_rejected(&*ttx, &name, failure, 0, &settings.retry).await?;
    }
    progress::advance(&*ttx, &name, &snapshot, true).await?;
    ttx.commit()
        .within(limit, DatabaseRole::Target, || {
            format!("committing the copy of {name}")
        })
        .await?;
    clean_copied_journal(&stx, &journal, &snapshot).await?;
    stx.commit().await.context(DatabaseRole::Source, || {
        "ending the copy transaction".into()
    })?;

    Ok(CopyReport {
        rows: rows_read,
        counts,
        duration: started.elapsed(),
    })
}
