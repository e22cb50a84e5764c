//! `rowsync run`: the daemon, with signal handling and a bounded drain.

use std::sync::Arc;

use tracing::{info, warn};

use crate::config::Settings;
use crate::daemon::{self, Stats};
use crate::error::{Error, Result};
use crate::shutdown;

/// Runs until SIGTERM or SIGINT, then lets the in-flight batch finish within
/// `SHUTDOWN_TIMEOUT_SECONDS` (after that it is abandoned and rolled back by the server).
pub async fn run(settings: Arc<Settings>) -> Result<()> {
    let token = shutdown::on_signals()?;
    let stats = Arc::new(Stats::default());
    let final_stats = stats.clone();
    info!(
        source = %settings.source.display(),
        target = %settings.target.display(),
        tables = ?settings.tables.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "rowsync starting"
    );
    let mut daemon = tokio::spawn(daemon::run(settings.clone(), stats, token.clone()));
    let result = tokio::select! {
        result = &mut daemon => result,
        () = token.cancelled() => {
            match tokio::time::timeout(settings.shutdown_timeout, &mut daemon).await {
                Ok(result) => result,
                Err(_) => {
                    daemon.abort();
                    warn!(
                        timeout_ms = settings.shutdown_timeout.as_millis() as u64,
                        "in-flight work did not finish within SHUTDOWN_TIMEOUT_SECONDS; \
                         it is rolled back and will be redone at the next start"
                    );
                    log_final(&final_stats);
                    return Ok(());
                }
            }
        }
    };
    let result = result.map_err(Error::Task)?;
    log_final(&final_stats);
    result
}

fn log_final(stats: &Stats) {
    let stats = stats.snapshot();
    info!(
        batches = stats.batches,
        sweeps = stats.sweeps,
        created = stats.totals.created,
        updated = stats.totals.updated,
        deleted = stats.totals.deleted,
        unchanged = stats.totals.unchanged,
        failed = stats.totals.failed,
        errors = stats.errors,
        "rowsync stopped"
    );
}
