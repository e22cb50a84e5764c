//! The `/status` document: one type, serialized by the endpoint and read back by `rowsync status`,
//! so a field cannot be misnamed on one side only.
//!
//! Its first fields are those of the Node service's `getSyncStats()` (`totalSynced`,
//! `lastSyncTime`, `lastSyncDuration`, `errors`, `consecutiveFailures`, `isRealTimeActive`,
//! `isSyncInProgress`, `healthStatus`); the rest is rowsync's own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::ops::health::{self, Health, PoolUsage};
use crate::ops::telemetry::{Figures, Role, rfc3339};
use crate::pipeline::apply::Counts;
use crate::source::listener::ListenerState;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusDocument {
    pub(crate) total_synced: u64,
    /// When the last sweep finished (RFC 3339).
    pub(crate) last_sync_time: Option<String>,
    /// How long it took, in milliseconds.
    pub(crate) last_sync_duration: Option<u64>,
    pub(crate) errors: u64,
    pub(crate) consecutive_failures: u32,
    pub(crate) is_real_time_active: bool,
    pub(crate) is_sync_in_progress: bool,
    pub(crate) health_status: Health,
    pub(crate) lag_seconds: Option<f64>,
    pub(crate) yielding: Option<YieldingStatus>,
    pub(crate) yielded_seconds: f64,
    pub(crate) source_active_sessions: Option<u32>,
    pub(crate) role: Role,
    /// Which rowsync process (`host:pid`) applies each configured table.
    #[serde(default)]
    pub(crate) owners: BTreeMap<String, String>,
    pub(crate) caught_up: bool,
    pub(crate) started_at: String,
    pub(crate) batches: u64,
    pub(crate) sweeps: u64,
    pub(crate) error_rate: f64,
    pub(crate) errors_by_type: BTreeMap<String, u64>,
    pub(crate) totals: Counts,
    pub(crate) tables: BTreeMap<String, TableStatus>,
    pub(crate) pools: BTreeMap<String, PoolUsage>,
    pub(crate) version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct YieldingStatus {
    pub(crate) since: String,
    pub(crate) source_active_sessions: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TableStatus {
    pub(crate) created: u64,
    pub(crate) updated: u64,
    pub(crate) deleted: u64,
    pub(crate) unchanged: u64,
    pub(crate) failed: u64,
    /// Journaled changes not yet applied, as of the last sweep.
    pub(crate) pending: Option<i64>,
    /// Rows the target rejected that wait for a retry.
    pub(crate) unresolved: usize,
    pub(crate) last_batch_time: Option<String>,
    /// While the table's attempts fail: the last error.
    pub(crate) error: Option<String>,
    pub(crate) consecutive_failures: u32,
    /// The last background verification (`VERIFY_INTERVAL_MINUTES`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) verified: Option<VerifiedStatus>,
    /// Seconds since the newest source snapshot fully applied to this table was taken.
    #[serde(default)]
    pub(crate) lag_seconds: Option<f64>,
    /// Rows written per minute over the last hour, oldest first.
    #[serde(default)]
    pub(crate) applied_per_minute: Vec<u64>,
}

/// What the last background verification of a table found.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VerifiedStatus {
    pub(crate) at: String,
    pub(crate) divergent_rows: u64,
    pub(crate) missing: u64,
    pub(crate) extra: u64,
    pub(crate) different: u64,
    pub(crate) repaired: bool,
}

impl StatusDocument {
    /// The document for `figures`, with the pools' usage, judged at `now`.
    pub(crate) fn new(
        figures: &Figures,
        settings: &Settings,
        pools: &[(&'static str, PoolUsage)],
        now: SystemTime,
    ) -> Self {
        let totals = figures.totals;
        let tables = figures
            .tables
            .iter()
            .map(|(name, t)| {
                let status = TableStatus {
                    created: t.counts.created,
                    updated: t.counts.updated,
                    deleted: t.counts.deleted,
                    unchanged: t.counts.unchanged,
                    failed: t.counts.failed,
                    pending: t.pending,
                    unresolved: t.unresolved,
                    last_batch_time: t.last_batch_at.map(rfc3339),
                    error: t.failing.as_ref().map(|f| f.error.clone()),
                    consecutive_failures: t.failing.as_ref().map_or(0, |f| f.failures),
                    verified: t.verified.as_ref().map(|v| VerifiedStatus {
                        at: rfc3339(v.at),
                        divergent_rows: v.divergent_rows,
                        missing: v.missing,
                        extra: v.extra,
                        different: v.different,
                        repaired: v.repaired,
                    }),
                    lag_seconds: t
                        .applied_as_of
                        .map(|at| now.duration_since(at).unwrap_or_default().as_secs_f64()),
                    applied_per_minute: t.per_minute.last_hour(now),
                };
                (name.clone(), status)
            })
            .collect();
        Self {
            total_synced: totals.created + totals.updated + totals.deleted,
            last_sync_time: figures.last_sweep.as_ref().map(|s| rfc3339(s.finished_at)),
            last_sync_duration: figures
                .last_sweep
                .as_ref()
                .map(|s| s.duration.as_millis() as u64),
            errors: figures.errors,
            consecutive_failures: figures.consecutive_failures,
            is_real_time_active: figures.listener == ListenerState::Listening,
            is_sync_in_progress: figures.sweep_in_progress,
            health_status: health::evaluate(figures, settings, pools, now),
            lag_seconds: figures.lag_seconds,
            yielding: figures.yielding.map(|y| YieldingStatus {
                since: rfc3339(y.since),
                source_active_sessions: y.active_sessions,
            }),
            yielded_seconds: figures.yielded.as_secs_f64(),
            source_active_sessions: figures.source_active_sessions,
            role: figures.role,
            owners: figures.owners.clone(),
            caught_up: figures.caught_up,
            started_at: rfc3339(figures.started_at),
            batches: figures.batches,
            sweeps: figures.sweeps,
            error_rate: figures.error_rate,
            errors_by_type: figures.errors_by_type.clone(),
            totals,
            tables,
            pools: pools
                .iter()
                .map(|(database, usage)| (database.to_string(), *usage))
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// The summary `rowsync status` prints, from the daemon at `addr`.
    pub(crate) fn summary(&self, addr: &str) -> String {
        let or_na = |v: &Option<String>| v.clone().unwrap_or_else(|| "n/a".into());
        let health = &self.health_status;
        let mut out = format!(
            "rowsync {} at {addr}: {}, {}\n",
            self.version,
            self.role.as_str(),
            health.status.as_str(),
        );
        let _ = writeln!(
            out,
            "  up since {}; real-time {}; lag {} s; {} sweeps, {} batches; {} errors ({} in a row)",
            self.started_at,
            if self.is_real_time_active {
                "listening"
            } else {
                "not listening"
            },
            self.lag_seconds
                .map_or("n/a".into(), |lag| format!("{lag:.3}")),
            self.sweeps,
            self.batches,
            self.errors,
            self.consecutive_failures,
        );
        let _ = writeln!(
            out,
            "  last sweep {} ({} ms){}; total synced {}",
            or_na(&self.last_sync_time),
            self.last_sync_duration
                .map_or("n/a".into(), |ms| ms.to_string()),
            if self.is_sync_in_progress {
                ", a sweep is running"
            } else {
                ""
            },
            self.total_synced,
        );
        if let Some(yielding) = &self.yielding {
            let _ = writeln!(
                out,
                "  yielding to a busy source since {} ({} active sessions); changes wait in the journal",
                yielding.since, yielding.source_active_sessions,
            );
        }
        if !self.owners.is_empty() {
            let owners: Vec<String> = self
                .owners
                .iter()
                .map(|(table, owner)| format!("{table} → {owner}"))
                .collect();
            let _ = writeln!(out, "  applied by: {}", owners.join(", "));
        }
        for (name, t) in &self.tables {
            let _ = writeln!(
                out,
                "  {name}: {} created, {} updated, {} deleted, {} unchanged, {} failed; {} pending; {} waiting for retry",
                t.created,
                t.updated,
                t.deleted,
                t.unchanged,
                t.failed,
                t.pending.map_or("n/a".into(), |p| p.to_string()),
                t.unresolved,
            );
            if let Some(error) = &t.error {
                let _ = writeln!(
                    out,
                    "    failing ({} attempts in a row): {error}",
                    t.consecutive_failures
                );
            }
            if let Some(v) = &t.verified {
                let _ = writeln!(
                    out,
                    "    verified {}: {}",
                    v.at,
                    if v.divergent_rows == 0 {
                        "no row differs".to_string()
                    } else {
                        format!(
                            "{} missing in the target, {} extra, {} different{}",
                            v.missing,
                            v.extra,
                            v.different,
                            if v.repaired { " (being repaired)" } else { "" }
                        )
                    }
                );
            }
        }
        for (name, check) in &health.checks {
            if !check.ok {
                let _ = writeln!(out, "  ✗ {name}: {}", check.message);
            }
        }
        for line in &health.recommendations {
            let _ = writeln!(out, "  → {line}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;
    use crate::ops::telemetry::Telemetry;

    fn settings() -> Settings {
        Settings::from_env(&Env::from_pairs([
            ("SOURCE_DATABASE_URL", "postgres://u@h/a"),
            ("TARGET_DATABASE_URL", "postgres://u@h/b"),
        ]))
        .unwrap()
    }

    #[test]
    fn the_document_keeps_the_node_services_field_names_and_reads_back() {
        let telemetry = Telemetry::new();
        telemetry.add_table("public.users");
        telemetry.batch(
            "public.users",
            Counts {
                created: 2,
                ..Counts::default()
            },
            SystemTime::now(),
        );
        telemetry.yield_started(9.0);
        let pools = [(
            "source",
            PoolUsage {
                max_size: 10,
                size: 1,
                in_use: 0,
            },
        )];
        let document =
            StatusDocument::new(&telemetry.figures(), &settings(), &pools, SystemTime::now());
        let json = serde_json::to_value(&document).unwrap();
        for key in [
            "totalSynced",
            "lastSyncTime",
            "lastSyncDuration",
            "errors",
            "consecutiveFailures",
            "isRealTimeActive",
            "isSyncInProgress",
            "healthStatus",
            "lagSeconds",
            "yieldedSeconds",
            "sourceActiveSessions",
            "role",
            "caughtUp",
            "startedAt",
            "errorsByType",
            "version",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(json["totalSynced"], 2);
        assert_eq!(json["tables"]["public.users"]["created"], 2);
        assert!(json["tables"]["public.users"]["lastBatchTime"].is_string());
        assert_eq!(json["yielding"]["sourceActiveSessions"], 9.0);
        assert_eq!(json["pools"]["source"]["max_size"], 10);
        assert_eq!(json["healthStatus"]["status"], "HEALTHY");

        let read: StatusDocument = serde_json::from_value(json).unwrap();
        let summary = read.summary("127.0.0.1:9393");
        assert!(
            summary.starts_with("rowsync 0.1.0 at 127.0.0.1:9393: starting, HEALTHY"),
            "{summary}"
        );
        assert!(
            summary.contains("public.users: 2 created, 0 updated"),
            "{summary}"
        );
    }
}
