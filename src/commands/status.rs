//! `rowsync status`: a summary for a terminal, from the running daemon's `/status`, or from the
//! databases when no daemon answers.

use std::fmt::Write as _;

use crate::catalog::mapping::load_mapping;
use crate::config::{DatabaseRole, Settings};
use crate::connection::Pools;
use crate::error::{Result, SqlContext};
use crate::ops::http;
use crate::ops::status::StatusDocument;
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
                Ok((200, body)) => match serde_json::from_str::<StatusDocument>(&body) {
                    Ok(document) => return Ok(document.summary(&addr.to_string())),
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

async fn from_databases(settings: &Settings) -> Result<String> {
    let pools = Pools::new(settings)?;
    let result = async {
        let source = pools.source().await?;
        let target = pools.target().await?;
        let mut out = String::new();
        if let Some(warning) = capture::version_warning(&**source).await {
            let _ = writeln!(out, "  warning: {warning}");
        }
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
