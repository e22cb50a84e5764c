//! Health: checks with thresholds (after the seed service's table) and what to do about each.
//!
//! | check | fails when | severity |
//! |---|---|---|
//! | `sweep_duration` | the last sweep took more than 80% of the interval | warning |
//! | `error_rate` | more than 1% of the work of the last ten minutes failed | warning |
//! | `pool_usage` | a pool has more than 80% of its connections in use | warning |
//! | `consecutive_failures` | more than 5 attempts in a row failed | critical |
//! | `realtime` | the LISTEN connection is down (changes arrive by polling) | warning |
//! | `sweep_overdue` | no sweep finished for 3 intervals (plus the last sweep's duration) | critical |
//! | `replication_lag` | the target may be more than 1 interval behind (critical past 3) | warning / critical |
//! | `capture` | a capture trigger on the source is disabled or missing | critical |
//! | `tables` | a table fails for good, or more than 5 times in a row | critical |
//! | `journal` | a journal holds rows no batch will consume | warning |
//! | `divergence` | the last verification (`VERIFY_INTERVAL_MINUTES`) found rows that differ | warning |
//!
//! Any failed critical check makes the status UNHEALTHY (HTTP 503); any failed warning DEGRADED;
//! otherwise HEALTHY (both HTTP 200). A standby is HEALTHY while it stands by: only the active
//! process is judged on syncing.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::ops::telemetry::{Figures, Role};
use crate::source::listener::ListenerState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Status {
    Healthy,
    Degraded,
    Unhealthy,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "HEALTHY",
            Self::Degraded => "DEGRADED",
            Self::Unhealthy => "UNHEALTHY",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Severity {
    Warning,
    Critical,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Check {
    pub ok: bool,
    pub severity: Severity,
    pub value: Value,
    pub threshold: Value,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Health {
    pub status: Status,
    pub role: Role,
    pub checks: BTreeMap<String, Check>,
    pub recommendations: Vec<String>,
}

/// Connections of one pool.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct PoolUsage {
    pub max_size: usize,
    pub size: usize,
    pub in_use: usize,
}

/// Failed attempts in a row before syncing counts as broken.
const CONSECUTIVE_FAILURES: u32 = 5;

/// One check's verdict and, should it fail, what to do about it.
struct Evaluated {
    name: &'static str,
    check: Check,
    advice: String,
}

/// Judges `figures` at `now` against every check.
pub(crate) fn evaluate(
    figures: &Figures,
    settings: &Settings,
    pools: &[(&'static str, PoolUsage)],
    now: SystemTime,
) -> Health {
    let interval = settings.sync_interval.as_secs_f64();
    let mut evaluated = Vec::new();
    if figures.role == Role::Active {
        evaluated.extend([
            sweep_duration(figures, interval),
            realtime(figures),
            sweep_overdue(figures, interval, now),
            capture(figures),
            tables(figures),
            journal(figures),
            replication_lag(figures, interval),
        ]);
        if settings.verify_interval.is_some() {
            evaluated.push(divergence(figures, settings.repair_automatically));
        }
    }
    evaluated.push(lock_session(figures, now));
    evaluated.push(error_rate(figures));
    evaluated.push(consecutive_failures(figures));
    evaluated.extend(
        pools
            .iter()
            .map(|&(database, usage)| pool_usage(database, usage)),
    );

    let mut checks = BTreeMap::new();
    let mut recommendations = Vec::new();
    for Evaluated {
        name,
        check,
        advice,
    } in evaluated
    {
        if !check.ok {
            recommendations.push(advice);
        }
        checks.insert(name.to_string(), check);
    }
    let status = if checks
        .values()
        .any(|c| !c.ok && c.severity == Severity::Critical)
    {
        Status::Unhealthy
    } else if checks.values().any(|c| !c.ok) {
        Status::Degraded
    } else {
        Status::Healthy
    };
    if recommendations.is_empty() {
        recommendations.push(match figures.role {
            Role::Standby => "Standing by: another rowsync process is active; this one takes over \
                              if it stops."
                .into(),
            _ => "All systems operational.".into(),
        });
    }
    Health {
        status,
        role: figures.role,
        checks,
        recommendations,
    }
}

/// Whether this process has its lock session on the target (it opens none while it cannot reach
/// the source either): without it, it holds and applies no table, whatever its role, and a
/// standby cannot take over. Critical: nothing is applied by this process, and if it is the
/// only one, by nobody.
fn lock_session(figures: &Figures, now: SystemTime) -> Evaluated {
    let down_for = figures
        .lock_unreachable
        .as_ref()
        .map(|(since, error)| (now.duration_since(*since).unwrap_or_default(), error));
    Evaluated {
        name: "lock_session",
        check: Check {
            ok: down_for.is_none(),
            severity: Severity::Critical,
            value: json!(down_for.map(|(d, _)| d.as_secs_f64())),
            threshold: json!(null),
            message: match down_for {
                None => "holding its lock session on the target".into(),
                Some((d, error)) => format!(
                    "no lock session for {:.0} s, so no table: {error}",
                    d.as_secs_f64()
                ),
            },
        },
        advice: "This process applies nothing (and cannot take over from another) until it \
                 reaches both databases: check that the server named in the check is up and \
                 reachable and that rowsync's credentials work; it retries by itself."
            .into(),
    }
}

fn sweep_duration(figures: &Figures, interval: f64) -> Evaluated {
    let duration = figures
        .last_sweep
        .as_ref()
        .map_or(0.0, |s| s.duration.as_secs_f64());
    Evaluated {
        name: "sweep_duration",
        check: Check {
            ok: duration <= 0.8 * interval,
            severity: Severity::Warning,
            value: json!(duration),
            threshold: json!(0.8 * interval),
            message: format!("last sweep took {duration:.3} s of a {interval:.1} s interval"),
        },
        advice:
            "Sweeps take more than 80% of the interval: raise SYNC_INTERVAL_MINUTES, make sure \
                 the source has an index on updated_at, and check the target for slow triggers or \
                 missing indexes."
                .into(),
    }
}

fn realtime(figures: &Figures) -> Evaluated {
    Evaluated {
        name: "realtime",
        check: Check {
            ok: figures.listener == ListenerState::Listening,
            severity: Severity::Warning,
            value: json!(figures.listener.as_str()),
            threshold: json!("listening"),
            message: format!("the LISTEN connection is {}", figures.listener.as_str()),
        },
        advice: "The real-time path is not listening; changes still arrive by polling and sweeps. \
                 Check that the source accepts connections (sync_errors has \
                 REALTIME_SYNC_CONNECTION_ERROR rows with the cause)."
            .into(),
    }
}

fn sweep_overdue(figures: &Figures, interval: f64, now: SystemTime) -> Evaluated {
    let last = figures.last_sweep.as_ref();
    let since_sweep = last.map_or(figures.started_at, |s| s.finished_at);
    let overdue_after = 3.0 * interval + last.map_or(0.0, |s| s.duration.as_secs_f64());
    let age = now
        .duration_since(since_sweep)
        .unwrap_or_default()
        .as_secs_f64();
    Evaluated {
        name: "sweep_overdue",
        check: Check {
            ok: age <= overdue_after,
            severity: Severity::Critical,
            value: json!(age),
            threshold: json!(overdue_after),
            message: format!("{age:.1} s since the last sweep finished"),
        },
        advice: "No sweep has finished for three intervals: look at rowsync's log and at \
                 sync_errors; a database may be unreachable or a sweep may be stuck."
            .into(),
    }
}

fn capture(figures: &Figures) -> Evaluated {
    let broken: Vec<&str> = figures
        .tables
        .iter()
        .filter(|(_, t)| t.capture_intact == Some(false) || t.capture_lost.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    let mut problems = Vec::new();
    let off: Vec<&String> = figures
        .tables
        .iter()
        .filter(|(_, t)| t.capture_intact == Some(false))
        .map(|(name, _)| name)
        .collect();
    if !off.is_empty() {
        problems.push(format!(
            "capture triggers are disabled or missing on {off:?}"
        ));
    }
    let lost: Vec<String> = figures
        .tables
        .iter()
        .filter_map(|(name, t)| Some(format!("{name} ({})", t.capture_lost.as_ref()?)))
        .collect();
    if !lost.is_empty() {
        problems.push(format!(
            "writes could not be journaled after a migration on {}",
            lost.join(", ")
        ));
    }
    Evaluated {
        name: "capture",
        check: Check {
            ok: problems.is_empty(),
            severity: Severity::Critical,
            value: json!(broken),
            threshold: json!([]),
            message: if problems.is_empty() {
                "every capture trigger is in place".into()
            } else {
                problems.join("; ")
            },
        },
        advice: "Changes to these tables are not being captured (a restore or ALTER TABLE … \
                 DISABLE TRIGGER can do that, or a migration capture could not follow, such as a \
                 new primary key): run `rowsync resync TABLE` (or `rowsync setup`) to repair \
                 capture and re-copy what was missed."
            .into(),
    }
}

fn tables(figures: &Figures) -> Evaluated {
    let failing: Vec<String> = figures
        .tables
        .iter()
        .filter_map(|(name, t)| {
            // Failures retrying will not fix, at once; others once they have gone on as long as
            // the consecutive_failures check allows.
            let failure = t
                .failing
                .as_ref()
                .filter(|f| f.permanent || f.failures > CONSECUTIVE_FAILURES)?;
            Some(format!("{name}: {}", failure.error))
        })
        .collect();
    Evaluated {
        name: "tables",
        check: Check {
            ok: failing.is_empty(),
            severity: Severity::Critical,
            value: json!(failing),
            threshold: json!([]),
            message: if failing.is_empty() {
                "every table syncs".into()
            } else {
                format!("these tables do not sync: {}", failing.join("; "))
            },
        },
        advice: "A table keeps failing while the others sync: its sync_errors rows say why \
                 (SELECT * FROM sync_errors WHERE NOT resolved AND table_name = '…'); fix that \
                 (grant the privilege, run `rowsync setup`, align the schema) and it resumes."
            .into(),
    }
}

fn journal(figures: &Figures) -> Evaluated {
    let stuck: BTreeMap<&String, i64> = figures
        .tables
        .iter()
        .filter_map(|(name, t)| Some((name, t.stuck.filter(|&n| n > 0)?)))
        .collect();
    Evaluated {
        name: "journal",
        check: Check {
            ok: stuck.is_empty(),
            severity: Severity::Warning,
            value: json!(stuck),
            threshold: json!({}),
            message: if stuck.is_empty() {
                "every journal row is on its way".into()
            } else {
                format!("journal rows that no batch will consume, per table: {stuck:?}")
            },
        },
        advice: "A journal holds rows of changes already applied (deleting them failed: see the \
                 log) or rows whose txid no transaction has had (written by hand, not by the \
                 capture triggers). Batches delete both; if they stay, check that rowsync's role \
                 may DELETE from the journals in schema rowsync, and who writes to them."
            .into(),
    }
}

fn divergence(figures: &Figures, repairing: bool) -> Evaluated {
    let divergent: BTreeMap<&String, u64> = figures
        .tables
        .iter()
        .filter_map(|(name, t)| {
            let rows = t.verified.as_ref()?.divergent_rows;
            (rows > 0).then_some((name, rows))
        })
        .collect();
    let verified = figures
        .tables
        .values()
        .filter(|t| t.verified.is_some())
        .count();
    Evaluated {
        name: "divergence",
        check: Check {
            ok: divergent.is_empty(),
            severity: Severity::Warning,
            value: json!(divergent),
            threshold: json!({}),
            message: match (divergent.is_empty(), repairing) {
                (true, _) => format!(
                    "{verified} of {} tables verified so far; no row differs",
                    figures.tables.len()
                ),
                (false, false) => {
                    format!("rows that differ between source and target, per table: {divergent:?}")
                }
                (false, true) => format!(
                    "rows that differed between source and target, per table (being repaired): \
                     {divergent:?}"
                ),
            },
        },
        advice: if repairing {
            "Rows differed and were journaled for repair: something writes to the target, or \
             changes reach the source without capture (see the capture check). \
             `rowsync verify` lists them."
                .into()
        } else {
            "Rows differ between source and target: `rowsync verify` lists them by key, \
             `rowsync repair TABLE` fixes exactly those (or set REPAIR_AUTOMATICALLY=true). \
             Then look for whatever writes to the target."
                .into()
        },
    }
}

fn replication_lag(figures: &Figures, interval: f64) -> Evaluated {
    let lag = figures.lag_seconds;
    let critical = lag.is_none_or(|lag| lag > 3.0 * interval);
    Evaluated {
        name: "replication_lag",
        check: Check {
            ok: lag.is_some_and(|lag| lag <= interval),
            severity: if critical {
                Severity::Critical
            } else {
                Severity::Warning
            },
            value: json!(lag),
            threshold: json!(interval),
            message: match lag {
                Some(lag) => format!("the target reflects the source as of at most {lag:.3} s ago"),
                None => "nothing applied yet".into(),
            },
        },
        advice: "The target is falling behind: the journal is growing faster than it is applied. \
                 Check the target's write latency, BATCH_SIZE, and pending changes in /status."
            .into(),
    }
}

fn error_rate(figures: &Figures) -> Evaluated {
    Evaluated {
        name: "error_rate",
        check: Check {
            ok: figures.error_rate <= 0.01,
            severity: Severity::Warning,
            value: json!(figures.error_rate),
            threshold: json!(0.01),
            message: format!(
                "{:.2}% of the last ten minutes' work failed",
                figures.error_rate * 100.0
            ),
        },
        advice: "More than 1% of recent work failed: SELECT * FROM sync_errors WHERE resolved = \
                 FALSE ORDER BY created_at DESC; shows what and why."
            .into(),
    }
}

fn consecutive_failures(figures: &Figures) -> Evaluated {
    Evaluated {
        name: "consecutive_failures",
        check: Check {
            ok: figures.consecutive_failures <= CONSECUTIVE_FAILURES,
            severity: Severity::Critical,
            value: json!(figures.consecutive_failures),
            threshold: json!(CONSECUTIVE_FAILURES),
            message: format!("{} attempts in a row failed", figures.consecutive_failures),
        },
        advice: "Syncing keeps failing: check that both databases accept connections from rowsync \
                 (psql \"$SOURCE_DATABASE_URL\" -c 'SELECT 1'), and the latest sync_errors rows."
            .into(),
    }
}

fn pool_usage(database: &'static str, usage: PoolUsage) -> Evaluated {
    let ratio = if usage.max_size == 0 {
        0.0
    } else {
        usage.in_use as f64 / usage.max_size as f64
    };
    let (name, variable) = if database == "source" {
        ("pool_usage_source", "SOURCE_DB_POOL_SIZE")
    } else {
        ("pool_usage_target", "CHAT_DB_POOL_SIZE")
    };
    Evaluated {
        name,
        check: Check {
            ok: ratio <= 0.8,
            severity: Severity::Warning,
            value: json!(ratio),
            threshold: json!(0.8),
            message: format!(
                "{} of {} {database} connections in use",
                usage.in_use, usage.max_size
            ),
        },
        advice: format!("The {database} pool is more than 80% in use: raise {variable}."),
    }
}
