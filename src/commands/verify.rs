//! `rowsync verify`: does the target hold what the source holds?
//!
//! Per table: row counts on both sides, their difference, source rows updated in the last hour, and a
//! content checksum over the synced columns (a sum of per-row hashes, so row order does not matter).
//! CONSISTENT needs equal counts and equal checksums. Under continuous writes the two sides are never
//! read at the same instant, so an inconsistent result is re-checked a few times before it stands.

use std::fmt::Write as _;
use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::catalog::mapping::{TableMapping, load_mapping};
use crate::config::{DatabaseRole, Settings};
use crate::connection::Pools;
use crate::error::{Result, SqlContext};
use crate::source::capture;

/// One table's comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableVerdict {
    pub(crate) table: String,
    pub(crate) source_rows: i64,
    pub(crate) target_rows: i64,
    /// Source rows updated within the last hour (None: the table has no `updated_at`).
    pub(crate) updated_last_hour: Option<i64>,
    pub(crate) contents_match: bool,
    /// Capture triggers missing or not `ENABLE ALWAYS`.
    pub(crate) trigger_problems: Vec<String>,
    /// Journal rows not yet applied.
    pub(crate) pending: i64,
}

impl TableVerdict {
    pub fn consistent(&self) -> bool {
        self.source_rows == self.target_rows && self.contents_match
    }
}

/// Compares every table, re-checking inconsistent ones up to `attempts` times, a second apart.
pub async fn verify(settings: &Settings, attempts: u32) -> Result<Vec<TableVerdict>> {
    let pools = Pools::new(settings)?;
    let result = async {
        let mut verdicts = Vec::new();
        for table in &settings.tables {
            let source = pools.source().await?;
            let target = pools.target().await?;
            let mapping = load_mapping(&**source, &**target, table).await?;
            drop((source, target));
            let mut attempt = 1;
            let verdict = loop {
                let verdict = compare(&pools, &mapping).await?;
                if verdict.consistent() || attempt >= attempts {
                    break verdict;
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            verdicts.push(verdict);
        }
        Ok(verdicts)
    }
    .await;
    pools.close();
    result
}

async fn compare(pools: &Pools, mapping: &TableMapping) -> Result<TableVerdict> {
    let mut source = pools.source().await?;
    let mut target = pools.target().await?;
    let source_tx = source
        .transaction()
        .await
        .context(DatabaseRole::Source, || "starting verify".into())?;
    let target_tx = target
        .transaction()
        .await
        .context(DatabaseRole::Target, || "starting verify".into())?;
    let (source_table, target_table) = (mapping.source.quoted(), mapping.target.quoted());
    let (source_sum, target_sum) = tokio::try_join!(
        checksum(&*source_tx, DatabaseRole::Source, mapping, &source_table),
        checksum(&*target_tx, DatabaseRole::Target, mapping, &target_table),
    )?;
    let updated_last_hour = match &mapping.updated_at {
        Some(column) => Some(
            source_tx
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {} WHERE {} > now() - interval '1 hour'",
                        mapping.source.quoted(),
                        crate::catalog::ident::quote(column)
                    ),
                    &[],
                )
                .await
                .context(DatabaseRole::Source, || "counting recent updates".into())?
                .get(0),
        ),
        None => None,
    };
    let trigger_problems = capture::trigger_problems(&*source_tx, &mapping.source).await?;
    let pending = match &mapping.journal {
        Some(journal) => capture::journal_depth(&*source_tx, journal).await?,
        None => 0,
    };
    Ok(TableVerdict {
        table: mapping.name(),
        source_rows: source_sum.0,
        target_rows: target_sum.0,
        updated_last_hour,
        contents_match: source_sum == target_sum,
        trigger_problems,
        pending,
    })
}

/// `(rows, checksum)` of the synced columns. Output settings are pinned so that both servers render
/// equal values as equal text.
async fn checksum(
    client: &impl GenericClient,
    role: DatabaseRole,
    mapping: &TableMapping,
    table: &str,
) -> Result<(i64, String)> {
    client
        .batch_execute(
            "SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
             SET LOCAL TimeZone = 'UTC'; SET LOCAL extra_float_digits = 1; \
             SET LOCAL bytea_output = 'hex'; SET LOCAL statement_timeout = 0",
        )
        .await
        .context(role, || "preparing the checksum session".into())?;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(('x' || left(md5(ROW({})::text), 16))::bit(64)::bigint::numeric), 0)::text \
                   FROM {table}",
                mapping.column_list()
            ),
            &[],
        )
        .await
        .context(role, || format!("checksumming {table}"))?;
    Ok((row.get(0), row.get(1)))
}

/// The report `rowsync verify` prints.
pub fn report(verdicts: &[TableVerdict]) -> String {
    let width = verdicts
        .iter()
        .map(|v| v.table.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut text = format!(
        "{:<width$}  {:>10}  {:>10}  {:>10}  {:>12}  {:<9}  STATUS\n",
        "TABLE", "SOURCE", "TARGET", "DIFFERENCE", "UPDATED (1H)", "CONTENTS"
    );
    for v in verdicts {
        let _ = writeln!(
            text,
            "{:<width$}  {:>10}  {:>10}  {:>10}  {:>12}  {:<9}  {}",
            v.table,
            v.source_rows,
            v.target_rows,
            v.source_rows - v.target_rows,
            v.updated_last_hour
                .map(|n| n.to_string())
                .unwrap_or_else(|| "n/a".into()),
            if v.contents_match { "same" } else { "differ" },
            if v.consistent() {
                "CONSISTENT"
            } else {
                "INCONSISTENT"
            },
        );
    }
    for v in verdicts {
        for problem in &v.trigger_problems {
            let _ = writeln!(
                text,
                "warning: {}: {problem}; changes are not captured. Run `rowsync setup` to repair.",
                v.table
            );
        }
        if v.pending > 0 {
            let _ = writeln!(
                text,
                "note: {}: {} journaled changes not yet applied",
                v.table, v.pending
            );
        }
    }
    text
}
