//! The real-time path: one dedicated (never pooled) source session that LISTENs for the doorbell.
//!
//! A notification only says "something changed": the listener wakes the sync loop, which reads the
//! journal. Notifications sent while this session is down are lost, so every (re)connect wakes the
//! loop once more after LISTEN has taken effect, and the loop also polls on a timer. The listener is
//! a latency optimisation; correctness never depends on it.
//!
//! A dead session is noticed by the connection failing (reset, keepalive or `tcp_user_timeout`) or by
//! a periodic ping that does not answer in time (a black-holed server). Reconnects back off from
//! `RETRY_INITIAL_DELAY` to `RETRY_MAX_DELAY`; after `MAX_RECONNECT_ATTEMPTS` consecutive failures the
//! real-time path is reported down (log, state, `sync_errors`) and reconnects go on at the maximum
//! delay. It never gives up.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{DatabaseRole, Settings};
use crate::connection::{
    APP_LISTENER, Connector, IntoError, Pools, SessionConnection, SessionLimits, Within,
    session_config, with_server_keepalives,
};
use crate::error::policy::ErrorType;
use crate::error::{Error, Result};
use crate::ops::telemetry::Telemetry;
use crate::runtime::retry::{Retrying, pause};
use crate::target::sync_errors;

/// How often the listening session is pinged (half the statement timeout, 1 to 15 s), and how long a
/// ping may take (the client-side timeout, at most 10 s). With the defaults a silently dead session
/// is noticed within 25 s.
fn ping_timing(limits: &SessionLimits) -> (Duration, Duration) {
    (
        (limits.statement_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(15)),
        limits.client_timeout().min(Duration::from_secs(10)),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ListenerState {
    /// Not listening yet, or reconnecting after a failure.
    Connecting,
    Listening,
    /// `MAX_RECONNECT_ATTEMPTS` consecutive reconnects failed; still retrying at the maximum delay.
    Down,
}

impl ListenerState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Listening => "listening",
            Self::Down => "down",
        }
    }
}

/// Runs until `shutdown`. `wake` is notified on every doorbell and after every (re)connect.
pub(crate) async fn run(
    settings: Arc<Settings>,
    pools: Pools,
    wake: Arc<Notify>,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) {
    let limits = SessionLimits::from_settings(&settings);
    let config = with_server_keepalives(session_config(&settings.source, limits, APP_LISTENER));
    let connector = Connector::new(&settings.source);
    let timing = ping_timing(&limits);
    let mut retrying = Retrying::new(&settings.retry);
    loop {
        let outcome = listen(
            (&connector, &config),
            timing,
            &pools,
            &wake,
            &telemetry,
            &shutdown,
        )
        .await;
        let Err((listened, err)) = outcome else {
            telemetry.set_listener(ListenerState::Connecting);
            return;
        };
        if shutdown.is_cancelled() {
            telemetry.set_listener(ListenerState::Connecting);
            return;
        }
        telemetry.listener_failure();
        telemetry.recorded(ErrorType::RealtimeSyncConnectionError.as_str());
        if listened {
            retrying.succeeded();
        }
        let (failures, backoff) = retrying.failed();
        let delay = if failures >= settings.max_reconnect_attempts {
            if telemetry.listener() != ListenerState::Down {
                error!(
                    failures,
                    error = %crate::error::chain(&err),
                    "real-time path is down; sweeps and polling go on, reconnecting at the maximum delay"
                );
            }
            telemetry.set_listener(ListenerState::Down);
            settings.retry.max_delay
        } else {
            if telemetry.listener() != ListenerState::Down {
                telemetry.set_listener(ListenerState::Connecting);
            }
            backoff
        };
        warn!(
            failures,
            retry_in_ms = delay.as_millis() as u64,
            error = %crate::error::chain(&err),
            "listener connection failed"
        );
        record_failure(&pools, &err, failures).await;
        if !pause(delay, &shutdown).await {
            return;
        }
    }
}

/// A session that has issued LISTEN, and its notifications.
struct Listening {
    client: Client,
    driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    notifications: mpsc::UnboundedReceiver<()>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Connects and issues LISTEN, each step bounded by `limit`.
async fn connect_and_listen(
    connector: &Connector,
    config: &tokio_postgres::Config,
    limit: Duration,
) -> Result<Listening> {
    let (client, connection) = connector
        .connect(config)
        .within(limit * 2, DatabaseRole::Source, || {
            "connecting the listener".into()
        })
        .await?;
    let (notify, notifications) = mpsc::unbounded_channel();
    let listening = Listening {
        client,
        driver: tokio::spawn(drive(connection, notify)),
        notifications,
    };
    let listen = format!(
        "LISTEN {}",
        crate::catalog::ident::quote(super::capture::CHANNEL)
    );
    listening
        .client
        .batch_execute(&listen)
        .within(limit, DatabaseRole::Source, || "LISTEN".into())
        .await?;
    Ok(listening)
}

/// One session: connect, LISTEN, relay notifications until it fails. Returns Ok only on shutdown;
/// on failure, whether LISTEN had taken effect (so the failure count starts afresh).
async fn listen(
    (connector, config): (&Connector, &tokio_postgres::Config),
    (ping_interval, ping_timeout): (Duration, Duration),
    pools: &Pools,
    wake: &Notify,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<(), (bool, Error)> {
    let mut session = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Ok(()),
        listening = connect_and_listen(connector, config, ping_timeout) => listening.map_err(|err| (false, err))?,
    };
    info!("listening for changes");
    telemetry.set_listener(ListenerState::Listening);
    // Notifications sent while we were not listening are gone: catch up now.
    wake.notify_one();
    if let Ok(target) = pools.target().await {
        let _ = sync_errors::resolve_episode(
            &**target,
            &[ErrorType::RealtimeSyncConnectionError],
            None,
        )
        .within(ping_timeout, DatabaseRole::Target, || {
            "resolving listener failures".into()
        })
        .await;
    }
    let mut ping = tokio::time::interval(ping_interval);
    ping.tick().await;
    loop {
        tokio::select! {
            biased;
            // Cancel-safe: dropping the session is all there is to do.
            _ = shutdown.cancelled() => return Ok(()),
            // Cancel-safe: a JoinHandle can be polled again.
            ended = &mut session.driver => {
                let err = match ended {
                    Ok(Err(err)) => err.into_error(DatabaseRole::Source, || "listening".into()),
                    _ => Error::Timeout {
                        role: DatabaseRole::Source,
                        action: "listening (the session ended)".into(),
                    },
                };
                return Err((true, err));
            }
            // Cancel-safe: mpsc::Receiver::recv loses nothing when dropped.
            Some(()) = session.notifications.recv() => {
                while session.notifications.try_recv().is_ok() {}
                wake.notify_one();
            }
            // Cancel-safe: Interval::tick.
            _ = ping.tick() => {
                session
                    .client
                    .simple_query("")
                    .within(ping_timeout, DatabaseRole::Source, || "pinging the listener".into())
                    .await
                    .map_err(|err| (true, err))?;
            }
        }
    }
}

/// Drives the session and forwards notifications. Ends when the session does.
async fn drive(
    mut connection: SessionConnection,
    notifications: mpsc::UnboundedSender<()>,
) -> Result<(), tokio_postgres::Error> {
    loop {
        match poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => {
                let _ = notifications.send(());
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err),
            None => return Ok(()),
        }
    }
}

async fn record_failure(pools: &Pools, err: &Error, attempt: u32) {
    let failure = sync_errors::Failure {
        error_type: ErrorType::RealtimeSyncConnectionError,
        table: None,
        record_id: None,
        message: crate::error::chain(err),
        stack_trace: sync_errors::stack_trace(err),
        metadata: sync_errors::metadata(None, "listen", err.postgres(), attempt),
        retry_in: None,
    };
    let recorded = async {
        let target = pools.target().await?;
        sync_errors::record(&**target, &failure)
            .within(Duration::from_secs(10), DatabaseRole::Target, || {
                "recording a listener failure".into()
            })
            .await
    };
    if let Err(err) = recorded.await {
        warn!(error = %crate::error::chain(&err), "could not record a listener failure in sync_errors");
    }
}
