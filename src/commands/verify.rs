//! `rowsync verify`: does the target hold what the source holds, and if not, which rows differ?
//!
//! Per table: row counts on both sides, their difference, source rows updated in the last hour,
//! and the rows that differ ([`crate::pipeline::diff`]): how many are missing in the target, extra
//! in it, or different, and their keys (the first `--keys` of them; `--json` lists every one).
//! CONSISTENT means no row differs. Under continuous writes the two sides are never read at the
//! same instant, so each differing row is checked again, by key, before it is reported.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::catalog::ident::quote;
use crate::catalog::mapping::{TableMapping, load_mapping_pooled};
use crate::config::{DatabaseRole, Settings};
use crate::connection::Pools;
use crate::error::{Error, Result, SqlContext};
use crate::pipeline::diff::{self, Checks, Difference, Kind, Sink, Summary};
use crate::source::capture;

/// What `rowsync verify` is asked for.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Checks of each differing row in all (the scan's, then re-checks a second apart).
    pub attempts: u32,
    /// Keys listed per table in the report.
    pub keys: usize,
    /// Every differing key is kept (in a temporary file), for `--json`.
    pub all_keys: bool,
}

/// One table's comparison.
#[derive(Debug)]
pub struct TableVerdict {
    pub(crate) table: String,
    pub(crate) summary: Summary,
    /// Source rows updated within the last hour (None: the table has no `updated_at`).
    pub(crate) updated_last_hour: Option<i64>,
    /// Capture triggers missing or not `ENABLE ALWAYS`.
    pub(crate) trigger_problems: Vec<String>,
    /// Journal rows not yet applied.
    pub(crate) pending: i64,
    /// The differing rows: the first few, and where asked for, all of them.
    pub(crate) listing: Listing,
}

impl TableVerdict {
    pub fn consistent(&self) -> bool {
        self.summary.differing() == 0
    }
}

/// Compares every table of `SYNC_TABLES`.
pub async fn verify(settings: &Settings, options: VerifyOptions) -> Result<Vec<TableVerdict>> {
    let pools = Pools::new(&for_diffs(settings))?;
    let result = async {
        let mut verdicts = Vec::new();
        for table in &settings.tables {
            let mapping = load_mapping_pooled(&pools, table).await?;
            let mut listing = Listing::new(options.keys, options.all_keys)?;
            let summary =
                diff::diff(&pools, &mapping, checks(options.attempts), &mut listing).await?;
            let (updated_last_hour, trigger_problems, pending) =
                source_facts(&**pools.source().await?, &mapping).await?;
            verdicts.push(TableVerdict {
                table: mapping.name(),
                summary,
                updated_last_hour,
                trigger_problems,
                pending,
                listing,
            });
        }
        Ok(verdicts)
    }
    .await;
    pools.close();
    result
}

/// Settings for the pools of a command that diffs: a diff reads each side on one session while it
/// re-checks rows on another.
pub(crate) fn for_diffs(settings: &Settings) -> Settings {
    let mut settings = settings.clone();
    settings.source.pool_size = settings.source.pool_size.max(2);
    settings.target.pool_size = settings.target.pool_size.max(2);
    settings
}

/// Re-checks `attempts - 1` times, a second apart.
pub(crate) fn checks(attempts: u32) -> Checks {
    Checks {
        attempts,
        pause: Duration::from_secs(1),
        background: false,
    }
}

/// Rows updated in the last hour, capture problems and pending journal rows of the source table.
async fn source_facts(
    source: &impl GenericClient,
    mapping: &TableMapping,
) -> Result<(Option<i64>, Vec<String>, i64)> {
    let updated_last_hour = match &mapping.updated_at {
        Some(column) => Some(
            source
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {} WHERE {} > now() - interval '1 hour'",
                        mapping.source.quoted(),
                        quote(column)
                    ),
                    &[],
                )
                .await
                .context(DatabaseRole::Source, || "counting recent updates".into())?
                .get(0),
        ),
        None => None,
    };
    let trigger_problems = capture::trigger_problems(source, &mapping.source).await?;
    let pending = match &mapping.journal {
        Some(journal) => capture::journal_depth(source, journal).await?,
        None => 0,
    };
    Ok((updated_last_hour, trigger_problems, pending))
}

/// The differing rows of a table as a diff hands them on: the first `limit` kept in memory, and
/// with `all`, every one written to an anonymous temporary file (a line `kind<TAB>key` each), so
/// that a table where millions differ costs disk, not memory.
#[derive(Debug)]
pub(crate) struct Listing {
    pub(crate) first: Vec<Difference>,
    limit: usize,
    all: Option<BufWriter<std::fs::File>>,
}

impl Listing {
    pub(crate) fn new(limit: usize, all: bool) -> Result<Self> {
        let all = if all {
            Some(BufWriter::new(tempfile::tempfile().map_err(|source| {
                Error::Io {
                    action: "creating a temporary file for the differing keys".into(),
                    source,
                }
            })?))
        } else {
            None
        };
        Ok(Self {
            first: Vec::new(),
            limit,
            all,
        })
    }

    /// Every difference kept (all of them when `all` was asked, else the first), from the start.
    pub(crate) fn reader(&mut self) -> Result<ListingReader> {
        let Some(writer) = self.all.as_mut() else {
            return Ok(ListingReader::Memory(self.first.clone().into_iter()));
        };
        let file = writer
            .flush()
            .and_then(|()| writer.get_ref().try_clone())
            .and_then(|mut file| file.rewind().map(|()| file))
            .map_err(|source| Error::Io {
                action: "reading the differing keys back".into(),
                source,
            })?;
        Ok(ListingReader::File(BufReader::new(file).lines()))
    }
}

/// Reads a [`Listing`] back, a window at a time.
pub(crate) enum ListingReader {
    Memory(std::vec::IntoIter<Difference>),
    File(std::io::Lines<BufReader<std::fs::File>>),
}

impl ListingReader {
    /// The next `window` differences at most (empty at the end).
    pub(crate) fn next_window(&mut self, window: usize) -> Result<Vec<Difference>> {
        let mut batch = Vec::new();
        while batch.len() < window {
            let difference = match self {
                Self::Memory(differences) => differences.next(),
                Self::File(lines) => match lines.next() {
                    None => None,
                    Some(line) => {
                        let io = |source| Error::Io {
                            action: "reading the differing keys back".into(),
                            source,
                        };
                        let line = line.map_err(io)?;
                        // Every line is one this listing wrote: one that does not read back
                        // means the file was damaged, not that the list ended.
                        let parsed = line.split_once('\t').and_then(|(kind, key)| {
                            Some(Difference {
                                kind: Kind::from_name(kind)?,
                                key: key.to_string(),
                            })
                        });
                        Some(parsed.ok_or_else(|| {
                            io(std::io::Error::other(format!("unreadable line {line:?}")))
                        })?)
                    }
                },
            };
            match difference {
                Some(difference) => batch.push(difference),
                None => break,
            }
        }
        Ok(batch)
    }
}

impl Sink for Listing {
    async fn found(&mut self, differences: Vec<Difference>) -> Result<()> {
        for difference in differences {
            if let Some(all) = self.all.as_mut() {
                writeln!(all, "{}\t{}", difference.kind.as_str(), difference.key).map_err(
                    |source| Error::Io {
                        action: "writing the differing keys to a temporary file".into(),
                        source,
                    },
                )?;
            }
            if self.first.len() < self.limit {
                self.first.push(difference);
            }
        }
        Ok(())
    }
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
        "{:<width$}  {:>10}  {:>10}  {:>10}  {:>12}  {:<9}  {:>9}  {:>9}  {:>9}  STATUS\n",
        "TABLE",
        "SOURCE",
        "TARGET",
        "DIFFERENCE",
        "UPDATED (1H)",
        "CONTENTS",
        "MISSING",
        "EXTRA",
        "DIFFERENT"
    );
    for v in verdicts {
        let s = &v.summary;
        let _ = writeln!(
            text,
            "{:<width$}  {:>10}  {:>10}  {:>10}  {:>12}  {:<9}  {:>9}  {:>9}  {:>9}  {}",
            v.table,
            s.source_rows,
            s.target_rows,
            s.source_rows - s.target_rows,
            v.updated_last_hour
                .map(|n| n.to_string())
                .unwrap_or_else(|| "n/a".into()),
            if v.consistent() { "same" } else { "differ" },
            s.missing,
            s.extra,
            s.different,
            if v.consistent() {
                "CONSISTENT"
            } else {
                "INCONSISTENT"
            },
        );
    }
    for v in verdicts {
        text.push_str(&keys_report(
            &v.table,
            "differing rows",
            v.summary.differing(),
            &v.listing.first,
        ));
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

/// The differing keys of a table, one per line, and how many more there are.
pub(crate) fn keys_report(table: &str, what: &str, total: u64, first: &[Difference]) -> String {
    let mut text = String::new();
    if first.is_empty() {
        return text;
    }
    let _ = writeln!(text, "{table}: {what} by key:");
    for difference in first {
        let _ = writeln!(
            text,
            "  {:<9}  {}",
            difference.kind.as_str(),
            difference.key
        );
    }
    let more = total.saturating_sub(first.len() as u64);
    if more > 0 {
        let _ = writeln!(
            text,
            "  … and {more} more (--keys N lists more, --json lists all)"
        );
    }
    text
}

/// The report as one JSON document, every differing key included.
pub fn report_json(verdicts: &mut [TableVerdict], out: &mut impl Write) -> Result<()> {
    let io = |source| Error::Io {
        action: "writing the report".into(),
        source,
    };
    let consistent = verdicts.iter().all(TableVerdict::consistent);
    write!(out, "{{\"consistent\":{consistent},\"tables\":[").map_err(io)?;
    for (i, v) in verdicts.iter_mut().enumerate() {
        let head = serde_json::json!({
            "table": v.table,
            "consistent": v.consistent(),
            "source_rows": v.summary.source_rows,
            "target_rows": v.summary.target_rows,
            "missing": v.summary.missing,
            "extra": v.summary.extra,
            "different": v.summary.different,
            "updated_last_hour": v.updated_last_hour,
            "capture_problems": v.trigger_problems,
            "pending": v.pending,
        })
        .to_string();
        let head = head.strip_suffix('}').unwrap_or(&head);
        write!(
            out,
            "{}{head},\"differences\":[",
            if i > 0 { "," } else { "" }
        )
        .map_err(io)?;
        let mut first = true;
        let mut reader = v.listing.reader()?;
        loop {
            let batch = reader.next_window(10_000)?;
            if batch.is_empty() {
                break;
            }
            for difference in batch {
                // The key is jsonb's own rendering: valid JSON as it stands.
                write!(
                    out,
                    "{}{{\"kind\":\"{}\",\"key\":{}}}",
                    if first { "" } else { "," },
                    difference.kind.as_str(),
                    difference.key
                )
                .map_err(io)?;
                first = false;
            }
        }
        write!(out, "]}}").map_err(io)?;
    }
    writeln!(out, "]}}").map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn difference(kind: Kind, key: &str) -> Difference {
        Difference {
            kind,
            key: key.into(),
        }
    }

    #[tokio::test]
    async fn a_listing_keeps_the_first_in_memory_and_reads_every_one_back_in_windows() {
        let all = vec![
            difference(Kind::Missing, r#"{"id": 1}"#),
            difference(Kind::Extra, r#"{"id": "a\tb"}"#),
            difference(Kind::Different, r#"{"id": 3}"#),
        ];
        let mut listing = Listing::new(1, true).unwrap();
        listing.found(all[..2].to_vec()).await.unwrap();
        listing.found(all[2..].to_vec()).await.unwrap();
        assert_eq!(listing.first, all[..1]);
        let mut reader = listing.reader().unwrap();
        let mut read = reader.next_window(2).unwrap();
        assert_eq!(read.len(), 2);
        read.extend(reader.next_window(2).unwrap());
        assert!(reader.next_window(2).unwrap().is_empty());
        assert_eq!(read, all);
    }
}
