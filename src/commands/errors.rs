//! `rowsync errors`: the unresolved rows of `sync_errors`, and the two things an operator does
//! with them: `retry` (the next sweep retries them now) and `resolve` (marked resolved by hand,
//! with a note). The same actions are on the dashboard.

use std::fmt::Write as _;

use crate::config::{ConfigError, Settings};
use crate::connection::Pools;
use crate::error::Result;
use crate::target::queue::{self, ErrorFilter, OpenError, Selection};

/// What `rowsync errors` lists.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub table: Option<String>,
    pub error_type: Option<String>,
    pub limit: i64,
    pub json: bool,
}

/// The unresolved errors, as a table (or a JSON array).
pub async fn list(settings: &Settings, options: &ListOptions) -> Result<String> {
    let pools = Pools::new(settings)?;
    let filter = ErrorFilter {
        table: options.table.clone(),
        error_type: options.error_type.clone(),
        limit: options.limit,
    };
    let rows = async { queue::unresolved(&**pools.target().await?, &filter).await }.await;
    pools.close();
    let rows = rows?;
    if options.json {
        return Ok(serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n");
    }
    Ok(table(&rows))
}

fn table(rows: &[OpenError]) -> String {
    if rows.is_empty() {
        return "no unresolved errors\n".into();
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{:>6}  {:<24}  {:<18}  {:<24}  {:>7}  message",
        "id", "table", "type", "key", "retries"
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{:>6}  {:<24}  {:<18}  {:<24}  {:>7}  {}",
            row.id,
            row.table.as_deref().unwrap_or("-"),
            row.error_type,
            shorten(row.record_id.as_deref().unwrap_or("-"), 24),
            row.retry_count,
            shorten(&row.message, 100),
        );
    }
    let _ = writeln!(
        text,
        "{} listed (newest first, at most --limit); `rowsync errors retry ID…` retries at the next sweep, `rowsync errors resolve ID… --note TEXT` marks them resolved",
        rows.len()
    );
    text
}

fn shorten(text: &str, at: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= at {
        one_line
    } else {
        one_line.chars().take(at - 1).collect::<String>() + "…"
    }
}

/// What an action did: the ids it applied to, and those asked for that are not unresolved.
#[derive(Debug, Clone)]
pub struct Acted {
    pub done: Vec<i64>,
    pub missing: Vec<i64>,
}

impl Acted {
    fn new(asked: &Selection, done: Vec<i64>) -> Self {
        let missing = asked.missing(&done);
        Self { done, missing }
    }

    /// One line per outcome, for the terminal.
    pub fn report(&self, verb: &str) -> String {
        let mut text = format!("{verb} {} error(s)", self.done.len());
        if !self.done.is_empty() {
            let ids: Vec<String> = self.done.iter().map(ToString::to_string).collect();
            let _ = write!(text, ": {}", ids.join(", "));
        }
        text.push('\n');
        if !self.missing.is_empty() {
            let ids: Vec<String> = self.missing.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                text,
                "not unresolved errors (resolved already, or no such id): {}",
                ids.join(", ")
            );
        }
        text
    }
}

/// Which rows a command names: ids, or `--all` (of a table).
#[derive(Debug, Clone, Default)]
pub struct Named {
    pub ids: Vec<i64>,
    pub all: bool,
    pub table: Option<String>,
}

impl Named {
    /// Ids, or all (of a table); a table with ids is a usage error (exit 2), not a filter.
    fn selection(self) -> Result<Selection> {
        match (self.all, self.table) {
            (true, table) => Ok(Selection::All { table }),
            (false, None) => Ok(Selection::Ids(self.ids)),
            (false, Some(_)) => Err(ConfigError::new(
                "--table",
                "goes with --all (name ids alone, or --all --table TABLE)",
            )
            .into()),
        }
    }
}

/// `rowsync errors retry`: the next sweep retries the rows.
pub async fn retry(settings: &Settings, rows: Named) -> Result<Acted> {
    let rows = rows.selection()?;
    let pools = Pools::new(settings)?;
    let done = async { queue::retry_now(&**pools.target().await?, &rows).await }.await;
    pools.close();
    Ok(Acted::new(&rows, done?))
}

/// `rowsync errors resolve`: marked resolved by hand, with `note`.
pub async fn resolve(settings: &Settings, rows: Named, note: &str) -> Result<Acted> {
    let rows = rows.selection()?;
    let pools = Pools::new(settings)?;
    let done = async {
        queue::resolve_by_hand(
            &**pools.target().await?,
            &rows,
            note,
            "rowsync errors resolve",
        )
        .await
    }
    .await;
    pools.close();
    Ok(Acted::new(&rows, done?))
}
