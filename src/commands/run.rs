//! `rowsync run`: the daemon, with its HTTP listener, systemd notifications, signal handling and a
//! bounded drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::TableSpec;
use crate::config::{Env, Settings};
use crate::connection::Pools;
use crate::error::{Error, Result};
use crate::ops::http;
use crate::ops::systemd::Notifier;
use crate::ops::telemetry::{Role, Telemetry, rfc3339};
use crate::runtime::daemon::{self, Context};
use crate::runtime::requests::SweepRequests;
use crate::runtime::shutdown;

/// Runs until SIGTERM or SIGINT, then lets the in-flight batch finish within
/// `SHUTDOWN_TIMEOUT_SECONDS` (after that it is abandoned and rolled back by the server).
pub async fn run(settings: Arc<Settings>) -> Result<()> {
    let reload = Arc::new(Notify::new());
    let token = shutdown::on_signals(reload.clone())?;
    let (tables_tx, tables) = watch::channel(settings.tables.clone());
    let reloader = tokio::spawn(reload_on_signal(reload, tables_tx, settings.clone()));
    let telemetry = Arc::new(Telemetry::new());
    let pools = Pools::new(&settings)?;
    // A mapping file that does not fit the databases stops the start (exit 2), before anything is
    // written; databases out of reach are waited for as ever (the tables are checked as they load).
    match crate::commands::setup::validate(&pools, &settings.tables).await {
        Ok(mappings) => {
            crate::commands::setup::warn_unconfigured(&pools, &mappings).await;
            crate::commands::setup::warn_outdated_capture(&pools).await;
        }
        Err(err @ Error::Config(_)) => {
            pools.close();
            return Err(err);
        }
        Err(err) => {
            warn!(error = %crate::error::chain(&err), "could not check the mappings against the databases yet; each table is checked as it loads");
        }
    }
    info!(
        source = %settings.source.display(),
        target = %settings.target.display(),
        tables = ?settings.tables.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "rowsync starting"
    );
    let context = Context {
        settings: settings.clone(),
        pools: pools.clone(),
        telemetry: telemetry.clone(),
        requests: Arc::new(SweepRequests::default()),
        tables,
    };
    let http = match settings.health_addr {
        Some(addr) => Some(http::serve(addr, context.clone()).await?),
        None => None,
    };
    let notifier = Arc::new(Notifier::from_env());
    let systemd = tokio::spawn(notify_systemd(
        notifier.clone(),
        telemetry.clone(),
        settings.clone(),
        token.clone(),
    ));

    let mut daemon = tokio::spawn(daemon::run(context, token.clone()));
    // Everything after a signal, HTTP connections included, must end by this deadline.
    let mut deadline = None;
    let result = tokio::select! {
        result = &mut daemon => result.map_err(Error::Task).and_then(|r| r),
        () = token.cancelled() => {
            notifier.stopping();
            let until = tokio::time::Instant::now() + settings.shutdown_timeout;
            deadline = Some(until);
            match tokio::time::timeout_at(until, &mut daemon).await {
                Ok(result) => result.map_err(Error::Task).and_then(|r| r),
                Err(_) => {
                    daemon.abort();
                    warn!(
                        timeout_ms = settings.shutdown_timeout.as_millis() as u64,
                        "in-flight work did not finish within SHUTDOWN_TIMEOUT_SECONDS; \
                         it is rolled back and will be redone at the next start"
                    );
                    Ok(())
                }
            }
        }
    };
    notifier.stopping();
    systemd.abort();
    reloader.abort();
    if let Some(http) = http {
        // Without a signal (the daemon failed), a moment for answers in flight.
        let grace = tokio::time::Instant::now() + Duration::from_secs(1);
        http.stop(deadline.unwrap_or(grace)).await;
    }
    pools.close();
    log_final(&telemetry);
    result
}

/// Tells systemd (when it started us with `Type=notify`) how things stand:
/// - `READY=1` once the start-up catch-up is done (or this process stands by);
/// - `EXTEND_TIMEOUT_USEC` while a long start-up catch-up makes progress;
/// - `STATUS=` with the last sweep's figures, the role and the lag;
/// - `WATCHDOG=1` only while the sync loop's heartbeat is fresh: a hung loop stops the pings and
///   systemd restarts the service.
async fn notify_systemd(
    notifier: Arc<Notifier>,
    telemetry: Arc<Telemetry>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) {
    if !notifier.enabled() {
        return;
    }
    let watchdog = notifier.watchdog_interval();
    // Fresh enough: one ping interval (half of WatchdogSec), so a loop that hangs stops the pings
    // soon and systemd restarts it within about 1.5 × WatchdogSec; a minute without a watchdog.
    let fresh = watchdog.unwrap_or(Duration::from_secs(60));
    let period = watchdog
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut ready = false;
    let mut last_status = String::new();
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let figures = telemetry.figures();
        let alive = telemetry.heartbeat_age() < fresh;
        if !ready {
            if figures.caught_up || figures.role == Role::Standby {
                notifier.ready();
                ready = true;
            } else if alive {
                // Still catching up, and making progress: keep systemd's start timeout away.
                notifier.extend_timeout(Duration::from_secs(60));
            }
        }
        if alive && watchdog.is_some() {
            notifier.watchdog();
        }
        let status = status_line(&figures, &settings);
        if status != last_status {
            notifier.status(&status);
            last_status = status;
        }
    }
}

/// One line for `systemctl status`.
pub(crate) fn status_line(figures: &crate::ops::telemetry::Figures, settings: &Settings) -> String {
    match figures.role {
        Role::Starting => "starting".to_string(),
        Role::Standby => "standby: another rowsync is active".to_string(),
        Role::Active => {
            let sweep = match &figures.last_sweep {
                Some(s) => format!(
                    "last sweep {}: {} created, {} updated, {} deleted, {} unchanged, {} failed in {} ms",
                    rfc3339(s.finished_at),
                    s.counts.created,
                    s.counts.updated,
                    s.counts.deleted,
                    s.counts.unchanged,
                    s.counts.failed,
                    s.duration.as_millis()
                ),
                None => "catching up".to_string(),
            };
            format!(
                "active; {sweep}; lag {}; real-time {}; every {} s",
                figures
                    .lag_seconds
                    .map_or("n/a".to_string(), |lag| format!("{lag:.2} s")),
                figures.listener.as_str(),
                settings.sync_interval.as_secs_f64()
            )
        }
    }
}

fn log_final(telemetry: &Telemetry) {
    let stats = telemetry.figures();
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

/// On each SIGHUP, reads the configuration again (the process environment, which cannot change,
/// and `.env` as it is now) and hands the sync loop the new table list: tables added are set up
/// while the others keep streaming, tables removed stop being applied. Other settings take effect
/// at the next start (said in the log when they differ). A configuration that does not parse is
/// rejected and the running one kept.
async fn reload_on_signal(
    reload: Arc<Notify>,
    tables: watch::Sender<Vec<TableSpec>>,
    running: Arc<Settings>,
) {
    loop {
        reload.notified().await;
        let read = Env::from_process().and_then(|env| Settings::from_env(&env));
        let new = match read {
            Ok(new) => new,
            Err(err) => {
                tracing::error!(error = %err, "the new configuration is rejected; the running one is kept");
                continue;
            }
        };
        if format!(
            "{:?}",
            Settings {
                tables: running.tables.clone(),
                ..new.clone()
            }
        ) != format!("{running:?}")
        {
            warn!(
                "the new configuration changes more than SYNC_TABLES: the other changes take effect at the next start"
            );
        }
        info!(
            tables = ?new.tables.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "configuration reloaded"
        );
        // Sent even when unchanged: tables whose setup failed are tried again.
        tables.send_replace(new.tables);
    }
}
