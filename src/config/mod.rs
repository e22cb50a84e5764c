//! Configuration: raw environment strings in, validated [`Settings`] out.
//!
//! Every variable is parsed and checked before anything connects. A bad value is a [`ConfigError`]
//! naming the variable and the expected form; the binary prints it on one line and exits with status 2.
//! Nothing falls back to a default silently: a variable is either unset (or empty), and gets its
//! documented default, or it must be valid.
//!
//! Database URLs hold passwords, so they are never echoed: not in errors, not in `Debug` output
//! (`tokio_postgres::Config` redacts its password), not in logs ([`DatabaseSettings::display`]).

mod database;
mod env;
mod tables;

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use self::database::database;
pub use self::database::{DatabaseRole, DatabaseSettings, SslMode, describe_pg_config};
pub use self::env::{DOTENV, Env, parse_dotenv};
pub use self::tables::{SYNC_CONFIG, TableSpec};

/// A configuration problem: which variable, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(variable: &'static str, problem: impl Into<String>) -> Self {
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
    pub tables: Vec<TableSpec>,
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
    /// Bytes of row data per apply statement (and per read from the source), at most.
    pub batch_bytes: usize,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// When sweeps re-read rows updated within the lookback window.
    pub lookback: LookbackMode,
    /// Where `/health`, `/status`, `/metrics` and `POST /sync` are served (None: `off`).
    pub health_addr: Option<SocketAddr>,
    /// The bearer token `/status`, `/metrics` and `POST /sync` require, if set.
    pub health_token: Option<HealthToken>,
    /// How long `sync_runs` keeps history.
    pub sync_runs_retention: Duration,
    /// Things worth saying about the configuration once logging is set up (a password file
    /// ignored, and why).
    pub warnings: Vec<String>,
    /// When rowsync defers its work while the source is busy (see `runtime::yielding`).
    pub yielding: YieldSettings,
    /// Continuous verification: how often the daemon compares its tables (None: never).
    pub verify_interval: Option<Duration>,
    /// Whether the daemon's verification also repairs what it finds.
    pub repair_automatically: bool,
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
        let level = choice(
            env,
            "LOG_LEVEL",
            "info",
            &[
                ("error", "error"),
                ("warn", "warn"),
                ("info", "info"),
                ("debug", "debug"),
                ("trace", "trace"),
            ],
        )?;
        let format = choice(
            env,
            "LOG_FORMAT",
            LogFormat::Text,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )?;
        Ok(Self {
            level: level.to_string(),
            format,
        })
    }
}

/// The accepted ranges. Each is what PostgreSQL and the runtime can honour, with room to spare:
/// PostgreSQL takes timeouts up to 2^31 − 1 ms (about 24 days) and timestamps back to 4713 BC;
/// tokio sleeps and std's `Duration` arithmetic overflow only far beyond these.
mod limits {
    use std::ops::RangeInclusive;

    pub(super) const POOL_SIZE: RangeInclusive<usize> = 1..=1000;
    pub(super) const SYNC_INTERVAL_MINUTES: RangeInclusive<f64> = 0.002..=10_080.0;
    pub(super) const SYNC_WINDOW_MULTIPLIER: RangeInclusive<f64> = 1.0..=1000.0;
    pub(super) const MAX_RETRIES: RangeInclusive<u32> = 0..=1000;
    pub(super) const RETRY_DELAY_MS: RangeInclusive<u64> = 1..=86_400_000;
    pub(super) const RETRY_BACKOFF_MULTIPLIER: RangeInclusive<f64> = 1.0..=10.0;
    pub(super) const MAX_RECONNECT_ATTEMPTS: RangeInclusive<u32> = 1..=1_000_000;
    pub(super) const SHUTDOWN_TIMEOUT_SECONDS: RangeInclusive<f64> = 0.1..=3600.0;
    pub(super) const POLL_INTERVAL_MS: RangeInclusive<u64> = 10..=3_600_000;
    pub(super) const BATCH_SIZE: RangeInclusive<usize> = 1..=100_000;
    /// MiB; PostgreSQL refuses a message of 1 GiB or more.
    pub(super) const BATCH_MAX_MB: RangeInclusive<usize> = 1..=256;
    pub(super) const STATEMENT_TIMEOUT_SECONDS: RangeInclusive<f64> = 0.1..=86_400.0;
    pub(super) const LOCK_TIMEOUT_SECONDS: RangeInclusive<f64> = 0.001..=86_400.0;
    pub(super) const SYNC_RUNS_RETENTION_DAYS: RangeInclusive<f64> = 0.001..=36_500.0;
    pub(super) const YIELD_ACTIVE_SESSIONS: RangeInclusive<u32> = 0..=100_000;
    pub(super) const YIELD_MAX_SECONDS: RangeInclusive<f64> = 0.1..=3600.0;
    pub(super) const VERIFY_INTERVAL_MINUTES: RangeInclusive<f64> = 0.01..=525_600.0;
    /// Bytes of `HEALTH_TOKEN`.
    pub(super) const HEALTH_TOKEN_BYTES: RangeInclusive<usize> = 1..=1024;
}

impl Settings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mut warnings = Vec::new();
        let (source, target) = databases(env, &mut warnings)?;
        let (sync_interval, sweep_lookback) = sweep_timing(env)?;
        Ok(Self {
            source,
            target,
            tables: tables::tables(env)?,
            sync_interval,
            sweep_lookback,
            retry: RetrySettings::from_env(env)?,
            max_reconnect_attempts: whole(
                env,
                "MAX_RECONNECT_ATTEMPTS",
                10,
                limits::MAX_RECONNECT_ATTEMPTS,
                "attempts",
            )?,
            shutdown_timeout: seconds(
                env,
                "SHUTDOWN_TIMEOUT_SECONDS",
                30.0,
                limits::SHUTDOWN_TIMEOUT_SECONDS,
            )?,
            poll_interval: Duration::from_millis(whole(
                env,
                "POLL_INTERVAL_MS",
                500,
                limits::POLL_INTERVAL_MS,
                "milliseconds",
            )?),
            batch_size: whole(env, "BATCH_SIZE", 5000, limits::BATCH_SIZE, "rows")?,
            batch_bytes: whole(env, "BATCH_MAX_MB", 16, limits::BATCH_MAX_MB, "MiB")? << 20,
            statement_timeout: seconds(
                env,
                "STATEMENT_TIMEOUT_SECONDS",
                30.0,
                limits::STATEMENT_TIMEOUT_SECONDS,
            )?,
            lock_timeout: seconds(
                env,
                "LOCK_TIMEOUT_SECONDS",
                10.0,
                limits::LOCK_TIMEOUT_SECONDS,
            )?,
            lookback: choice(
                env,
                "SYNC_LOOKBACK",
                LookbackMode::Auto,
                &[
                    ("auto", LookbackMode::Auto),
                    ("always", LookbackMode::Always),
                    ("never", LookbackMode::Never),
                ],
            )?,
            health_addr: health_addr(env)?,
            health_token: health_token(env)?,
            sync_runs_retention: Duration::from_secs_f64(
                decimal(
                    env,
                    "SYNC_RUNS_RETENTION_DAYS",
                    30.0,
                    limits::SYNC_RUNS_RETENTION_DAYS,
                    "days",
                )? * 86_400.0,
            ),
            yielding: YieldSettings::from_env(env)?,
            verify_interval: verify_interval(env)?,
            repair_automatically: choice(
                env,
                "REPAIR_AUTOMATICALLY",
                false,
                &[
                    ("false", false),
                    ("true", true),
                    ("0", false),
                    ("1", true),
                    ("no", false),
                    ("yes", true),
                ],
            )?,
            warnings,
        })
    }
}

/// The two databases with their pool sizes.
fn databases(
    env: &Env,
    warnings: &mut Vec<String>,
) -> Result<(DatabaseSettings, DatabaseSettings), ConfigError> {
    let source_pool = whole(
        env,
        "SOURCE_DB_POOL_SIZE",
        10,
        limits::POOL_SIZE,
        "connections",
    )?;
    let target_pool = target_pool_size(env)?;
    let source = database(
        env,
        "SOURCE_DATABASE_URL",
        "SOURCE_DATABASE_URL_FILE",
        DatabaseRole::Source,
        source_pool,
        warnings,
    )?;
    let target = database(
        env,
        "TARGET_DATABASE_URL",
        "TARGET_DATABASE_URL_FILE",
        DatabaseRole::Target,
        target_pool,
        warnings,
    )?;
    Ok((source, target))
}

/// `VERIFY_INTERVAL_MINUTES`: unset, empty or `off` for none.
fn verify_interval(env: &Env) -> Result<Option<Duration>, ConfigError> {
    if env
        .get("VERIFY_INTERVAL_MINUTES")?
        .is_none_or(|text| text.eq_ignore_ascii_case("off"))
    {
        return Ok(None);
    }
    let minutes = decimal(
        env,
        "VERIFY_INTERVAL_MINUTES",
        0.0,
        limits::VERIFY_INTERVAL_MINUTES,
        "minutes (or off)",
    )?;
    Ok(Some(Duration::from_secs_f64(minutes * 60.0)))
}

/// The sweep interval, and how far a sweep looks back (`SYNC_WINDOW_MULTIPLIER` intervals).
fn sweep_timing(env: &Env) -> Result<(Duration, Duration), ConfigError> {
    let interval_minutes = decimal(
        env,
        "SYNC_INTERVAL_MINUTES",
        1.0,
        limits::SYNC_INTERVAL_MINUTES,
        "minutes",
    )?;
    let interval = Duration::from_secs_f64(interval_minutes * 60.0);
    let multiplier = decimal(
        env,
        "SYNC_WINDOW_MULTIPLIER",
        3.0,
        limits::SYNC_WINDOW_MULTIPLIER,
        "intervals",
    )?;
    Ok((interval, interval.mul_f64(multiplier)))
}

impl RetrySettings {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let delay = |variable, default| {
            whole(
                env,
                variable,
                default,
                limits::RETRY_DELAY_MS,
                "milliseconds",
            )
            .map(Duration::from_millis)
        };
        let retry = Self {
            max_retries: whole(env, "MAX_RETRIES", 3, limits::MAX_RETRIES, "retries")?,
            initial_delay: delay("RETRY_INITIAL_DELAY", 1000)?,
            max_delay: delay("RETRY_MAX_DELAY", 30_000)?,
            multiplier: decimal(
                env,
                "RETRY_BACKOFF_MULTIPLIER",
                2.0,
                limits::RETRY_BACKOFF_MULTIPLIER,
                "times",
            )?,
        };
        if retry.max_delay < retry.initial_delay {
            return Err(ConfigError::new(
                "RETRY_MAX_DELAY",
                format!(
                    "must be at least RETRY_INITIAL_DELAY ({} ms)",
                    retry.initial_delay.as_millis()
                ),
            ));
        }
        Ok(retry)
    }
}

impl YieldSettings {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            active_sessions: whole(
                env,
                "YIELD_ACTIVE_SESSIONS",
                8,
                limits::YIELD_ACTIVE_SESSIONS,
                "sessions (0: never yield)",
            )?,
            max: seconds(env, "YIELD_MAX_SECONDS", 30.0, limits::YIELD_MAX_SECONDS)?,
        })
    }
}

/// `HEALTH_ADDR`: `ip:port`, or `off`.
pub fn health_addr(env: &Env) -> Result<Option<SocketAddr>, ConfigError> {
    let text = env.get("HEALTH_ADDR")?.unwrap_or(DEFAULT_HEALTH_ADDR);
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let expected = "expected an address such as 127.0.0.1:9393 or [::1]:9393 (an IP address and a port from 1 to 65535), or off";
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(Some(addr)),
        _ => Err(ConfigError::new(
            "HEALTH_ADDR",
            format!("{expected}; got {text:?}"),
        )),
    }
}

/// `HEALTH_TOKEN`: the bearer token that `/status`, `/metrics` and `POST /sync` require, if set.
/// Never shown: not in errors, not in `Debug`.
pub fn health_token(env: &Env) -> Result<Option<HealthToken>, ConfigError> {
    let Some(token) = env.get("HEALTH_TOKEN")? else {
        return Ok(None);
    };
    if !limits::HEALTH_TOKEN_BYTES.contains(&token.len())
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ConfigError::new(
            "HEALTH_TOKEN",
            format!(
                "expected {} to {} printable ASCII characters without spaces (such as the output of `openssl rand -hex 32`)",
                limits::HEALTH_TOKEN_BYTES.start(),
                limits::HEALTH_TOKEN_BYTES.end()
            ),
        ));
    }
    Ok(Some(HealthToken(token.to_string())))
}

/// A bearer token for the HTTP endpoints. Its `Debug` form is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct HealthToken(String);

impl HealthToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for HealthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HealthToken(<redacted>)")
    }
}

/// `CHAT_DB_POOL_SIZE` is the seed's name; `TARGET_DB_POOL_SIZE` is accepted as an alias.
fn target_pool_size(env: &Env) -> Result<usize, ConfigError> {
    let pool = |variable| {
        env.get(variable)?
            .map(|_| whole(env, variable, 10, limits::POOL_SIZE, "connections"))
            .transpose()
    };
    match (pool("CHAT_DB_POOL_SIZE")?, pool("TARGET_DB_POOL_SIZE")?) {
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

/// A whole number of `unit` within `range`.
fn whole<T>(
    env: &Env,
    variable: &'static str,
    default: T,
    range: RangeInclusive<T>,
    unit: &str,
) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + fmt::Display,
{
    let Some(text) = env.get(variable)? else {
        return Ok(default);
    };
    match text.parse::<T>() {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err(ConfigError::new(
            variable,
            format!(
                "expected a whole number of {unit} from {} to {}, got {text:?}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// A number of `unit` (decimals allowed) within `range`.
fn decimal(
    env: &Env,
    variable: &'static str,
    default: f64,
    range: RangeInclusive<f64>,
    unit: &str,
) -> Result<f64, ConfigError> {
    let Some(text) = env.get(variable)? else {
        return Ok(default);
    };
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && range.contains(&value) => Ok(value),
        _ => Err(ConfigError::new(
            variable,
            format!(
                "expected a number of {unit} from {} to {} (decimals allowed), got {text:?}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// A number of seconds within `range`, as a duration.
fn seconds(
    env: &Env,
    variable: &'static str,
    default: f64,
    range: RangeInclusive<f64>,
) -> Result<Duration, ConfigError> {
    decimal(env, variable, default, range, "seconds").map(Duration::from_secs_f64)
}

/// One of a few words (case-insensitive).
fn choice<T: Copy>(
    env: &Env,
    variable: &'static str,
    default: T,
    options: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(text) = env.get(variable)? else {
        return Ok(default);
    };
    options
        .iter()
        .find(|(word, _)| word.eq_ignore_ascii_case(text))
        .map(|&(_, value)| value)
        .ok_or_else(|| {
            let words: Vec<&str> = options.iter().map(|(word, _)| *word).collect();
            ConfigError::new(
                variable,
                format!("expected one of {}, got {text:?}", words.join(", ")),
            )
        })
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
        assert_eq!(
            settings.tables,
            vec![TableSpec::plain(
                crate::catalog::ident::TableRef::parse("users").unwrap()
            )]
        );
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
        assert_eq!(settings.verify_interval, None);
        assert!(!settings.repair_automatically);
        let off = Settings::from_env(&env(&[("HEALTH_ADDR", "OFF")])).unwrap();
        assert_eq!(off.health_addr, None);
        let verifying = Settings::from_env(&env(&[
            ("VERIFY_INTERVAL_MINUTES", "30"),
            ("REPAIR_AUTOMATICALLY", "TRUE"),
        ]))
        .unwrap();
        assert_eq!(verifying.verify_interval, Some(Duration::from_secs(1800)));
        assert!(verifying.repair_automatically);
        let off = Settings::from_env(&env(&[("VERIFY_INTERVAL_MINUTES", "off")])).unwrap();
        assert_eq!(off.verify_interval, None);
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
            ("VERIFY_INTERVAL_MINUTES", "hourly"),
            ("VERIFY_INTERVAL_MINUTES", "0"),
            ("REPAIR_AUTOMATICALLY", "maybe"),
        ];
        for (variable, value) in cases {
            rejected(variable, value);
        }
    }

    /// The error for `variable=value`, which must name the variable. Returns its text.
    fn rejected(variable: &str, value: &str) -> String {
        let err = error_for(&[(variable, value)]);
        assert_eq!(err.variable, variable, "{variable}={value:?} gave {err}");
        let text = err.to_string();
        assert!(text.starts_with(variable), "{text}");
        text
    }

    #[test]
    fn values_past_what_postgres_and_the_runtime_honour_are_rejected_with_the_range() {
        let cases = [
            ("SOURCE_DB_POOL_SIZE", "1000000000000000"),
            ("SOURCE_DB_POOL_SIZE", "1001"),
            ("CHAT_DB_POOL_SIZE", "99999999999999999999999"),
            ("TARGET_DB_POOL_SIZE", "5000"),
            ("STATEMENT_TIMEOUT_SECONDS", "3000000"),
            ("STATEMENT_TIMEOUT_SECONDS", "0.01"),
            ("LOCK_TIMEOUT_SECONDS", "3000000"),
            ("BATCH_SIZE", "4294967296"),
            ("BATCH_SIZE", "100001"),
            ("SYNC_INTERVAL_MINUTES", "60000"),
            ("SYNC_INTERVAL_MINUTES", "0.001"),
            ("SYNC_INTERVAL_MINUTES", "NaN"),
            ("SYNC_INTERVAL_MINUTES", "inf"),
            ("SYNC_WINDOW_MULTIPLIER", "60000"),
            ("MAX_RETRIES", "1001"),
            ("RETRY_INITIAL_DELAY", "0"),
            ("RETRY_MAX_DELAY", "86400001"),
            ("RETRY_BACKOFF_MULTIPLIER", "1e300"),
            ("MAX_RECONNECT_ATTEMPTS", "4294967296"),
            ("SHUTDOWN_TIMEOUT_SECONDS", "1e9"),
            ("POLL_INTERVAL_MS", "5"),
            ("POLL_INTERVAL_MS", "18446744073709551616"),
            ("SYNC_RUNS_RETENTION_DAYS", "1e9"),
            ("YIELD_ACTIVE_SESSIONS", "100001"),
            ("YIELD_MAX_SECONDS", "86400"),
            ("VERIFY_INTERVAL_MINUTES", "1e9"),
            ("HEALTH_ADDR", "127.0.0.1:0"),
            ("HEALTH_ADDR", "127.0.0.1:70000"),
        ];
        for (variable, value) in cases {
            let text = rejected(variable, value);
            assert!(
                text.contains(" to ") || text.contains("from 1 to 65535"),
                "{variable}={value:?} does not name the accepted range: {text}"
            );
        }
    }

    #[test]
    fn the_largest_accepted_values_give_usable_settings() {
        let settings = Settings::from_env(&env(&[
            ("SYNC_INTERVAL_MINUTES", "10080"),
            ("SYNC_WINDOW_MULTIPLIER", "1000"),
            ("STATEMENT_TIMEOUT_SECONDS", "86400"),
            ("LOCK_TIMEOUT_SECONDS", "86400"),
            ("RETRY_INITIAL_DELAY", "86400000"),
            ("RETRY_MAX_DELAY", "86400000"),
            ("RETRY_BACKOFF_MULTIPLIER", "10"),
            ("SOURCE_DB_POOL_SIZE", "1000"),
            ("BATCH_SIZE", "100000"),
        ]))
        .unwrap();
        // The sweep's look-back stays far inside PostgreSQL's timestamp range (4713 BC).
        assert!(settings.sweep_lookback < Duration::from_secs(20 * 366 * 86_400));
        // Every session timeout stays within PostgreSQL's 2^31 - 1 ms.
        let limits = crate::connection::SessionLimits::from_settings(&settings);
        for role in [DatabaseRole::Source, DatabaseRole::Target] {
            assert!(limits.idle_in_transaction_timeout(role).as_millis() < i32::MAX as u128);
        }
        let mut backoff = crate::runtime::retry::Backoff::new(&settings.retry);
        assert!(backoff.nth(40).is_some());
    }

    #[test]
    fn the_health_token_is_checked_and_never_shown() {
        let settings =
            Settings::from_env(&env(&[("HEALTH_TOKEN", "tok3n-abcdefghijklmnop")])).unwrap();
        let token = settings.health_token.clone().unwrap();
        assert_eq!(token.expose(), "tok3n-abcdefghijklmnop");
        assert!(!format!("{settings:?}").contains("tok3n"));
        for bad in ["has space", "ünïcode", &"x".repeat(1025)] {
            let err = error_for(&[("HEALTH_TOKEN", bad)]);
            assert_eq!(err.variable, "HEALTH_TOKEN");
            assert!(!err.to_string().contains(bad), "{err}");
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
        assert_eq!(names, ["users", "app.orders", "\"Mixed\""]);
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
