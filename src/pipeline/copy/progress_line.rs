//! How far an initial copy has got, for whoever waits for it.
//!
//! On a terminal (stderr), a live line per table: rows copied of the planner's estimate, rows per
//! second and the time left (indicatif). Elsewhere (systemd, pm2, CI), a log line when the copy
//! starts and then every [`LOG_EVERY`], with the same figures as fields. The estimate is the
//! planner's row count for the source table (`EXPLAIN`), which costs nothing and is there at once,
//! also for a table never analyzed (the planner then estimates from its size on disk).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use tokio_postgres::GenericClient;

use crate::catalog::ident::QualifiedName;

/// How often a copy logs its progress when stderr is not a terminal.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(5);

/// The planner's row count for `table`, or None if it cannot say.
pub(crate) async fn estimate_rows(
    client: &impl GenericClient,
    table: &QualifiedName,
) -> Option<u64> {
    let plan: serde_json::Value = client
        .query_one(
            &format!("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}", table.quoted()),
            &[],
        )
        .await
        .ok()?
        .try_get(0)
        .ok()?;
    let rows = plan.get(0)?.get("Plan")?.get("Plan Rows")?.as_f64()?;
    (rows.is_finite() && rows >= 0.0).then_some(rows as u64)
}

/// The progress of one table's copy.
pub(crate) struct CopyProgress {
    table: String,
    estimate: Option<u64>,
    started: Instant,
    rows: u64,
    view: View,
}

enum View {
    /// A live line on the terminal.
    Bar(ProgressBar),
    /// A log line every [`LOG_EVERY`]; the next one is due then.
    Log { next: Instant },
}

impl CopyProgress {
    /// Starts showing the copy of `table`, of about `estimate` rows.
    pub(crate) fn start(table: &str, estimate: Option<u64>) -> Self {
        let view = if std::io::stderr().is_terminal() {
            View::Bar(bar(table, estimate))
        } else {
            View::Log {
                next: Instant::now(),
            }
        };
        let mut progress = Self {
            table: table.to_string(),
            estimate,
            started: Instant::now(),
            rows: 0,
            view,
        };
        progress.show();
        progress
    }

    /// `rows` more rows have been copied.
    pub(crate) fn add(&mut self, rows: u64) {
        self.rows += rows;
        self.show();
    }

    /// The copy starts over (row by row, after the target rejected a row).
    pub(crate) fn restart(&mut self) {
        self.rows = 0;
        self.started = Instant::now();
        if let View::Bar(bar) = &self.view {
            bar.reset();
        }
        self.show();
    }

    /// The copy is done: `rows` rows in all. The terminal line stays, complete.
    pub(crate) fn finish(&mut self, rows: u64) {
        self.rows = rows;
        if let View::Bar(bar) = &self.view {
            bar.set_length(rows.max(1));
            bar.set_position(rows);
            bar.finish();
        }
    }

    /// Rows per second so far.
    fn rate(&self) -> f64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            self.rows as f64 / seconds
        } else {
            0.0
        }
    }

    fn show(&mut self) {
        match &mut self.view {
            View::Bar(bar) => {
                // The estimate may be low: the line then shows the rows so far as the total.
                if bar.length().is_some_and(|length| self.rows > length) {
                    bar.set_length(self.rows);
                }
                bar.set_position(self.rows);
            }
            View::Log { next } => {
                let now = Instant::now();
                if now < *next {
                    return;
                }
                *next = now + LOG_EVERY;
                let rate = self.rate();
                let left = self.estimate.map(|total| total.saturating_sub(self.rows));
                let eta_seconds = match left {
                    Some(0) => Some(0),
                    Some(left) if rate > 0.0 => Some((left as f64 / rate).ceil() as u64),
                    _ => None,
                };
                tracing::info!(
                    table = %self.table,
                    rows = self.rows,
                    estimated_rows = self.estimate,
                    percent = self.estimate.filter(|&total| total > 0).map(|total| {
                        (100.0 * self.rows as f64 / total as f64).min(100.0).round() as u64
                    }),
                    rows_per_second = rate.round() as u64,
                    eta_seconds,
                    "copying"
                );
            }
        }
    }
}

fn bar(table: &str, estimate: Option<u64>) -> ProgressBar {
    let rate = |state: &ProgressState, out: &mut dyn std::fmt::Write| {
        let _ = write!(out, "{} rows/s", HumanCount(state.per_sec().round() as u64));
    };
    let (bar, template) = match estimate.filter(|&rows| rows > 0) {
        Some(rows) => (
            ProgressBar::new(rows),
            "{prefix} [{bar:20}] {human_pos}/~{human_len} rows, {rate}, about {eta} left",
        ),
        None => (
            ProgressBar::no_length(),
            "{prefix} {spinner} {human_pos} rows, {rate}, {elapsed}",
        ),
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("rate", rate)
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("copying {table}"));
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar
}
