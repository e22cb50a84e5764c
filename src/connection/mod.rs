//! Connections to the source and target: pooled for queries and applies, dedicated for LISTEN and COPY.
//!
//! Every session rowsync opens carries an `application_name` (so operators can find it in
//! `pg_stat_activity`) and bounded waits: `statement_timeout`, `lock_timeout` and
//! `idle_in_transaction_session_timeout` as startup options, plus TCP keepalives and a user timeout so
//! a peer that vanished without a reset is noticed within about half a minute.
//!
//! JIT compilation is off for rowsync's sessions: its queries are short and many, and compiling
//! one costs tens of milliseconds, far more than it could save.
//!
//! None of that helps when the path to the server still acknowledges packets but the server never
//! answers (a hung proxy, a black-holed route): TCP looks healthy forever. So every call on the sync
//! path is also bounded on the client side ([`Within`]), at `statement_timeout` plus a margin, and
//! after such a timeout the idle pooled sessions are evicted ([`Pools::evict_idle`]) so that a hung
//! session is never handed out again.

use std::time::Duration;

pub(crate) mod tls;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{DatabaseRole, DatabaseSettings, Settings, SslMode};
use crate::error::{Error, Result};

/// `application_name` of pooled sessions.
pub(crate) const APP_POOL: &str = "rowsync";
/// `application_name` of the dedicated LISTEN session on the source.
pub(crate) const APP_LISTENER: &str = "rowsync-listener";
/// `application_name` of the initial copy's transactions (set for each of them).
pub(crate) const APP_COPY: &str = "rowsync-copy";

/// Bounds applied to every session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
}

impl SessionLimits {
    pub(crate) fn from_settings(settings: &Settings) -> Self {
        Self {
            statement_timeout: settings.statement_timeout,
            lock_timeout: settings.lock_timeout,
        }
    }

    /// How long the client waits for any one call before it gives the session up: the server's own
    /// statement_timeout fires first when the server is there to fire it.
    pub(crate) fn client_timeout(&self) -> Duration {
        self.statement_timeout
            + (self.statement_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// `idle_in_transaction_session_timeout`. A target transaction is idle only while one source
    /// call runs, so anything idle much longer is a session rowsync gave up on (its connection hung)
    /// and that would otherwise keep its locks. A source transaction stays idle while its batch is
    /// applied to the target, call after call, so it gets more room.
    pub(crate) fn idle_in_transaction_timeout(&self, role: DatabaseRole) -> Duration {
        match role {
            DatabaseRole::Target => (self.client_timeout() * 2).max(Duration::from_secs(10)),
            DatabaseRole::Source => (self.statement_timeout * 2).max(Duration::from_secs(60)),
        }
    }
}

/// `host:pid` of this process. Every session carries it as the setting `rowsync.instance`
/// (`SHOW rowsync.instance`), and `sync_runs` records it, so two rowsync processes can be told apart.
pub(crate) fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    // Startup options are space-separated: keep the value to safe characters.
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-._".contains(*c))
        .collect();
    let host = if host.is_empty() {
        "unknown-host".into()
    } else {
        host
    };
    format!("{host}:{}", std::process::id())
}

/// The connection configuration for one kind of session: the user's URL plus our name and limits.
pub(crate) fn session_config(
    db: &DatabaseSettings,
    limits: SessionLimits,
    application_name: &str,
) -> tokio_postgres::Config {
    let mut config = db.config.clone();
    config.application_name(application_name);
    // plan_cache_mode: rowsync's prepared statements are written to run well with generic plans
    // (see crate::pipeline::changes). Left to choose, PostgreSQL re-planned the change query on every batch
    // (its generic estimate counts the sweep's look-back, which stream batches skip), ~0.3 ms each.
    //
    // Values that travel as text are written by one server and read by the other: both sessions
    // use the same text forms (dates in ISO, intervals in PostgreSQL's style, floats exactly, XML
    // as content), whatever the servers' defaults. row_security=off: a source read that
    // row-level security would filter fails instead, so rows hidden from rowsync's role are never
    // mistaken for deleted ones (and the target's writes are never silently filtered either).
    // standard_conforming_strings=on: a mapping's filters and expressions were checked to be
    // self-contained by that rule (see crate::config::tables).
    let ours = format!(
        "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={} -c jit=off -c plan_cache_mode=force_generic_plan -c DateStyle=ISO,YMD -c IntervalStyle=postgres -c extra_float_digits=3 -c xmloption=content -c standard_conforming_strings=on -c row_security=off -c rowsync.instance={}",
        limits.statement_timeout.as_millis().max(1),
        limits.lock_timeout.as_millis().max(1),
        limits
            .idle_in_transaction_timeout(db.role)
            .as_millis()
            .max(1),
        instance(),
    );
    // On the target, TimeZone=UTC: a source `timestamp` (or `date`) written into a target
    // `timestamptz` is taken as UTC, as `verify` compares it, whatever the target's own zone.
    // (timestamptz values travel with their offset and are exact either way.)
    let ours = match db.role {
        DatabaseRole::Target => format!("{ours} -c TimeZone=UTC"),
        DatabaseRole::Source => ours,
    };
    let options = match config.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
        _ => ours,
    };
    config.options(options);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    config
}

/// Server-side TCP keepalives for long-lived sessions (the listener, the leader lock): a client
/// that vanished without a reset is noticed by the server within about 15 s, so its session (its
/// LISTEN, its advisory lock) does not linger for the kernel default of two hours.
pub(crate) fn with_server_keepalives(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    let options = format!(
        "{} -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3 -c tcp_user_timeout=10000",
        config.get_options().unwrap_or_default()
    );
    config.options(options.trim());
    config
}

/// The two connection pools.
#[derive(Clone)]
pub(crate) struct Pools {
    pub source: Pool,
    pub target: Pool,
    /// `user@host:port/db` of each, for errors.
    source_name: String,
    target_name: String,
}

impl Pools {
    pub(crate) fn new(settings: &Settings) -> Result<Self> {
        let limits = SessionLimits::from_settings(settings);
        Ok(Self {
            source: pool(&settings.source, limits)?,
            target: pool(&settings.target, limits)?,
            source_name: settings.source.display(),
            target_name: settings.target.display(),
        })
    }

    pub(crate) async fn source(&self) -> Result<Object> {
        checkout(&self.source, DatabaseRole::Source, &self.source_name).await
    }

    pub(crate) async fn target(&self) -> Result<Object> {
        checkout(&self.target, DatabaseRole::Target, &self.target_name).await
    }

    pub(crate) fn close(&self) {
        self.source.close();
        self.target.close();
    }

    /// Drops every idle session of both pools: after a timeout or a lost connection, none of them
    /// can be trusted, and new ones are cheap.
    pub(crate) fn evict_idle(&self) {
        self.source.retain(|_, _| false);
        self.target.retain(|_, _| false);
    }
}

/// Ends sessions of this process's kind that were given up on: pooled rowsync sessions of the same
/// user in this database, idle inside a transaction for longer than `older_than` (no live batch
/// leaves a target transaction idle that long). Such a zombie keeps its locks, the progress row's
/// among them, until the server notices it is gone. Returns how many were ended.
pub(crate) async fn end_abandoned_sessions(
    client: &impl tokio_postgres::GenericClient,
    role: DatabaseRole,
    older_than: Duration,
) -> Result<u64> {
    client
        .execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
              WHERE datname = current_database() AND usename = current_user \
                AND application_name = $1 AND pid <> pg_catalog.pg_backend_pid() \
                AND state IN ('idle in transaction', 'idle in transaction (aborted)') \
                AND state_change < now() - pg_catalog.make_interval(secs => $2::float8)",
            &[&APP_POOL, &older_than.as_secs_f64()],
        )
        .await
        .map_err(|source| Error::Sql {
            role,
            action: "ending abandoned sessions".into(),
            source,
        })
}

/// Bounds a call on the client side and names it: the one way rowsync waits for a server.
///
/// Works on driver calls (whose error becomes [`Error::Sql`] with `action` as context) and on
/// rowsync's own calls (whose errors pass through); running out of time is [`Error::Timeout`].
pub(crate) trait Within<T, E: IntoError>: Future<Output = Result<T, E>> + Sized {
    async fn within(
        self,
        limit: Duration,
        role: DatabaseRole,
        action: impl FnOnce() -> String,
    ) -> Result<T> {
        match tokio::time::timeout(limit, self).await {
            Ok(result) => result.map_err(|err| err.into_error(role, action)),
            Err(_) => Err(Error::Timeout {
                role,
                action: action(),
            }),
        }
    }
}

impl<T, E: IntoError, F: Future<Output = Result<T, E>>> Within<T, E> for F {}

/// An error a bounded call can end with.
pub(crate) trait IntoError {
    fn into_error(self, role: DatabaseRole, action: impl FnOnce() -> String) -> Error;
}

impl IntoError for tokio_postgres::Error {
    fn into_error(self, role: DatabaseRole, action: impl FnOnce() -> String) -> Error {
        Error::Sql {
            role,
            action: action(),
            source: self,
        }
    }
}

impl IntoError for Error {
    fn into_error(self, _: DatabaseRole, _: impl FnOnce() -> String) -> Error {
        self
    }
}

/// A session's connection, TLS or not, to drive.
pub(crate) type SessionConnection =
    Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Opens sessions to one database with its TLS settings, as libpq would: with `sslmode=allow`,
/// first without TLS and, if the server refuses that, with TLS.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: MakeRustlsConnect,
    allow: bool,
}

impl Connector {
    pub(crate) fn new(db: &DatabaseSettings) -> Self {
        Self {
            tls: MakeRustlsConnect::new((*db.tls).clone()),
            allow: db.ssl_mode == SslMode::Allow,
        }
    }

    /// Opens a session with `config` (one of [`session_config`]'s).
    pub(crate) async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(Client, SessionConnection), tokio_postgres::Error> {
        match config.connect(self.tls.clone()).await {
            // The server answered, and refused a session without TLS: try with it.
            Err(err) if self.allow && err.as_db_error().is_some() => {
                let mut with_tls = config.clone();
                with_tls.ssl_mode(tokio_postgres::config::SslMode::Require);
                with_tls.connect(self.tls.clone()).await
            }
            other => other,
        }
    }
}

impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>> {
        let config = config.clone();
        Box::pin(async move {
            let (client, connection) = Connector::connect(self, &config).await?;
            let driver = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "pooled connection closed with an error");
                }
            });
            Ok((client, driver))
        })
    }
}

fn pool(db: &DatabaseSettings, limits: SessionLimits) -> Result<Pool> {
    let manager = Manager::from_connect(
        session_config(db, limits, APP_POOL),
        Connector::new(db),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // connect_timeout only covers the TCP connect; a server that accepts and then never answers the
    // startup handshake is caught by the pool's create timeout, on the same bound as any call.
    let bound = limits.client_timeout().min(Duration::from_secs(15));
    Pool::builder(manager)
        .max_size(db.pool_size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(bound))
        .wait_timeout(Some(limits.client_timeout()))
        .recycle_timeout(Some(bound))
        .build()
        .map_err(|source| Error::PoolBuild {
            role: db.role,
            source,
        })
}

async fn checkout(pool: &Pool, role: DatabaseRole, database: &str) -> Result<Object> {
    pool.get().await.map_err(|source| Error::Pool {
        role,
        database: database.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    #[test]
    fn sessions_are_named_and_bounded_and_keep_user_options() {
        let settings = Settings::from_env(&Env::from_pairs([
            (
                "SOURCE_DATABASE_URL",
                "postgres://u:p@h/db?options=-c%20search_path%3Dapp",
            ),
            ("TARGET_DATABASE_URL", "postgres://u:p@h/db2"),
            ("STATEMENT_TIMEOUT_SECONDS", "12"),
        ]))
        .unwrap();
        let limits = SessionLimits::from_settings(&settings);
        let config = session_config(&settings.source, limits, APP_LISTENER);
        assert_eq!(config.get_application_name(), Some(APP_LISTENER));
        let options = config.get_options().unwrap();
        assert!(options.starts_with("-c search_path=app "), "{options}");
        assert!(options.contains("statement_timeout=12000"), "{options}");
        assert!(options.contains("lock_timeout=10000"), "{options}");
        assert!(
            options.contains("plan_cache_mode=force_generic_plan"),
            "{options}"
        );
        assert!(
            options.contains("idle_in_transaction_session_timeout=60000"),
            "{options}"
        );
        let target = session_config(&settings.target, limits, APP_POOL);
        let options = target.get_options().unwrap();
        // 12 s + 3 s client margin, twice.
        assert!(
            options.contains("idle_in_transaction_session_timeout=30000"),
            "{options}"
        );
        assert!(config.get_keepalives());
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(30))
        );
    }
}
