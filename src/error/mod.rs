//! The crate's error type: what failed, on which database or table, with the cause as `source`.
//!
//! Messages never contain passwords: databases appear as `user@host:port/db` (see
//! [`crate::config::DatabaseSettings::display`]), and driver errors carry no connection strings.

pub(crate) mod policy;

use crate::config::{ConfigError, DatabaseRole};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("could not connect to the {role} database {database}")]
    Connect {
        role: DatabaseRole,
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("no connection to the {role} database {database}")]
    Pool {
        role: DatabaseRole,
        database: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },

    #[error("could not build the {role} connection pool")]
    PoolBuild {
        role: DatabaseRole,
        #[source]
        source: deadpool_postgres::BuildError,
    },

    #[error("{action} failed on the {role} database")]
    Sql {
        role: DatabaseRole,
        action: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("{action} on the {role} database timed out")]
    Timeout { role: DatabaseRole, action: String },

    #[error("table {table}: {problem}")]
    Schema { table: String, problem: String },

    #[error(
        "table {table}: row-level security applies to rowsync's role {user} on the {role} database, \
         so rows would be hidden from it; give the role BYPASSRLS (ALTER ROLE {user} BYPASSRLS) \
         or make it the table's owner (without FORCE ROW LEVEL SECURITY)"
    )]
    RowSecurity {
        table: String,
        role: DatabaseRole,
        user: String,
    },

    #[error("table {table} is not set up for sync; run `rowsync setup` first")]
    NotSetUp { table: String },

    #[error(transparent)]
    LocalServer(#[from] rowsync_sandbox::Error),

    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },

    #[error("a background task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl Error {
    /// The driver error underneath, if this error came from a database.
    pub(crate) fn postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Self::Connect { source, .. } | Self::Sql { source, .. } => Some(source),
            Self::Pool {
                source: deadpool_postgres::PoolError::Backend(source),
                ..
            } => Some(source),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches "what was being done, on which database" to driver errors.
pub(crate) trait SqlContext<T> {
    fn context(self, role: DatabaseRole, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T> SqlContext<T> for Result<T, tokio_postgres::Error> {
    fn context(self, role: DatabaseRole, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sql {
            role,
            action: action(),
            source,
        })
    }
}

/// Renders an error and its causes on one line each: `error: …` then `caused by: …`.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = causes(err).into_iter();
    let mut text = format!("error: {}", parts.next().unwrap_or_default());
    for cause in parts {
        text.push_str(&format!("\ncaused by: {cause}"));
    }
    text
}

/// The error chain flattened to one line, for logs and `sync_errors.error_message`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    causes(err).join(": ")
}

/// Each error of the chain as text. A server error is shown as `SEVERITY SQLSTATE: message`,
/// without its DETAIL and HINT: PostgreSQL puts row contents there ("Failing row contains …",
/// "Key (email)=(…) already exists"), and logs must not carry them. `sync_errors.stack_trace`
/// keeps the detail (see [`crate::target::sync_errors::stack_trace`]).
fn causes(err: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = cause {
        match err.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(db) => parts.push(format!(
                "{} {}: {}",
                db.severity(),
                db.code().code(),
                db.message()
            )),
            None => parts.push(err.to_string()),
        }
        cause = err.source();
    }
    parts
}
