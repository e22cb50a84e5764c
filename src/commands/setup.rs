//! `rowsync setup`: target migrations, source capture, initial copy. Idempotent.

use std::fmt::Write as _;

use crate::catalog::mapping::load_mapping;
use crate::config::Settings;
use crate::connection::Pools;
use crate::error::Result;
use crate::pipeline::apply::Counts;
use crate::pipeline::copy::{CopyReport, copy_table};
use crate::runtime::retry::transient;
use crate::source::capture::{self, InstallStatus};
use crate::target::runs::{self, Kind};
use crate::target::{migrate, progress};

/// What setup did to one table.
#[derive(Debug, Clone)]
pub struct TableSetup {
    pub(crate) table: String,
    pub(crate) capture: InstallStatus,
    /// None when the table was already set up and intact: nothing to copy.
    pub(crate) copy: Option<CopyReport>,
}

/// Runs setup for every table in `SYNC_TABLES`. Running it again changes and duplicates nothing.
///
/// Each step is retried on transient failures (`MAX_RETRIES`): installing a trigger waits for
/// transactions that are writing the table, up to `LOCK_TIMEOUT_SECONDS`, and gives up rather than
/// queue the application's writes behind it.
pub async fn setup(settings: &Settings) -> Result<Vec<TableSetup>> {
    let pools = Pools::new(settings)?;
    let result = setup_with(settings, &pools).await;
    pools.close();
    result
}

async fn setup_with(settings: &Settings, pools: &Pools) -> Result<Vec<TableSetup>> {
    let retry = &settings.retry;
    let applied = transient(retry, "migrating the target", || async {
        let mut target = pools.target().await?;
        migrate::migrate(&mut target).await
    })
    .await?;
    if !applied.is_empty() {
        tracing::info!(migrations = ?applied, "applied target migrations");
    }
    transient(retry, "installing sql/capture.sql", || async {
        capture::install_objects(&**pools.source().await?).await
    })
    .await?;

    let mut done = Vec::new();
    for table in &settings.tables {
        // Check the mapping before touching the source: a table the target cannot take gets no
        // triggers.
        let mapping = transient(retry, "reading the table definitions", || async {
            load_mapping(&**pools.source().await?, &**pools.target().await?, table).await
        })
        .await?;
        let status = transient(retry, "installing capture", || async {
            capture::install_table(&**pools.source().await?, &mapping.source).await
        })
        .await?;
        let (mapping, copied_before) = transient(retry, "reading the table's state", || async {
            let target = pools.target().await?;
            let mapping = load_mapping(&**pools.source().await?, &**target, table).await?;
            progress::adopt_legacy(&**target, &mapping.source).await?;
            let copied_before = progress::load(&**target, &mapping.name()).await?.is_some();
            Ok((mapping, copied_before))
        })
        .await?;
        let name = mapping.name();
        tracing::info!(table = %name, capture = ?status, "capture in place");
        let intact = matches!(status, InstallStatus::Unchanged | InstallStatus::Upgraded);
        let copy = if intact && copied_before {
            None
        } else {
            tracing::info!(table = %name, "copying existing rows");
            let run = runs::start(&**pools.target().await?, Kind::Copy, Some(&name)).await?;
            let copied = transient(retry, "copying existing rows", || {
                copy_table(settings, pools, &mapping)
            })
            .await;
            let (counts, error) = match &copied {
                Ok(report) => (report.counts, None),
                Err(err) => (Counts::default(), Some(crate::error::chain(err))),
            };
            if let Err(err) =
                runs::finish(&**pools.target().await?, run, counts, error.as_deref()).await
            {
                tracing::warn!(error = %crate::error::chain(&err), "could not complete the copy's sync_runs row");
            }
            let report = copied?;
            tracing::info!(
                table = %name,
                rows = report.rows,
                created = report.counts.created,
                updated = report.counts.updated,
                deleted = report.counts.deleted,
                unchanged = report.counts.unchanged,
                duration_ms = report.duration.as_millis() as u64,
                "initial copy done"
            );
            Some(report)
        };
        done.push(TableSetup {
            table: name,
            capture: status,
            copy,
        });
    }
    Ok(done)
}

/// The summary `rowsync setup` prints.
pub fn summary(tables: &[TableSetup]) -> String {
    let mut text = String::new();
    for table in tables {
        let capture = match table.capture {
            InstallStatus::Installed => "capture installed",
            InstallStatus::Repaired => "capture repaired",
            InstallStatus::Upgraded => "capture upgraded",
            InstallStatus::Unchanged => "capture already installed",
        };
        match &table.copy {
            None => {
                let _ = writeln!(
                    text,
                    "{}: {capture}; already copied, nothing to do",
                    table.table
                );
            }
            Some(copy) => {
                let c = copy.counts;
                let _ = writeln!(
                    text,
                    "{}: {capture}; copied {} rows in {:.1} s ({} created, {} updated, {} deleted, {} unchanged{})",
                    table.table,
                    copy.rows,
                    copy.duration.as_secs_f64(),
                    c.created,
                    c.updated,
                    c.deleted,
                    c.unchanged,
                    if c.failed > 0 {
                        format!(
                            ", {} rejected by the target: see sync_errors; the daemon retries them",
                            c.failed
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    text
}
