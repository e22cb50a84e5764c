//! `rowsync status`: a summary for a terminal, from the running daemon's `/status`, or from the
//! databases when no daemon answers.

use std::fmt::Write as _;

use serde_json::Value;

use crate::catalog::mapping::load_mapping;
use crate::config::{DatabaseRole, Settings};
use crate::connection::Pools;
use crate::error::{Result, SqlContext};
use crate::ops::http;
use crate::source::capture;

/// The summary to print.
pub async fn status(settings: &Settings) -> Result<String> {
    let heading = match settings.health_addr {
        None => "HEALTH_ADDR is off. From the databases:\n".to_string(),
        Some(addr) => {
            let answer = http::request(
                addr,
                http::Method::GET,
                "/status",
                settings.health_token.as_ref(),
            )
            .await;
            match answer {
                Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                    Ok(document) => return Ok(from_daemon(&document, &addr.to_string())),
                    Err(_) => format!("The daemon at {addr} sent no status. From the databases:\n"),
                },
                Ok((401, _)) => format!(
                    "The daemon at {addr} wants a token: set HEALTH_TOKEN to its token. From the databases:\n"
                ),
                Ok((code, _)) => {
                    tracing::debug!(code, "unexpected answer from /status");
                    format!("The daemon at {addr} answered HTTP {code}. From the databases:\n")
                }
                Err(error) => {
                    tracing::debug!(%error, "no daemon answers");
                    format!("No rowsync daemon answers at {addr}. From the databases:\n")
                }
            }
        }
    };
    Ok(heading + &from_databases(settings).await?)
}

fn from_daemon(doc: &Value, addr: &str) -> String {
    let text = |v: &Value| match v {
        Value::Null => "n/a".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let health = &doc["healthStatus"];
    let mut out = format!(
        "rowsync {} at {addr}: {}, {}\n",
        text(&doc["version"]),
        text(&doc["role"]),
        text(&health["status"]),
    );
    let _ = writeln!(
        out,
        "  up since {}; real-time {}; lag {} s; {} sweeps, {} batches; {} errors ({} in a row)",
        text(&doc["startedAt"]),
        if doc["isRealTimeActive"] == Value::Bool(true) {
            "listening"
        } else {
            "not listening"
        },
        doc["lagSeconds"]
            .as_f64()
            .map_or("n/a".into(), |lag| format!("{lag:.3}")),
        text(&doc["sweeps"]),
        text(&doc["batches"]),
        text(&doc["errors"]),
        text(&doc["consecutiveFailures"]),
    );
    let _ = writeln!(
        out,
        "  last sweep {} ({} ms){}; total synced {}",
        text(&doc["lastSyncTime"]),
        text(&doc["lastSyncDuration"]),
        if doc["isSyncInProgress"] == Value::Bool(true) {
            ", a sweep is running"
        } else {
            ""
        },
        text(&doc["totalSynced"]),
    );
    if let Some(since) = doc["yielding"]["since"].as_str() {
        let _ = writeln!(
            out,
            "  yielding to a busy source since {since} ({} active sessions); changes wait in the journal",
            text(&doc["yielding"]["sourceActiveSessions"]),
        );
    }
    if let Some(tables) = doc["tables"].as_object() {
        for (name, t) in tables {
            let _ = writeln!(
                out,
                "  {name}: {} created, {} updated, {} deleted, {} unchanged, {} failed; {} pending; {} waiting for retry",
                text(&t["created"]),
                text(&t["updated"]),
                text(&t["deleted"]),
                text(&t["unchanged"]),
                text(&t["failed"]),
                text(&t["pending"]),
                text(&t["unresolved"]),
            );
        }
    }
    if let Some(checks) = health["checks"].as_object() {
        for (name, check) in checks {
            if check["ok"] == Value::Bool(false) {
                let _ = writeln!(out, "  ✗ {name}: {}", text(&check["message"]));
            }
        }
    }
    if let Some(advice) = health["recommendations"].as_array() {
        for line in advice {
            let _ = writeln!(out, "  → {}", text(line));
        }
    }
    out
}

async fn from_databases(settings: &Settings) -> Result<String> {
    let pools = Pools::new(settings)?;
    let result = async {
        let source = pools.source().await?;
        let target = pools.target().await?;
        let mut out = String::new();
        for table in &settings.tables {
            let mapping = load_mapping(&**source, &**target, table).await?;
            let name = mapping.name();
            let progress = target
                .query_opt(
                    "SELECT copied_at::text, updated_at::text, \
                            round(extract(epoch FROM now() - updated_at))::int8 \
                       FROM rowsync_progress WHERE table_name = $1",
                    &[&name],
                )
                .await
                .context(DatabaseRole::Target, || "reading rowsync_progress".into())?;
            let Some(progress) = progress else {
                let _ = writeln!(out, "  {name}: not set up (run `rowsync setup`)");
                continue;
            };
            let pending = match &mapping.journal {
                Some(journal) => capture::journal_depth(&**source, journal).await?.to_string(),
                None => "n/a".into(),
            };
            let unresolved: i64 = target
                .query_one(
                    "SELECT count(*) FROM sync_errors WHERE NOT resolved AND table_name = $1",
                    &[&name],
                )
                .await
                .context(DatabaseRole::Target, || "reading sync_errors".into())?
                .get(0);
            let triggers = capture::trigger_problems(&**source, &mapping.source).await?;
            let _ = writeln!(
                out,
                "  {name}: copied {}; progress last moved {} ({} s ago); {pending} journaled changes pending; \
                 {unresolved} unresolved sync_errors; capture {}",
                progress.get::<_, Option<String>>(0).unwrap_or_else(|| "never".into()),
                progress.get::<_, String>(1),
                progress.get::<_, Option<i64>>(2).unwrap_or(0),
                if triggers.is_empty() { "in place".to_string() } else { triggers.join(", ") },
            );
        }
        let last = target
            .query_opt(
                "SELECT kind, status, started_at::text, coalesce(finished_at::text, '-'), \
                        created, updated, deleted, failed, coalesce(error, '') \
                   FROM sync_runs ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .context(DatabaseRole::Target, || "reading sync_runs".into())?;
        if let Some(run) = last {
            let _ = writeln!(
                out,
                "  last run: {} {} (started {}, finished {}): {} created, {} updated, {} deleted, {} failed {}",
                run.get::<_, String>(0),
                run.get::<_, String>(1),
                run.get::<_, String>(2),
                run.get::<_, String>(3),
                run.get::<_, i64>(4),
                run.get::<_, i64>(5),
                run.get::<_, i64>(6),
                run.get::<_, i64>(7),
                run.get::<_, String>(8),
            );
        }
        Ok(out)
    }
    .await;
    pools.close();
    result
}
