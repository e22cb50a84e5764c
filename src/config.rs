//! Configuration: raw environment strings in, validated [`Settings`] out.
//!
//! Every variable is parsed and checked before anything connects. A bad value is a [`ConfigError`]
//! naming the variable and the expected form; the binary prints it on one line and exits with status 2.
//! Nothing falls back to a default silently: a variable is either unset (or empty), and gets its
//! documented default, or it must be valid.
//!
//! Database URLs hold passwords, so they are never echoed: not in errors, not in `Debug` output
//! (`tokio_postgres::Config` redacts its password), not in logs ([`DatabaseSettings::display`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::ident::TableRef;

/// A snapshot of the environment variables rowsync reads, so parsing is a pure function (and testable).
#[derive(Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The process environment, after loading `.env` from the working directory if there is one.
    /// Variables already set in the environment win over `.env`.
    pub fn from_process() -> Result<Self, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(err) if err.not_found() => {}
            Err(err) => {
                return Err(ConfigError::new(
                    ".env",
                    format!("could not be read: {}", describe_dotenv_error(&err)),
                ));
            }
        }
        Ok(Self {
            vars: std::env::vars().collect(),
        })
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value of `name`, treating an empty value as unset.
    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    }
}

/// `.env` parse errors quote the offending line, which may hold a password: report only where it is.
fn describe_dotenv_error(err: &dotenvy::Error) -> String {
    match err {
        dotenvy::Error::LineParse(_, index) => format!("syntax error at character {index}"),
        dotenvy::Error::Io(io) => io.to_string(),
        _ => "invalid file".to_string(),
    }
}

/// A configuration problem: which variable, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl ConfigError {
    fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            problem: problem.into(),
        }
    }
}

/// Everything `setup`, `run` and `verify` need, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: DatabaseSettings,
    pub target: DatabaseSettings,
    pub tables: Vec<TableRef>,
    /// Time between the end of one sweep and the start of the next.
    pub sync_interval: Duration,
    /// How far back a sweep looks: `SYNC_WINDOW_MULTIPLIER` × `sync_interval`.
    pub sweep_lookback: Duration,
    pub retry: RetrySettings,
    pub max_reconnect_attempts: u32,
    pub shutdown_timeout: Duration,
    /// How often an idle daemon polls the journal besides waiting for a notification.
    pub poll_interval: Duration,
    /// Rows per apply statement (and per read from the source).
    pub batch_size: usize,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// When sweeps re-read rows updated within the lookback window.
    pub lookback: LookbackMode,
    /// Where `/health`, `/status`, `/metrics` and `POST /sync` are served (None: `off`).
    pub health_addr: Option<SocketAddr>,
    /// How long `sync_runs` keeps history.
    pub sync_runs_retention: Duration,
    /// When rowsync defers its work while the source is busy (see [`crate::yielding`]).
    pub yielding: YieldSettings,
}

/// Deferring work to a busy source: a burst of writes is applied once it is over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YieldSettings {
    /// The source counts as busy from this many active sessions (other than rowsync's) on;
    /// 0 never yields.
    pub active_sessions: u32,
    /// The longest rowsync defers its work in one go, however busy the source stays.
    pub max: Duration,
}

/// When a sweep re-reads the source rows whose `updated_at` falls within the lookback window.
///
/// The journal captures every change, so the re-read only matters for changes that bypassed the
/// capture triggers (`ALTER TABLE … DISABLE TRIGGER`, `pg_restore --disable-triggers`) or that a
/// logical-replication apply worker made (it fires no statement triggers). Re-reading every
/// recently updated row each minute is costly on a busy table, so by default rowsync does it only
/// when capture may have been bypassed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookbackMode {
    /// At the first sweep after start, whenever a capture trigger was disabled, dropped or altered
    /// since the previous sweep, and always for a table that is a logical-replication subscriber.
    Auto,
    /// Every sweep (what the Node service did).
    Always,
    /// Never: the journal only.
    Never,
}

/// Default of `HEALTH_ADDR`: loopback only, a fixed port.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9393";

/// One database: its connection settings (password inside, redacted in `Debug`) and pool size.
#[derive(Clone)]
pub struct DatabaseSettings {
    pub role: DatabaseRole,
    pub config: tokio_postgres::Config,
    pub pool_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseRole {
    Source,
    Target,
}

impl fmt::Display for DatabaseRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Source => "source",
            Self::Target => "target",
        })
    }
}

impl DatabaseSettings {
    /// `user@host:port/dbname`, safe for logs and reports (never the password).
    pub fn display(&self) -> String {
        describe_pg_config(&self.config)
    }
}

/// `user@host:port/dbname` for a connection configuration, without its password.
pub fn describe_pg_config(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "?".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("?");
    let dbname = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{dbname}")
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("role", &self.role)
            .field("database", &self.display())
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    /// Attempts after the first one.
    pub max_retries: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub multiplier: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// One of error, warn, info, debug, trace.
    pub level: String,
    pub format: LogFormat,
}

impl LogSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let level = match env.get("LOG_LEVEL") {
            None => "info".to_string(),
            Some(level) => {
                let level = level.to_ascii_lowercase();
                if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                    return Err(ConfigError::new(
                        "LOG_LEVEL",
                        format!("expected one of error, warn, info, debug, trace, got {level:?}"),
                    ));
                }
                level
            }
        };
        let format = match env
            .get("LOG_FORMAT")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("expected text or json, got {other:?}"),
                ));
            }
        };
        Ok(Self { level, format })
    }
}

impl Settings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let source_pool = positive_int(env, "SOURCE_DB_POOL_SIZE", 10)?;
        let target_pool = target_pool_size(env)?;
        let source = database(
            env,
            "SOURCE_DATABASE_URL",
            DatabaseRole::Source,
            source_pool,
        )?;
        let target = database(
            env,
            "TARGET_DATABASE_URL",
            DatabaseRole::Target,
            target_pool,
        )?;

        let tables = tables(env)?;

        let interval_minutes = positive_decimal(
            env,
            "SYNC_INTERVAL_MINUTES",
            1.0,
            "a positive number of minutes such as 1 or 0.05 (3 s)",
        )?;
        let sync_interval = Duration::from_secs_f64(interval_minutes * 60.0);
        if sync_interval < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "SYNC_INTERVAL_MINUTES",
                "must be at least 0.002 (about 100 ms)",
            ));
        }
        let multiplier = positive_decimal(
            env,
            "SYNC_WINDOW_MULTIPLIER",
            3.0,
            "a number of intervals of at least 1, such as 3",
        )?;
        if multiplier < 1.0 {
            return Err(ConfigError::new(
                "SYNC_WINDOW_MULTIPLIER",
                "expected a number of intervals of at least 1, such as 3",
            ));
        }

        let retry = RetrySettings {
            max_retries: int(
                env,
                "MAX_RETRIES",
                3,
                "a whole number of retries, 0 or more",
            )?,
            initial_delay: Duration::from_millis(positive_int(env, "RETRY_INITIAL_DELAY", 1000)?),
            max_delay: Duration::from_millis(positive_int(env, "RETRY_MAX_DELAY", 30_000)?),
            multiplier: positive_decimal(
                env,
                "RETRY_BACKOFF_MULTIPLIER",
                2.0,
                "a factor of at least 1, such as 2",
            )?,
        };
        if retry.multiplier < 1.0 {
            return Err(ConfigError::new(
                "RETRY_BACKOFF_MULTIPLIER",
                "expected a factor of at least 1, such as 2",
            ));
        }
        if retry.max_delay < retry.initial_delay {
            return Err(ConfigError::new(
                "RETRY_MAX_DELAY",
                format!(
                    "must be at least RETRY_INITIAL_DELAY ({} ms)",
                    retry.initial_delay.as_millis()
                ),
            ));
        }

        Ok(Self {
            source,
            target,
            tables,
            sync_interval,
            sweep_lookback: sync_interval.mul_f64(multiplier),
            retry,
            max_reconnect_attempts: positive_int(env, "MAX_RECONNECT_ATTEMPTS", 10)?,
            shutdown_timeout: Duration::from_secs_f64(positive_decimal(
                env,
                "SHUTDOWN_TIMEOUT_SECONDS",
                30.0,
                "a positive number of seconds such as 30",
            )?),
            poll_interval: Duration::from_millis(positive_int(env, "POLL_INTERVAL_MS", 500)?),
            batch_size: positive_int(env, "BATCH_SIZE", 5000)?,
            statement_timeout: Duration::from_secs_f64(positive_decimal(
                env,
                "STATEMENT_TIMEOUT_SECONDS",
                30.0,
                "a positive number of seconds such as 30",
            )?),
            lock_timeout: Duration::from_secs_f64(positive_decimal(
                env,
                "LOCK_TIMEOUT_SECONDS",
                10.0,
                "a positive number of seconds such as 10",
            )?),
            lookback: match env
                .get("SYNC_LOOKBACK")
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                None | Some("auto") => LookbackMode::Auto,
                Some("always") => LookbackMode::Always,
                Some("never") => LookbackMode::Never,
                Some(other) => {
                    return Err(ConfigError::new(
                        "SYNC_LOOKBACK",
                        format!("expected auto, always or never, got {other:?}"),
                    ));
                }
            },
            health_addr: health_addr(env)?,
            sync_runs_retention: Duration::from_secs_f64(
                positive_decimal(
                    env,
                    "SYNC_RUNS_RETENTION_DAYS",
                    30.0,
                    "a positive number of days such as 30",
                )? * 86_400.0,
            ),
            yielding: YieldSettings {
                active_sessions: int(
                    env,
                    "YIELD_ACTIVE_SESSIONS",
                    8,
                    "a whole number of sessions, 0 (never yield) or more",
                )?,
                max: Duration::from_secs_f64(positive_decimal(
                    env,
                    "YIELD_MAX_SECONDS",
                    30.0,
                    "a positive number of seconds such as 30",
                )?),
            },
        })
    }
}

/// `HEALTH_ADDR`: `host:port` (an IP address), or `off`.
pub fn health_addr(env: &Env) -> Result<Option<SocketAddr>, ConfigError> {
    let text = env.get("HEALTH_ADDR").unwrap_or(DEFAULT_HEALTH_ADDR);
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        ConfigError::new(
            "HEALTH_ADDR",
            format!(
                "expected an address such as 127.0.0.1:9393 or [::1]:9393, or off; got {text:?}"
            ),
        )
    })
}

fn database(
    env: &Env,
    variable: &'static str,
    role: DatabaseRole,
    pool_size: usize,
) -> Result<DatabaseSettings, ConfigError> {
    const EXPECTED: &str = "expected a libpq URL such as postgres://user:password@host:5432/dbname";
    let text = env
        .get(variable)
        .ok_or_else(|| ConfigError::new(variable, format!("is required; {EXPECTED}")))?;
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            variable,
            format!("{EXPECTED} (it must start with postgres:// or postgresql://)"),
        ));
    }
    // The parser's messages can quote parts of the URL, so only say that it failed.
    let config = tokio_postgres::Config::from_str(text)
        .map_err(|_| ConfigError::new(variable, format!("{EXPECTED} (it could not be parsed)")))?;
    if config.get_hosts().is_empty() {
        return Err(ConfigError::new(
            variable,
            format!("{EXPECTED} (it names no host)"),
        ));
    }
    if config.get_user().is_none() {
        return Err(ConfigError::new(
            variable,
            format!("{EXPECTED} (it names no user)"),
        ));
    }
    Ok(DatabaseSettings {
        role,
        config,
        pool_size,
    })
}

/// `CHAT_DB_POOL_SIZE` is the seed's name; `TARGET_DB_POOL_SIZE` is accepted as an alias.
fn target_pool_size(env: &Env) -> Result<usize, ConfigError> {
    let chat = env
        .get("CHAT_DB_POOL_SIZE")
        .map(|_| positive_int(env, "CHAT_DB_POOL_SIZE", 10))
        .transpose()?;
    let target = env
        .get("TARGET_DB_POOL_SIZE")
        .map(|_| positive_int(env, "TARGET_DB_POOL_SIZE", 10))
        .transpose()?;
    match (chat, target) {
        (Some(chat), Some(target)) if chat != target => Err(ConfigError::new(
            "TARGET_DB_POOL_SIZE",
            format!(
                "is an alias of CHAT_DB_POOL_SIZE; set one, or both to the same value (got {target} and {chat})"
            ),
        )),
        (Some(size), _) | (None, Some(size)) => Ok(size),
        (None, None) => Ok(10),
    }
}

fn tables(env: &Env) -> Result<Vec<TableRef>, ConfigError> {
    let text = env.get("SYNC_TABLES").unwrap_or("users");
    let mut tables: Vec<TableRef> = Vec::new();
    for entry in text.split(',') {
        let table = TableRef::parse(entry).map_err(|problem| {
            ConfigError::new(
                "SYNC_TABLES",
                format!(
                    "expected a comma-separated list of table or schema.table names; {:?}: {problem}",
                    entry.trim()
                ),
            )
        })?;
        if tables.contains(&table) {
            return Err(ConfigError::new(
                "SYNC_TABLES",
                format!("lists {table} twice"),
            ));
        }
        tables.push(table);
    }
    Ok(tables)
}

fn int<T: FromStr>(
    env: &Env,
    variable: &'static str,
    default: T,
    expected: &str,
) -> Result<T, ConfigError> {
    match env.get(variable) {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| ConfigError::new(variable, format!("expected {expected}, got {text:?}"))),
    }
}

fn positive_int<T: FromStr + PartialOrd + Default>(
    env: &Env,
    variable: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    let value = int(env, variable, default, "a whole number greater than 0")?;
    if value <= T::default() {
        return Err(ConfigError::new(
            variable,
            "expected a whole number greater than 0",
        ));
    }
    Ok(value)
}

fn positive_decimal(
    env: &Env,
    variable: &'static str,
    default: f64,
    expected: &str,
) -> Result<f64, ConfigError> {
    match env.get(variable) {
        None => Ok(default),
        Some(text) => match text.parse::<f64>() {
            // Bounded above so Duration arithmetic can never overflow (about 11 years).
            Ok(value) if value.is_finite() && value > 0.0 && value < 1.0e8 => Ok(value),
            _ => Err(ConfigError::new(
                variable,
                format!("expected {expected}, got {text:?}"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "postgres://backend:s3cret-source@db1.example:5433/myusta_backend";
    const TARGET: &str = "postgresql://chat:s3cret-target@db2.example/myusta_chatapp";

    fn env(extra: &[(&str, &str)]) -> Env {
        let mut pairs = vec![
            ("SOURCE_DATABASE_URL", SOURCE),
            ("TARGET_DATABASE_URL", TARGET),
        ];
        pairs.extend_from_slice(extra);
        Env::from_pairs(pairs)
    }

    fn error_for(extra: &[(&str, &str)]) -> ConfigError {
        Settings::from_env(&env(extra)).expect_err("settings should be rejected")
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let settings = Settings::from_env(&env(&[])).unwrap();
        assert_eq!(settings.tables, vec![TableRef::parse("users").unwrap()]);
        assert_eq!(settings.sync_interval, Duration::from_secs(60));
        assert_eq!(settings.sweep_lookback, Duration::from_secs(180));
        assert_eq!(settings.source.pool_size, 10);
        assert_eq!(settings.target.pool_size, 10);
        assert_eq!(
            settings.retry,
            RetrySettings {
                max_retries: 3,
                initial_delay: Duration::from_millis(1000),
                max_delay: Duration::from_millis(30_000),
                multiplier: 2.0,
            }
        );
        assert_eq!(settings.max_reconnect_attempts, 10);
        assert_eq!(settings.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(
            settings.health_addr,
            Some("127.0.0.1:9393".parse().unwrap())
        );
        assert_eq!(
            settings.sync_runs_retention,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(settings.lookback, LookbackMode::Auto);
        assert_eq!(
            settings.yielding,
            YieldSettings {
                active_sessions: 8,
                max: Duration::from_secs(30)
            }
        );
        let off = Settings::from_env(&env(&[("HEALTH_ADDR", "OFF")])).unwrap();
        assert_eq!(off.health_addr, None);
        assert_eq!(
            settings.source.display(),
            "backend@db1.example:5433/myusta_backend"
        );
        assert_eq!(
            settings.target.display(),
            "chat@db2.example:5432/myusta_chatapp"
        );
    }

    #[test]
    fn decimal_interval_and_multiplier_give_the_lookback() {
        let settings = Settings::from_env(&env(&[
            ("SYNC_INTERVAL_MINUTES", "0.05"),
            ("SYNC_WINDOW_MULTIPLIER", "2.5"),
        ]))
        .unwrap();
        assert_eq!(settings.sync_interval, Duration::from_secs(3));
        assert_eq!(settings.sweep_lookback, Duration::from_millis(7500));
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases = [
            ("SYNC_INTERVAL_MINUTES", "abc"),
            ("SYNC_INTERVAL_MINUTES", "-1"),
            ("SYNC_INTERVAL_MINUTES", "0"),
            ("SYNC_WINDOW_MULTIPLIER", "0.5"),
            ("SOURCE_DB_POOL_SIZE", "0"),
            ("CHAT_DB_POOL_SIZE", "ten"),
            ("TARGET_DB_POOL_SIZE", "-3"),
            ("MAX_RETRIES", "-1"),
            ("RETRY_INITIAL_DELAY", "1.5"),
            ("RETRY_BACKOFF_MULTIPLIER", "0.5"),
            ("MAX_RECONNECT_ATTEMPTS", "0"),
            ("SHUTDOWN_TIMEOUT_SECONDS", "forever"),
            ("SYNC_TABLES", "users,,orders"),
            ("SYNC_TABLES", "a.b.c"),
            ("POLL_INTERVAL_MS", "0"),
            ("BATCH_SIZE", "x"),
            ("HEALTH_ADDR", "localhost"),
            ("HEALTH_ADDR", "9393"),
            ("SYNC_RUNS_RETENTION_DAYS", "0"),
            ("SYNC_LOOKBACK", "sometimes"),
            ("YIELD_ACTIVE_SESSIONS", "-1"),
            ("YIELD_MAX_SECONDS", "0"),
        ];
        for (variable, value) in cases {
            let err = error_for(&[(variable, value)]);
            assert_eq!(err.variable, variable, "{variable}={value:?} gave {err}");
            assert!(err.to_string().starts_with(variable), "{err}");
        }
    }

    #[test]
    fn max_delay_below_initial_delay_is_rejected() {
        let err = error_for(&[("RETRY_INITIAL_DELAY", "5000"), ("RETRY_MAX_DELAY", "1000")]);
        assert_eq!(err.variable, "RETRY_MAX_DELAY");
    }

    #[test]
    fn missing_urls_are_required() {
        let err =
            Settings::from_env(&Env::from_pairs([("TARGET_DATABASE_URL", TARGET)])).unwrap_err();
        assert_eq!(err.variable, "SOURCE_DATABASE_URL");
        let err =
            Settings::from_env(&Env::from_pairs([("SOURCE_DATABASE_URL", SOURCE)])).unwrap_err();
        assert_eq!(err.variable, "TARGET_DATABASE_URL");
    }

    #[test]
    fn url_errors_never_echo_the_password() {
        for bad in [
            "mysql://root:hunter2-secret@host/db",
            "postgres://root:hunter2-secret@host:notaport/db",
            "postgres://root:hunter2-secret@host/db?sslmode=sometimes",
            "postgres://:hunter2-secret@/db",
        ] {
            let err = error_for(&[("SOURCE_DATABASE_URL", bad)]);
            assert_eq!(err.variable, "SOURCE_DATABASE_URL");
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("hunter2"), "password leaked: {shown}");
        }
    }

    #[test]
    fn debug_output_never_contains_the_password() {
        let settings = Settings::from_env(&env(&[])).unwrap();
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret"), "password leaked: {shown}");
    }

    #[test]
    fn target_pool_alias_is_accepted_and_conflicts_are_rejected() {
        let settings = Settings::from_env(&env(&[("TARGET_DB_POOL_SIZE", "4")])).unwrap();
        assert_eq!(settings.target.pool_size, 4);
        let settings = Settings::from_env(&env(&[("CHAT_DB_POOL_SIZE", "6")])).unwrap();
        assert_eq!(settings.target.pool_size, 6);
        let err = error_for(&[("CHAT_DB_POOL_SIZE", "6"), ("TARGET_DB_POOL_SIZE", "4")]);
        assert_eq!(err.variable, "TARGET_DB_POOL_SIZE");
    }

    #[test]
    fn empty_values_mean_unset() {
        let settings =
            Settings::from_env(&env(&[("SYNC_TABLES", ""), ("MAX_RETRIES", " ")])).unwrap();
        assert_eq!(settings.tables.len(), 1);
        assert_eq!(settings.retry.max_retries, 3);
    }

    #[test]
    fn sync_tables_keeps_order_and_rejects_duplicates() {
        let settings =
            Settings::from_env(&env(&[("SYNC_TABLES", "users, app.Orders,\"Mixed\"")])).unwrap();
        let names: Vec<String> = settings.tables.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["users", "app.orders", "Mixed"]);
        let err = error_for(&[("SYNC_TABLES", "users,USERS")]);
        assert_eq!(err.variable, "SYNC_TABLES");
    }

    #[test]
    fn log_settings_validate_level_and_format() {
        let log = LogSettings::from_env(&Env::from_pairs([("LOG_FORMAT", "JSON")])).unwrap();
        assert_eq!(log.format, LogFormat::Json);
        assert_eq!(log.level, "info");
        let err = LogSettings::from_env(&Env::from_pairs([("LOG_LEVEL", "loud")])).unwrap_err();
        assert_eq!(err.variable, "LOG_LEVEL");
        let err = LogSettings::from_env(&Env::from_pairs([("LOG_FORMAT", "xml")])).unwrap_err();
        assert_eq!(err.variable, "LOG_FORMAT");
    }
}
