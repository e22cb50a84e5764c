//! Prometheus metrics: every name in one place, rendered in the text exposition format.

use std::fmt::Write as _;

use crate::ops::health::PoolUsage;
use crate::ops::telemetry::{Figures, SWEEP_BUCKETS};

pub const CHANGES_APPLIED: &str = "rowsync_changes_applied_total";
pub const SYNC_ERRORS: &str = "rowsync_sync_errors_total";
pub const LAG_SECONDS: &str = "rowsync_lag_seconds";
pub const SWEEP_DURATION: &str = "rowsync_sweep_duration_seconds";
pub const JOURNAL_PENDING: &str = "rowsync_journal_pending";
pub const UNRESOLVED_ROWS: &str = "rowsync_unresolved_rows";
pub const POOL_SIZE: &str = "rowsync_pool_size";
pub const POOL_IN_USE: &str = "rowsync_pool_in_use";
pub const POOL_MAX: &str = "rowsync_pool_max_size";
pub const REALTIME_CONNECTED: &str = "rowsync_realtime_connected";
pub const ACTIVE: &str = "rowsync_active";
pub const BATCHES: &str = "rowsync_batches_total";
pub const SWEEPS: &str = "rowsync_sweeps_total";
pub const FAILED_ATTEMPTS: &str = "rowsync_failed_attempts_total";
pub const CONSECUTIVE_FAILURES: &str = "rowsync_consecutive_failures";
pub const BUILD_INFO: &str = "rowsync_build_info";
pub const YIELDING: &str = "rowsync_yielding";
pub const YIELDED_SECONDS: &str = "rowsync_yielded_seconds_total";
pub const SOURCE_ACTIVE_SESSIONS: &str = "rowsync_source_active_sessions";

/// Renders every metric.
pub(crate) fn render(figures: &Figures, pools: &[(&'static str, PoolUsage)]) -> String {
    let mut out = String::new();

    let name = family(
        &mut out,
        CHANGES_APPLIED,
        "counter",
        "Rows processed into the target, by table and outcome.",
    );
    let mut lines = String::new();
    for (table, figures) in &figures.tables {
        let c = figures.counts;
        for (operation, value) in [
            ("created", c.created),
            ("updated", c.updated),
            ("deleted", c.deleted),
            ("unchanged", c.unchanged),
            ("failed", c.failed),
        ] {
            let _ = writeln!(
                lines,
                "{name}{{table=\"{}\",operation=\"{operation}\"}} {value}",
                label(table)
            );
        }
    }
    push(&mut out, &lines);

    let name = family(
        &mut out,
        SYNC_ERRORS,
        "counter",
        "Failures recorded in sync_errors, by error_type.",
    );
    let mut lines = String::new();
    for (kind, value) in &figures.errors_by_type {
        let _ = writeln!(lines, "{name}{{type=\"{}\"}} {value}", label(kind));
    }
    push(&mut out, &lines);

    let name = family(
        &mut out,
        LAG_SECONDS,
        "gauge",
        "Upper bound of how far the target is behind the source, in seconds (NaN before the first batch).",
    );
    push(
        &mut out,
        &format!("{name} {}\n", figures.lag_seconds.unwrap_or(f64::NAN)),
    );

    let name = family(
        &mut out,
        YIELDING,
        "gauge",
        "1 while rowsync defers its work because the source is busy, else 0.",
    );
    push(
        &mut out,
        &format!("{name} {}\n", u8::from(figures.yielding.is_some())),
    );
    let name = family(
        &mut out,
        YIELDED_SECONDS,
        "counter",
        "Time spent deferring work to a busy source since start, in seconds (periods in progress not counted).",
    );
    push(
        &mut out,
        &format!("{name} {}\n", figures.yielded.as_secs_f64()),
    );
    let name = family(
        &mut out,
        SOURCE_ACTIVE_SESSIONS,
        "gauge",
        "Active sessions on the source other than rowsync's, at the last look (NaN before one).",
    );
    push(
        &mut out,
        &format!(
            "{name} {}\n",
            figures.source_active_sessions.map_or(f64::NAN, f64::from)
        ),
    );

    let name = family(
        &mut out,
        SWEEP_DURATION,
        "histogram",
        "Duration of sweeps, in seconds.",
    );
    let h = &figures.sweep_durations;
    let mut lines = String::new();
    for (i, bound) in SWEEP_BUCKETS.iter().enumerate() {
        let value = h.cumulative.get(i).copied().unwrap_or(0);
        let _ = writeln!(lines, "{name}_bucket{{le=\"{bound}\"}} {value}");
    }
    let _ = writeln!(lines, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(lines, "{name}_sum {}", h.sum);
    let _ = writeln!(lines, "{name}_count {}", h.count);
    push(&mut out, &lines);

    let name = family(
        &mut out,
        JOURNAL_PENDING,
        "gauge",
        "Journaled source changes not yet applied, by table (as of the last sweep).",
    );
    let mut lines = String::new();
    for (table, figures) in &figures.tables {
        if let Some(pending) = figures.pending {
            let _ = writeln!(lines, "{name}{{table=\"{}\"}} {pending}", label(table));
        }
    }
    push(&mut out, &lines);

    let name = family(
        &mut out,
        UNRESOLVED_ROWS,
        "gauge",
        "Rows the target rejected that wait for a retry, by table.",
    );
    let mut lines = String::new();
    for (table, figures) in &figures.tables {
        let _ = writeln!(
            lines,
            "{name}{{table=\"{}\"}} {}",
            label(table),
            figures.unresolved
        );
    }
    push(&mut out, &lines);

    for (metric, help, pick) in [
        (POOL_SIZE, "Open connections, by database.", 0),
        (POOL_IN_USE, "Connections in use, by database.", 1),
        (POOL_MAX, "Configured pool size, by database.", 2),
    ] {
        let name = family(&mut out, metric, "gauge", help);
        let mut lines = String::new();
        for (database, usage) in pools {
            let value = [usage.size, usage.in_use, usage.max_size][pick];
            let _ = writeln!(lines, "{name}{{database=\"{database}\"}} {value}");
        }
        push(&mut out, &lines);
    }

    let gauges: [(&str, &str, &str, f64); 5] = [
        (
            REALTIME_CONNECTED,
            "gauge",
            "1 while the LISTEN connection is listening.",
            f64::from(u8::from(
                figures.listener == crate::source::listener::ListenerState::Listening,
            )),
        ),
        (
            ACTIVE,
            "gauge",
            "1 while this process is the active applier (0: standby or starting).",
            f64::from(u8::from(
                figures.role == crate::ops::telemetry::Role::Active,
            )),
        ),
        (
            BATCHES,
            "counter",
            "Batches applied.",
            figures.batches as f64,
        ),
        (SWEEPS, "counter", "Sweeps finished.", figures.sweeps as f64),
        (
            FAILED_ATTEMPTS,
            "counter",
            "Failed attempts (batches, sweeps, listener connections).",
            figures.errors as f64,
        ),
    ];
    for (metric, kind, help, value) in gauges {
        let name = family(&mut out, metric, kind, help);
        push(&mut out, &format!("{name} {value}\n"));
    }
    let name = family(
        &mut out,
        CONSECUTIVE_FAILURES,
        "gauge",
        "Attempts failed in a row.",
    );
    push(
        &mut out,
        &format!("{name} {}\n", figures.consecutive_failures),
    );

    let name = family(&mut out, BUILD_INFO, "gauge", "Build information.");
    push(
        &mut out,
        &format!("{name}{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION")),
    );
    out
}

/// Writes a family's HELP and TYPE lines; returns its name for the samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str) -> String {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name.to_string()
}

fn push(out: &mut String, lines: &str) {
    out.push_str(lines);
}

/// Escapes a label value (backslash, double quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::telemetry::Telemetry;
    use crate::pipeline::apply::Counts;
    use std::time::SystemTime;

    #[test]
    fn renders_every_family_in_text_format() {
        let telemetry = Telemetry::new();
        telemetry.batch(
            "public.users",
            Counts {
                created: 3,
                updated: 2,
                ..Counts::default()
            },
            SystemTime::now(),
        );
        telemetry.recorded("CONSTRAINT_VIOLATION");
        telemetry.source_load(11);
        telemetry.yield_started(10.5);
        let pools = [(
            "source",
            PoolUsage {
                max_size: 10,
                size: 2,
                in_use: 1,
            },
        )];
        let text = render(&telemetry.figures(), &pools);
        for expected in [
            "rowsync_changes_applied_total{table=\"public.users\",operation=\"created\"} 3",
            "rowsync_sync_errors_total{type=\"CONSTRAINT_VIOLATION\"} 1",
            "rowsync_sweep_duration_seconds_bucket{le=\"+Inf\"} 0",
            "rowsync_pool_in_use{database=\"source\"} 1",
            "rowsync_realtime_connected 0",
            "rowsync_build_info{version=",
            "# TYPE rowsync_lag_seconds gauge",
            "rowsync_yielding 1",
            "rowsync_source_active_sessions 11",
            "rowsync_yielded_seconds_total 0",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Every sample line belongs to a family declared before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let metric = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.iter().any(|d| metric.starts_with(d.as_str())),
                    "{metric} has no TYPE line"
                );
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
