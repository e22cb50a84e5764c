//! High availability: one active rowsync per set of tables; any other copy is a hot standby.
//!
//! The active process holds a session-level advisory lock on the target database, keyed by the
//! synced tables, on a dedicated session (`application_name` `rowsync-leader`). Standbys try to
//! take the lock every second. When the active process dies its session closes and the server
//! releases the lock at once; a standby takes over within about a second. A process whose lock
//! session breaks (or stops answering) stops applying immediately and becomes a standby itself.
//! The lock session asks the server for tight TCP keepalives, so a client that vanished without a
//! reset is noticed by the server (and its lock released) within about 15 seconds. When the path
//! still acknowledges packets but never delivers them, the server cannot notice; then the process
//! that gave up on its session ends it itself once it can reach the server again.
//!
//! The lock is what keeps a second process idle; it is not what keeps data correct. Every batch
//! moves the table's progress row under `FOR UPDATE` with compare-and-set, so even two processes
//! applying at once could never apply a batch twice or out of order.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{DatabaseRole, Settings};
use crate::connection::{Connector, SessionLimits, Within, session_config, with_server_keepalives};
use crate::error::{Error, Result};
use crate::ops::telemetry::{Role, Telemetry};
use crate::runtime::retry::{Attempts, pause, until_ok};

/// `application_name` of the leader-lock session.
pub(crate) const APP_LEADER: &str = "rowsync-leader";

/// How often a standby tries the lock, and the leader checks its lock session.
const POLL: Duration = Duration::from_secs(1);

/// Held while this process is the active instance. Dropping it releases the lock.
pub(crate) struct Leadership {
    _client: std::sync::Arc<Client>,
    lost: CancellationToken,
    watcher: tokio::task::JoinHandle<()>,
    session: Backend,
}

/// A server session: its pid and start time (together they never name another session).
#[derive(Debug, Clone)]
pub(crate) struct Backend {
    pid: i32,
    started: String,
}

impl Leadership {
    /// Cancelled when the lock session breaks: stop applying at once.
    pub(crate) fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// The lock session, to end it should it outlive this process's interest in it.
    pub(crate) fn session(&self) -> Backend {
        self.session.clone()
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// The lock key's second half: the synced tables, sorted (the first half is constant).
fn lock_scope(settings: &Settings) -> String {
    let mut tables: Vec<String> = settings.tables.iter().map(ToString::to_string).collect();
    tables.sort();
    tables.join(",")
}

/// Waits until this process holds the leader lock (standing by meanwhile). None on shutdown.
///
/// `abandoned` is this process's previous lock session, given up on after it stopped answering.
/// The server may still keep it (and the lock) alive, waiting on a dead path; if it still holds
/// the lock, it is ended so that this process, or another, can take over.
pub(crate) async fn acquire(
    settings: &Settings,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
    mut abandoned: Option<Backend>,
) -> Result<Option<Leadership>> {
    let limits = SessionLimits::from_settings(settings);
    let config = with_server_keepalives(session_config(&settings.target, limits, APP_LEADER));
    let connector = Connector::new(&settings.target);
    let scope = lock_scope(settings);
    let mut said_standby = false;
    loop {
        let session = until_ok(
            &settings.retry,
            Attempts::Unlimited,
            shutdown,
            || open_lock_session(&connector, &config, limits),
            |error, _, delay| {
                warn!(error = %crate::error::chain(error), retry_in_ms = delay.as_millis() as u64, "cannot reach the target for the leader lock");
            },
        )
        .await?;
        let Some(session) = session else {
            return Ok(None);
        };
        loop {
            telemetry.beat();
            let locked = session
                .client
                .query_one(
                    "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext('rowsync'), pg_catalog.hashtext($1))",
                    &[&scope],
                )
                .within(limits.client_timeout(), DatabaseRole::Target, || {
                    "taking the leader lock".into()
                })
                .await;
            match locked {
                Ok(row) if row.get::<_, bool>(0) => {
                    info!(tables = %scope, "holding the leader lock: this is the active instance");
                    return Ok(Some(session.lead(limits)));
                }
                Ok(_) if abandoned.is_some() => {
                    if let Some(old) = abandoned.take() {
                        end_abandoned_lock_session(&session.client, &old).await;
                    }
                }
                Ok(_) => {
                    if !said_standby {
                        info!(tables = %scope, "another rowsync holds the leader lock; standing by to take over");
                        said_standby = true;
                    }
                    telemetry.set_role(Role::Standby);
                    if !pause(POLL, shutdown).await {
                        return Ok(None);
                    }
                }
                Err(err) => {
                    warn!(error = %crate::error::chain(&err), "the leader lock session failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// A connected lock session, not yet holding the lock. Dropping it closes it.
struct LockSession {
    client: Client,
    driver: Driver,
    backend: Backend,
}

/// The task driving a session's connection, aborted when dropped (unless handed on).
struct Driver(Option<tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>>);

impl Driver {
    fn hand_on(mut self) -> tokio::task::JoinHandle<Result<(), tokio_postgres::Error>> {
        self.0.take().expect("a driver is handed on once")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(driver) = &self.0 {
            driver.abort();
        }
    }
}

impl LockSession {
    /// This session holds the lock now: watch it.
    fn lead(self, limits: SessionLimits) -> Leadership {
        let lost = CancellationToken::new();
        let client = std::sync::Arc::new(self.client);
        let watcher = tokio::spawn(watch(
            ClientHandle(client.clone()),
            self.driver.hand_on(),
            lost.clone(),
            limits,
        ));
        Leadership {
            _client: client,
            lost,
            watcher,
            session: self.backend,
        }
    }
}

/// Connects the lock session and learns which server session it is.
async fn open_lock_session(
    connector: &Connector,
    config: &tokio_postgres::Config,
    limits: SessionLimits,
) -> Result<LockSession> {
    let limit = limits.client_timeout();
    let (client, connection) = connector
        .connect(config)
        .within(limit, DatabaseRole::Target, || {
            "connecting for the leader lock".into()
        })
        .await?;
    let driver = Driver(Some(tokio::spawn(connection)));
    let row = client
        .query_one(
            "SELECT pid, backend_start::text FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()",
            &[],
        )
        .within(limit, DatabaseRole::Target, || {
            "identifying the leader lock session".into()
        })
        .await;
    let row = row?;
    Ok(LockSession {
        client,
        driver,
        backend: Backend {
            pid: row.get(0),
            started: row.get(1),
        },
    })
}

/// Watches the lock session; cancels `lost` as soon as it breaks or stops answering.
async fn watch(
    client: ClientHandle,
    driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    lost: CancellationToken,
    limits: SessionLimits,
) {
    let mut driver = driver;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            // Cancel-safe: a JoinHandle can be polled again.
            _ = &mut driver => {
                warn!("the leader lock session closed; stepping down");
                lost.cancel();
                return;
            }
            _ = tick.tick() => {
                let ping = tokio::time::timeout(limits.client_timeout().min(Duration::from_secs(5)), client.ping()).await;
                if !matches!(ping, Ok(Ok(()))) {
                    warn!("the leader lock session does not answer; stepping down");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// Ends this process's own earlier lock session if it is still there (same pid, same start time).
async fn end_abandoned_lock_session(client: &Client, old: &Backend) {
    let ended = client
        .query_one(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
              WHERE pid = $1 AND backend_start::text = $2",
            &[&old.pid, &old.started],
        )
        .await;
    if let Ok(row) = ended
        && row.get::<_, i64>(0) > 0
    {
        warn!(
            pid = old.pid,
            "ended this process's abandoned leader-lock session, which still held the lock"
        );
    }
}

/// What the watcher needs of the client: a ping on the same session.
struct ClientHandle(std::sync::Arc<Client>);

impl ClientHandle {
    async fn ping(&self) -> Result<(), Error> {
        self.0
            .simple_query("")
            .await
            .map(|_| ())
            .map_err(|source| Error::Sql {
                role: DatabaseRole::Target,
                action: "pinging the leader lock session".into(),
                source,
            })
    }
}
