//! `rowsync setup`: target migrations, source capture, initial copy. Idempotent.

use std::fmt::Write as _;

use crate::capture::{self, InstallStatus};
use crate::config::Settings;
use crate::connection::Pools;
use crate::error::Result;
use crate::schema::load_mapping;
use crate::snapshot::{CopyReport, copy_table};
use crate::{migrate, progress};

/// What setup did to one table.
#[derive(Debug, Clone)]
pub struct TableSetup {
    pub table: String,
    pub capture: InstallStatus,
    /// None when the table was already set up and intact: nothing to copy.
    pub copy: Option<CopyReport>,
}

/// Runs setup for every table in `SYNC_TABLES`. Running it again changes and duplicates nothing.
pub async fn setup(settings: &Settings) -> Result<Vec<TableSetup>> {
    let pools = Pools::new(settings)?;
    let result = setup_with(settings, &pools).await;
    pools.close();
    result
}

async fn setup_with(settings: &Settings, pools: &Pools) -> Result<Vec<TableSetup>> {
    let mut target = pools.target().await?;
    let applied = migrate::migrate(&mut target).await?;
    if !applied.is_empty() {
        tracing::info!(migrations = ?applied, "applied target migrations");
    }
    let source = pools.source().await?;
    capture::install_objects(&**source).await?;

    let mut done = Vec::new();
    for table in &settings.tables {
        // Check the mapping before touching the source: a table the target cannot take gets no
        // triggers.
        let mapping = load_mapping(&**source, &**target, table).await?;
        let status = capture::install_table(&**source, &mapping.source).await?;
        let mapping = load_mapping(&**source, &**target, table).await?;
        let name = mapping.name();
        tracing::info!(table = %name, capture = ?status, "capture in place");
        let copied_before = progress::load(&**target, &name).await?.is_some();
        let copy = if status == InstallStatus::Unchanged && copied_before {
            None
        } else {
            tracing::info!(table = %name, "copying existing rows");
            let report = copy_table(settings, &mapping).await?;
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
                    "{}: {capture}; copied {} rows in {:.1} s ({} created, {} updated, {} deleted, {} unchanged)",
                    table.table,
                    copy.rows,
                    copy.duration.as_secs_f64(),
                    c.created,
                    c.updated,
                    c.deleted,
                    c.unchanged
                );
            }
        }
    }
    text
}
