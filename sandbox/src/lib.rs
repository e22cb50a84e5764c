//! Throwaway local PostgreSQL servers, for `rowsync demo`, rowsync's tests and its benchmark: apart
//! from the sync engine, which never starts a server.
//!
//! A [`LocalServer`] runs `initdb` and `postgres` from the installed server binaries in a temporary
//! directory, listening on a random free port on 127.0.0.1 only (no Unix socket). PostgreSQL refuses
//! to run as root, so when rowsync runs as root the server runs as the `postgres` user.
//!
//! Cleanup: dropping the server stops it and deletes its directory. If this process dies without
//! dropping it (kill -9, a test timeout), the kernel sends the postmaster SIGQUIT (immediate
//! shutdown) through `PR_SET_PDEATHSIG`. That signal follows the *thread* that started the server,
//! so start servers from a thread that outlives them (the main thread, or a test's own thread), not
//! from a pool thread that may retire.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What went wrong with a local server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("local PostgreSQL server: {action}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("local PostgreSQL server {server}: {action}")]
    Sql {
        server: String,
        action: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Database superuser of every local server; authentication is `trust` on 127.0.0.1.
pub const SUPERUSER: &str = "postgres";

/// Server settings beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// `fsync` and `synchronous_commit` on. Off by default: throwaway data, faster tests.
    pub durable: bool,
    /// `wal_level = logical`, for native logical replication (the benchmark compares against it).
    pub logical_replication: bool,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// The contents of `pg_hba.conf`, replacing initdb's (which trusts every local connection).
    pub hba: Option<String>,
    /// Files written into the data directory before the server starts: name, contents, mode
    /// (certificates and keys for `ssl = on`).
    pub files: Vec<(String, String, u32)>,
}

pub struct LocalServer {
    label: String,
    bindir: PathBuf,
    /// Holds the data directory and the log; deleted on drop.
    dir: tempfile::TempDir,
    port: u16,
    options: ServerOptions,
    run_as: Option<(libc::uid_t, libc::gid_t)>,
    postmaster: Option<Child>,
}

impl LocalServer {
    /// Creates a cluster with `initdb` and starts it. `label` names it in errors and the log file.
    pub fn start(label: &str, options: ServerOptions) -> Result<Self> {
        let bindir = server_bindir()?;
        let run_as = postgres_user_if_root()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("rowsync-{label}-"))
            .tempdir()
            .map_err(|source| io_error("creating a temporary directory", source))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|source| io_error("handing the directory to the postgres user", source))?;
        }
        let mut server = Self {
            label: label.to_string(),
            bindir,
            dir,
            port: 0,
            options,
            run_as,
            postmaster: None,
        };
        server.initdb()?;
        if let Some(hba) = &server.options.hba {
            server.write_data_file("pg_hba.conf", hba)?;
        }
        for (name, contents, mode) in &server.options.files {
            let path = server.write_data_file(name, contents)?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                .map_err(|source| io_error("setting a data file's mode", source))?;
        }
        // A free port found by binding port 0 can be taken by someone else before postgres binds it;
        // then postgres fails to start and another port is tried.
        let mut last_error = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.spawn_postmaster() {
                Ok(()) => return Ok(server),
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or_else(|| io_error("starting", io::Error::other("no attempt made"))))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// A libpq URL for `dbname` as the superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{dbname}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Creates a database (connecting to `postgres`).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(|source| Error::Sql {
                    server: self.label.clone(),
                    action: "connecting".into(),
                    source,
                })?;
        let driver = tokio::spawn(connection);
        let result = client
            .batch_execute(&format!("CREATE DATABASE {}", quote(name)))
            .await;
        drop(client);
        let _ = driver.await;
        result.map_err(|source| Error::Sql {
            server: self.label.clone(),
            action: format!("creating database {name}"),
            source,
        })
    }

    /// Stops the server with a fast shutdown (like `pg_ctl stop -m fast`) and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        self.signal_and_wait(libc::SIGINT, Duration::from_secs(60))
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port.
    pub fn start_again(&mut self) -> Result<()> {
        if self.postmaster.is_some() {
            return Ok(());
        }
        self.spawn_postmaster()
    }

    /// Fast shutdown, then start (like `pg_ctl restart -m fast`).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Writes a file into the data directory, owned by the server's user (configuration, keys).
    pub fn write_data_file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.data_dir().join(name);
        fs::write(&path, contents).map_err(|source| io_error("writing a data file", source))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|source| io_error("handing a data file to the postgres user", source))?;
        }
        Ok(path)
    }

    /// The last lines of the server log, for diagnosing a failure.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn initdb(&self) -> Result<()> {
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| io_error("running initdb", source))?;
        if !output.status.success() {
            return Err(io_error(
                "initdb failed",
                io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string()),
            ));
        }
        Ok(())
    }

    fn spawn_postmaster(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|source| io_error("opening the server log", source))?;
        if let Some((uid, gid)) = self.run_as {
            // Best effort: the log belongs to the test or demo, not to the server.
            let _ = std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid));
        }
        let stderr = log
            .try_clone()
            .map_err(|source| io_error("opening the server log", source))?;
        let mut command = self.command("postgres");
        command.arg("-D").arg(self.data_dir());
        for (name, value) in self.settings() {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command.stdin(Stdio::null()).stdout(log).stderr(stderr);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it runs in the
        // child between fork and exec (after the uid change, which would otherwise clear it).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|source| io_error("starting postgres", source))?;
        self.postmaster = Some(child);
        self.wait_until_ready(Duration::from_secs(60))
    }

    fn settings(&self) -> Vec<(String, String)> {
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1".to_string()),
            ("port", self.port.to_string()),
            ("unix_socket_directories", String::new()),
            ("max_connections", "200".to_string()),
            ("logging_collector", "off".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        if !self.options.durable {
            for (name, value) in [("fsync", "off"), ("synchronous_commit", "off")] {
                settings.push((name.to_string(), value.to_string()));
            }
        }
        if self.options.logical_replication {
            settings.push(("wal_level".to_string(), "logical".to_string()));
        }
        settings.extend(self.options.settings.iter().cloned());
        settings
    }

    /// Ready means postmaster.pid says "ready" (what `pg_ctl -w` waits for).
    fn wait_until_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let pid_file = self.data_dir().join("postmaster.pid");
        loop {
            if let Some(child) = self.postmaster.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.postmaster = None;
                return Err(io_error(
                    "postgres exited during start-up",
                    io::Error::other(format!("{status}; log:\n{}", self.log_tail(20))),
                ));
            }
            let ready = fs::read_to_string(&pid_file)
                .map(|text| text.lines().nth(7).map(str::trim) == Some("ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io_error(
                    "postgres did not become ready",
                    io::Error::new(io::ErrorKind::TimedOut, self.log_tail(20)),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal_and_wait(&mut self, signal: libc::c_int, timeout: Duration) -> Result<()> {
        let Some(mut child) = self.postmaster.take() else {
            return Ok(());
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of our own child, which we have not yet reaped.
        unsafe {
            libc::kill(pid, signal);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io_error(
                        "postgres did not stop in time",
                        io::Error::new(io::ErrorKind::TimedOut, "killed"),
                    ));
                }
                Err(source) => return Err(io_error("waiting for postgres to stop", source)),
            }
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bindir.join(program));
        command.current_dir(self.dir.path());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        // Immediate shutdown: nothing here is worth a checkpoint.
        let _ = self.signal_and_wait(libc::SIGQUIT, Duration::from_secs(30));
    }
}

/// The directory holding `initdb` and `postgres`: `ROWSYNC_PG_BINDIR`, else `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin` (Debian's layout), else `PATH`.
pub fn server_bindir() -> Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("ROWSYNC_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(io_error(
                "ROWSYNC_PG_BINDIR has no initdb and postgres",
                io::Error::new(io::ErrorKind::NotFound, dir.display().to_string()),
            ))
        };
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut debian: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    debian.sort();
    if let Some((_, dir)) = debian.pop() {
        return Ok(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(io_error(
        "PostgreSQL server binaries (initdb, postgres) not found",
        io::Error::new(
            io::ErrorKind::NotFound,
            "install Debian's postgresql package, or set ROWSYNC_PG_BINDIR to the directory holding initdb",
        ),
    ))
}

/// PostgreSQL refuses to run as root; as root, servers run as the `postgres` user.
fn postgres_user_if_root() -> Result<Option<(libc::uid_t, libc::gid_t)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name =
        CString::new("postgres").map_err(|err| io_error("user name", io::Error::other(err)))?;
    // SAFETY: getpwnam returns null or a pointer to static storage, read at once (no other thread
    // of ours calls getpwnam concurrently while a server starts).
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(io_error(
            "running as root, and there is no postgres user to run the server as",
            io::Error::new(
                io::ErrorKind::NotFound,
                "create it, or run rowsync as another user",
            ),
        ));
    }
    // SAFETY: checked non-null above.
    let entry = unsafe { &*entry };
    Ok(Some((entry.pw_uid, entry.pw_gid)))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|source| io_error("finding a free port", source))?;
    let port = listener
        .local_addr()
        .map_err(|source| io_error("finding a free port", source))?
        .port();
    Ok(port)
}

fn io_error(action: &str, source: io::Error) -> Error {
    Error::Io {
        action: action.to_string(),
        source,
    }
}

/// A quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
