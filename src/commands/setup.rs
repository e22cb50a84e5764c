//! `rowsync setup`: target migrations, source capture, initial copy. Idempotent.

use std::fmt::Write as _;

use crate::catalog::ident::{QualifiedName, TableRef};
use crate::catalog::mapping::{TableMapping, load_mapping, load_mapping_pooled};
use crate::config::{ConfigError, SYNC_CONFIG, Settings, TableSpec};
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
    let result = setup_tables(settings, &pools, &settings.tables, false).await;
    pools.close();
    result
}

/// `rowsync resync TABLE…`: setup for the named tables only (they must be in `SYNC_TABLES`), with
/// a fresh copy even when capture is intact. The copy merges into the target as setup's does, and
/// changes made while it runs are journaled and applied after it, so a running daemon may go on
/// streaming meanwhile (its batches of these tables wait for the copy, the others' do not).
pub async fn resync(settings: &Settings, names: &[String]) -> Result<Vec<TableSetup>> {
    let tables = configured(settings, names, "resynced")?;
    let pools = Pools::new(settings)?;
    let result = setup_tables(settings, &pools, &tables, true).await;
    pools.close();
    result
}

/// `rowsync teardown TABLE…`: removes capture (triggers, function, journal) from the named source
/// tables, which need not be in `SYNC_TABLES` any more. The target's rows and rowsync's records
/// stay; a later `setup` of such a table copies it afresh.
pub async fn teardown(settings: &Settings, names: &[String]) -> Result<Vec<String>> {
    let tables = names
        .iter()
        .map(|name| table_argument(name))
        .collect::<Result<Vec<_>>>()?;
    let pools = Pools::new(settings)?;
    let result = async {
        let mut done = Vec::new();
        for table in &tables {
            let removed = transient(&settings.retry, "removing capture", || async {
                capture::uninstall_table(&**pools.source().await?, table).await
            })
            .await?;
            done.push(if removed {
                format!("{table}: capture removed")
            } else {
                format!("{table}: not captured, nothing to do")
            });
        }
        Ok(done)
    }
    .await;
    pools.close();
    result
}

/// A table named on the command line (`TABLE`: exit 2 when it is not a table name).
fn table_argument(name: &str) -> Result<TableRef> {
    TableRef::parse(name)
        .map_err(|problem| ConfigError::new("TABLE", format!("{name:?}: {problem}")).into())
}

/// The configured tables that `names` name, by their source or target table (a name without a
/// schema matches the table of that name in any schema it was configured with; a source synced
/// into two targets names both). A name that is not configured is an error.
pub(crate) fn configured(
    settings: &Settings,
    names: &[String],
    verb: &str,
) -> Result<Vec<TableSpec>> {
    let matches = |configured: &TableRef, wanted: &TableRef| {
        configured == wanted
            || (configured.name == wanted.name
                && (configured.schema.is_none() || wanted.schema.is_none()))
    };
    let mut tables = Vec::new();
    for name in names {
        let wanted = table_argument(name)?;
        let found: Vec<&TableSpec> = settings
            .tables
            .iter()
            .filter(|t| matches(&t.source, &wanted) || matches(t.target_ref(), &wanted))
            .collect();
        if found.is_empty() {
            let variable = if settings.tables.iter().any(|t| t.origin.is_some()) {
                SYNC_CONFIG
            } else {
                "SYNC_TABLES"
            };
            return Err(ConfigError::new(
                variable,
                format!("does not list {wanted}: only configured tables can be {verb}"),
            )
            .into());
        }
        for table in found {
            if !tables.contains(table) {
                tables.push(table.clone());
            }
        }
    }
    Ok(tables)
}

/// Checks every mapping against both catalogs before anything is written: a problem with what
/// the mapping file says is a configuration error (exit 2). Tables listed in `SYNC_TABLES` are
/// checked as they are set up, as before.
pub(crate) async fn validate(pools: &Pools, tables: &[TableSpec]) -> Result<Vec<TableMapping>> {
    let mut mappings: Vec<TableMapping> = Vec::new();
    for spec in tables.iter().filter(|t| t.origin.is_some()) {
        let mapping = load_mapping_pooled(pools, spec).await?;
        // The file's check compares names as written; `users` and `public.users` are one table.
        if let Some(other) = mappings.iter().find(|m| m.target == mapping.target) {
            return Err(spec
                .problem(format!(
                    "target {} is already the target of {}: two entries cannot write one table",
                    mapping.target,
                    other.name()
                ))
                .into());
        }
        // One journal per source table, keyed one way.
        if let Some(other) = mappings.iter().find(|m| m.source == mapping.source) {
            let names =
                |m: &TableMapping| m.key_columns().map(|c| c.name.clone()).collect::<Vec<_>>();
            let (mut mine, mut theirs) = (names(&mapping), names(other));
            mine.sort();
            theirs.sort();
            if mine != theirs {
                return Err(spec
                    .problem(format!(
                        "its key ({}) differs from the key ({}) of {}; the entries of one source table must use the same key",
                        names(&mapping).join(", "),
                        names(other).join(", "),
                        other.name()
                    ))
                    .into());
            }
        }
        mappings.push(mapping);
    }
    Ok(mappings)
}

/// Setup for `tables` (of `SYNC_TABLES`): `copy_anyway` copies even tables whose capture is
/// intact and which were copied before.
pub(crate) async fn setup_tables(
    settings: &Settings,
    pools: &Pools,
    tables: &[TableSpec],
    copy_anyway: bool,
) -> Result<Vec<TableSetup>> {
    let retry = &settings.retry;
    transient(retry, "checking the mappings", || validate(pools, tables)).await?;
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
    // Sources whose capture was made afresh in this run: its journal went with the old one, so
    // every mapping of the source is copied again, also those not named here.
    let mut recaptured: Vec<QualifiedName> = Vec::new();
    let mut queue: Vec<TableSpec> = tables.to_vec();
    let mut next = 0;
    while let Some(table) = queue.get(next).cloned() {
        next += 1;
        let table = &table;
        // Check the mapping before touching the source: a table the target cannot take gets no
        // triggers.
        let mapping = transient(retry, "reading the table definitions", || async {
            load_mapping_pooled(pools, table).await
        })
        .await?;
        let status = transient(retry, "installing capture", || async {
            capture::install_table(
                &**pools.source().await?,
                &mapping.source,
                table.key.as_ref().map(|_| mapping.key_names()).as_deref(),
            )
            .await
        })
        .await?;
        // Another setup may be copying the table right now (a process that handed the table
        // over, or lost its lead, finishes the setup it started): its outcome is what to read
        // next, not a copy to do twice, or to give up waiting for.
        transient(retry, "waiting for a copy in progress", || async {
            let mut target = pools.target().await?;
            progress::wait_for_copy(&mut target, &mapping.name()).await
        })
        .await?;
        let (mapping, copied_before) = transient(retry, "reading the table's state", || async {
            let target = pools.target().await?;
            let mapping = load_mapping(&**pools.source().await?, &**target, table).await?;
            progress::adopt_legacy(&**target, &mapping.source).await?;
            let name = mapping.name();
            // Copied with this mapping (another filter or other columns: copied again).
            let copied_before = progress::load(&**target, &name).await?.is_some()
                && progress::mapping(&**target, &name).await? == mapping.definition;
            Ok((mapping, copied_before))
        })
        .await?;
        let name = mapping.name();
        tracing::info!(table = %name, capture = ?status, "capture in place");
        let intact = matches!(status, InstallStatus::Unchanged | InstallStatus::Upgraded);
        if !intact && !recaptured.contains(&mapping.source) {
            recaptured.push(mapping.source.clone());
            for other in siblings(pools, settings, &mapping, &queue).await {
                tracing::info!(table = %other, "its source was captured afresh: copying it too");
                queue.push(other);
            }
        }
        let recopy = recaptured.contains(&mapping.source);
        let copy = if intact && copied_before && !copy_anyway && !recopy {
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

/// Says which progress rows of mappings no longer configured hold the journal of a source that
/// configured mappings share (its rows go only once every mapping with progress applied them).
/// Best effort: the progress table may not be there yet.
pub(crate) async fn warn_unconfigured(pools: &Pools, mappings: &[TableMapping]) {
    let Ok(target) = pools.target().await else {
        return;
    };
    let mut sources: Vec<&QualifiedName> = mappings.iter().map(|m| &m.source).collect();
    sources.dedup();
    for source in sources {
        let source = source.to_string();
        let Ok(rows) = target
            .query(
                "SELECT table_name FROM rowsync_progress \
                  WHERE table_name = $1 OR pg_catalog.starts_with(table_name, $1 || ' → ')",
                &[&source],
            )
            .await
        else {
            return;
        };
        for row in rows {
            let name: String = row.get(0);
            if !mappings.iter().any(|m| m.name() == name) {
                tracing::warn!(
                    mapping = %name,
                    "no longer configured, but its progress keeps the shared journal of {source} from being emptied behind it; if it is gone for good: DELETE FROM rowsync_progress WHERE table_name = '{}'",
                    name.replace('\'', "''")
                );
            }
        }
    }
}

/// Warns when the source's capture objects are not the ones this binary ships (an upgrade whose
/// `rowsync setup` has not run yet). Says nothing when the source cannot be asked now.
pub(crate) async fn warn_outdated_capture(pools: &Pools) {
    let Ok(source) = pools.source().await else {
        return;
    };
    if let Some(warning) = capture::version_warning(&**source).await {
        tracing::warn!("{warning}");
    }
}

/// The other configured mappings of `mapping`'s source table that `queue` does not hold yet.
async fn siblings(
    pools: &Pools,
    settings: &Settings,
    mapping: &TableMapping,
    queue: &[TableSpec],
) -> Vec<TableSpec> {
    let mut found = Vec::new();
    for other in &settings.tables {
        if queue.contains(other) || other.source.name != mapping.source.name {
            continue;
        }
        if let Ok(theirs) = load_mapping_pooled(pools, other).await
            && theirs.source == mapping.source
        {
            found.push(other.clone());
        }
    }
    found
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
