//! One database's connection settings, read the way libpq reads them.
//!
//! - The URL comes from `SOURCE_DATABASE_URL` (or `TARGET_…`), or from the file that
//!   `SOURCE_DATABASE_URL_FILE` names (systemd credentials, container secrets): set one of the two.
//! - TLS follows libpq: `sslmode` (`disable`, `allow`, `prefer` (the default), `require`,
//!   `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or `system` for the platform's roots),
//!   `sslcert` and `sslkey` (a client certificate), in the URL's query or in `PGSSLMODE`,
//!   `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY`; `~/.postgresql/root.crt`,
//!   `~/.postgresql/postgresql.crt` and `.key` are used when they exist. As in libpq, a root
//!   certificate turns on verification of the server's chain even with `prefer` or `require`;
//!   only `verify-full` checks the host name; `sslrootcert=system` means `verify-full`.
//! - The password is the URL's, else `PGPASSWORD`'s, else the matching line of the password
//!   file (`passfile`, `PGPASSFILE`, or `~/.pgpass`; ignored when others may read it).
//!
//! Every problem is a [`ConfigError`] naming the variable, never showing the URL or a password.
//! The TLS configuration (certificates read, verifier chosen) is built here, once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres::config::{Host, SslMode as DriverSslMode};

use super::{ConfigError, Env};
use crate::connection::tls::{self, Verification};

/// Which database a setting or an error is about.
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

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// One database: its connection settings (password inside, redacted in `Debug`), TLS and pool size.
#[derive(Clone)]
pub struct DatabaseSettings {
    pub role: DatabaseRole,
    /// With the `sslmode` the driver starts with (`allow` starts without TLS).
    pub config: tokio_postgres::Config,
    pub pool_size: usize,
    pub ssl_mode: SslMode,
    /// The TLS client configuration: roots, verifier, client certificate.
    pub(crate) tls: Arc<ClientConfig>,
}

impl DatabaseSettings {
    /// `user@host:port/dbname`, safe for logs and reports (never the password).
    pub fn display(&self) -> String {
        describe_pg_config(&self.config)
    }
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("role", &self.role)
            .field("database", &self.display())
            .field("pool_size", &self.pool_size)
            .field("sslmode", &self.ssl_mode.as_str())
            .finish()
    }
}

/// `user@host:port/dbname` for a connection configuration, without its password.
pub fn describe_pg_config(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "?".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("?");
    let dbname = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{dbname}")
}

const EXPECTED: &str = "expected a libpq URL such as postgres://user:password@host:5432/dbname";

/// The libpq options rowsync reads itself (the driver knows none of them), from a URL's query.
#[derive(Debug, Default)]
struct LibpqOptions {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    passfile: Option<String>,
}

/// The settings of the database of `variable` (`SOURCE_DATABASE_URL` or `TARGET_DATABASE_URL`).
pub(super) fn database(
    env: &Env,
    variable: &'static str,
    file_variable: &'static str,
    role: DatabaseRole,
    pool_size: usize,
    warnings: &mut Vec<String>,
) -> Result<DatabaseSettings, ConfigError> {
    let error = |problem: String| ConfigError::new(variable, problem);
    let text = url_text(env, variable, file_variable)?;
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err(error(format!(
            "{EXPECTED} (it must start with postgres:// or postgresql://)"
        )));
    }
    let (url, mut options) = split_libpq_options(&text).map_err(&error)?;
    options.sslmode = options
        .sslmode
        .or(env.get("PGSSLMODE")?.map(str::to_string));
    options.sslrootcert = options
        .sslrootcert
        .or(env.get("PGSSLROOTCERT")?.map(str::to_string));
    options.sslcert = options
        .sslcert
        .or(env.get("PGSSLCERT")?.map(str::to_string));
    options.sslkey = options.sslkey.or(env.get("PGSSLKEY")?.map(str::to_string));
    options.passfile = options
        .passfile
        .or(env.get("PGPASSFILE")?.map(str::to_string));

    // The parser's messages can quote parts of the URL, so only say that it failed.
    let mut config = tokio_postgres::Config::from_str(&url)
        .map_err(|_| error(format!("{EXPECTED} (it could not be parsed)")))?;
    if config.get_hosts().is_empty() {
        return Err(error(format!("{EXPECTED} (it names no host)")));
    }
    if config.get_user().is_none() {
        return Err(error(format!("{EXPECTED} (it names no user)")));
    }
    if config.get_password().is_none() {
        if let Some(password) = env.get("PGPASSWORD")? {
            config.password(password);
        } else if let Some(password) =
            from_passfile(env, &config, options.passfile.as_deref(), warnings).map_err(&error)?
        {
            config.password(password);
        }
    }
    let (ssl_mode, tls) = tls_settings(env, &options).map_err(&error)?;
    config.ssl_mode(match ssl_mode {
        SslMode::Disable | SslMode::Allow => DriverSslMode::Disable,
        SslMode::Prefer => DriverSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
    });
    Ok(DatabaseSettings {
        role,
        config,
        pool_size,
        ssl_mode,
        tls: Arc::new(tls),
    })
}

/// The URL, from its variable or from the file its `_FILE` variable names (one of the two).
fn url_text(
    env: &Env,
    variable: &'static str,
    file_variable: &'static str,
) -> Result<String, ConfigError> {
    match (env.get(variable)?, env.get(file_variable)?) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            variable,
            format!("and {file_variable} are both set; set one of them"),
        )),
        (Some(url), None) => Ok(url.to_string()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| text.trim().to_string())
            .map_err(|err| {
                ConfigError::new(
                    file_variable,
                    format!("{path:?} could not be read: {}", err.kind()),
                )
            }),
        (None, None) => Err(ConfigError::new(
            variable,
            format!(
                "is required; {EXPECTED}, set in the environment or in .env (cp .env.example .env), \
                 or in a file named by {file_variable}"
            ),
        )),
    }
}

/// Takes rowsync's libpq options out of the URL's query; the rest stays for the driver.
fn split_libpq_options(url: &str) -> Result<(String, LibpqOptions), String> {
    let mut options = LibpqOptions::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), options));
    };
    let mut kept = Vec::new();
    for parameter in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let decode = |text: &str| {
            percent_decode_str(text)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| format!("{EXPECTED} (a query parameter is not valid UTF-8)"))
        };
        let slot = match decode(key)?.as_str() {
            "sslmode" => &mut options.sslmode,
            "sslrootcert" => &mut options.sslrootcert,
            "sslcert" => &mut options.sslcert,
            "sslkey" => &mut options.sslkey,
            "passfile" => &mut options.passfile,
            "sslpassword" | "sslcrl" | "sslcrldir" | "sslcertmode" => {
                return Err(format!(
                    "the libpq option {key} is not supported by rowsync (use an unencrypted key file; \
                     certificate revocation lists are not checked)"
                ));
            }
            "gssencmode" if decode(value)? == "require" => {
                return Err(
                    "gssencmode=require: GSSAPI encryption is not supported; use TLS".into(),
                );
            }
            // No GSSAPI encryption and SNI always: accepted and ignored, as libpq would end up.
            "gssencmode" | "sslsni" | "sslcompression" => continue,
            _ => {
                kept.push(parameter);
                continue;
            }
        };
        *slot = Some(decode(value)?);
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, options))
}

/// `~/<name>` when `HOME` is set and the file exists.
fn home_file(env: &Env, name: &str) -> Option<PathBuf> {
    let home = env.get("HOME").ok().flatten()?;
    let path = Path::new(home).join(name);
    path.is_file().then_some(path)
}

/// The TLS mode and client configuration, as libpq would connect.
fn tls_settings(env: &Env, options: &LibpqOptions) -> Result<(SslMode, ClientConfig), String> {
    let explicit = match options.sslmode.as_deref() {
        Some(text) => Some(SslMode::parse(text).ok_or_else(|| {
            format!(
                "sslmode {text:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
            )
        })?),
        None => None,
    };
    let system = options.sslrootcert.as_deref() == Some("system");
    let mode = match explicit {
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(mode) if system && mode != SslMode::VerifyFull => {
            return Err(format!(
                "sslrootcert=system needs sslmode verify-full, not {}",
                mode.as_str()
            ));
        }
        Some(mode) => mode,
    };
    let root_file = match options.sslrootcert.as_deref() {
        Some("system") => None,
        Some(path) => Some(PathBuf::from(path)),
        None => home_file(env, ".postgresql/root.crt"),
    };
    let roots = match (&root_file, system) {
        (_, true) => Some(tls::system_roots()?),
        (Some(path), false) => Some(tls::roots_from_file(path)?),
        (None, false) => None,
    };
    let verification = match (mode, &roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(format!(
                "sslmode={} needs sslrootcert: the CA's certificate file, or system",
                mode.as_str()
            ));
        }
        (SslMode::VerifyFull, Some(_)) => Verification::ChainAndName,
        // libpq: with a root certificate at hand, the chain is verified whatever the mode.
        (_, Some(_)) => Verification::Chain,
        (_, None) => Verification::None,
    };
    let identity = client_identity(env, options)?;
    Ok((mode, tls::client_config(verification, roots, identity)?))
}

/// The client certificate and key (`sslcert`, `sslkey`, or libpq's default files).
fn client_identity(
    env: &Env,
    options: &LibpqOptions,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    let cert = options
        .sslcert
        .as_ref()
        .map(PathBuf::from)
        .or_else(|| home_file(env, ".postgresql/postgresql.crt"));
    let key = options
        .sslkey
        .as_ref()
        .map(PathBuf::from)
        .or_else(|| home_file(env, ".postgresql/postgresql.key"));
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => return Err("sslcert is set but not sslkey".into()),
        (None, Some(_)) => return Err("sslkey is set but not sslcert".into()),
    };
    check_key_permissions(&key)?;
    let certs = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("sslcert {}: {err}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("sslcert {}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|err| format!("sslkey {}: {err}", key.display()))?;
    Ok(Some((certs, key)))
}

/// libpq refuses a key that others may read: u=rw (0600), or u=rw,g=r (0640) when root owns it.
fn check_key_permissions(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let metadata =
        std::fs::metadata(path).map_err(|err| format!("sslkey {}: {err}", path.display()))?;
    let mode = metadata.mode() & 0o777;
    let allowed = if metadata.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(format!(
            "sslkey {} may be read by others (mode {mode:o}); chmod 0600 it",
            path.display()
        ));
    }
    Ok(())
}

/// The password for this connection in the password file, if there is a matching line.
///
/// The file is libpq's: `hostname:port:database:username:password` per line, `*` matching
/// anything, `\:` and `\\` escapes, `#` comments. Like libpq, rowsync ignores a file that
/// others may read, and says so.
fn from_passfile(
    env: &Env,
    config: &tokio_postgres::Config,
    passfile: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Option<String>, String> {
    let path = match passfile {
        Some(path) => PathBuf::from(path),
        None => match home_file(env, ".pgpass") {
            Some(path) => path,
            None => return Ok(None),
        },
    };
    let Ok(metadata) = std::fs::metadata(&path) else {
        return Ok(None);
    };
    use std::os::unix::fs::PermissionsExt;
    if metadata.permissions().mode() & 0o077 != 0 {
        warnings.push(format!(
            "the password file {} may be read by others (chmod 0600 it); ignoring it",
            path.display()
        ));
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|err| format!("password file {}: {}", path.display(), err.kind()))?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(_)) | None => "localhost".into(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default();
    let database = config.get_dbname().unwrap_or(user);
    let wanted = [host.as_str(), port.as_str(), database, user];
    Ok(text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = passfile_fields(line);
            let [h, p, d, u, password] = fields.as_slice() else {
                return None;
            };
            [h, p, d, u]
                .iter()
                .zip(wanted)
                .all(|(field, value)| field.as_str() == "*" || field.as_str() == value)
                .then(|| password.clone())
        }))
}

/// The fields of a password-file line: split at unescaped `:`, with `\:` and `\\` unescaped.
fn passfile_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next()
                    && let Some(field) = fields.last_mut()
                {
                    field.push(next);
                }
            }
            // The password is the rest of the line, colons included.
            ':' if fields.len() < 5 => fields.push(String::new()),
            other => {
                if let Some(field) = fields.last_mut() {
                    field.push(other);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_options_leave_the_url_and_the_rest_stays() {
        let (url, options) = split_libpq_options(
            "postgres://u:p@h/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p@h/db?application_name=x&connect_timeout=5"
        );
        assert_eq!(options.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(options.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (url, _) = split_libpq_options("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert!(split_libpq_options("postgres://u@h/db?sslpassword=x").is_err());
        assert!(split_libpq_options("postgres://u@h/db?gssencmode=require").is_err());
    }

    #[test]
    fn passfile_lines_split_at_unescaped_colons() {
        assert_eq!(
            passfile_fields(r"db.example:5432:*:app:pa\:ss:word\\x"),
            ["db.example", "5432", "*", "app", r"pa:ss:word\x"]
        );
    }

    #[test]
    fn tls_modes_follow_libpq() {
        let env = Env::default();
        let options = |mode: Option<&str>, root: Option<&str>| LibpqOptions {
            sslmode: mode.map(str::to_string),
            sslrootcert: root.map(str::to_string),
            ..LibpqOptions::default()
        };
        assert_eq!(
            tls_settings(&env, &options(None, None)).unwrap().0,
            SslMode::Prefer
        );
        assert_eq!(
            tls_settings(&env, &options(None, Some("system")))
                .unwrap()
                .0,
            SslMode::VerifyFull
        );
        for (mode, root) in [
            (Some("require"), Some("system")),
            (Some("verify-full"), None),
            (Some("verify-ca"), None),
            (Some("sometimes"), None),
            (Some("require"), Some("/nonexistent/ca.pem")),
        ] {
            assert!(
                tls_settings(&env, &options(mode, root)).is_err(),
                "{mode:?} {root:?}"
            );
        }
    }
}
