//! The benchmark's world: two throwaway servers, the three copies of the users table, and how to
//! start rowsync, psql and pgbench against them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rowsync::catalog::ident::quote;
use rowsync_sandbox::{LocalServer, ServerOptions};
use tokio_postgres::Client;

use crate::db;
use crate::error::{Context, Error, Result};
use crate::subprocess::Proc;

/// The database created on both servers.
pub(crate) const DATABASE: &str = "bench";
/// Synced by rowsync.
pub(crate) const USERS: &str = "users";
/// No capture at all: the baseline.
pub(crate) const PLAIN: &str = "users_plain";
/// Replicated by native logical replication.
pub(crate) const NATIVE: &str = "users_lr";
/// rowsync's journal of `users` on the source.
pub(crate) const JOURNAL: &str = "rowsync.public_users_journal";

/// Settings of both servers (beyond durability, which is on).
pub(crate) const SERVER_SETTINGS: [(&str, &str); 5] = [
    ("shared_buffers", "256MB"),
    ("max_wal_size", "8GB"),
    ("checkpoint_timeout", "30min"),
    ("track_commit_timestamp", "on"),
    ("max_connections", "200"),
];

/// Settings of the target only. The logical replication launcher starts at most one worker per
/// `wal_retrieve_retry_interval` (5 s by default), and any wake-up within that interval of a start
/// postpones the next start by a whole interval: the benchmark creates and enables subscriptions
/// seconds apart, and would otherwise measure that throttle rather than replication.
pub(crate) const TARGET_ONLY_SETTINGS: [(&str, &str); 1] =
    [("wal_retrieve_retry_interval", "100ms")];

/// Progress lines on stderr, stamped with the time since the benchmark started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Log {
    started: Instant,
}

impl Log {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub(crate) fn say(&self, text: &str) {
        eprintln!("[{:>7.1}s] {text}", self.started.elapsed().as_secs_f64());
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The source (logical replication on) and the target, both durable.
pub(crate) struct Servers {
    pub source: LocalServer,
    pub target: LocalServer,
}

impl Servers {
    /// Starts both servers. Call this on the thread that runs main's future: the servers' death
    /// signal follows the thread that started them.
    pub(crate) fn start() -> Result<Self> {
        let settings: Vec<(String, String)> = SERVER_SETTINGS
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let source = LocalServer::start(
            "bench-source",
            ServerOptions {
                durable: true,
                logical_replication: true,
                settings: settings.clone(),
                ..ServerOptions::default()
            },
        )
        .context("starting the source server")?;
        let mut target_settings = settings;
        target_settings.extend(
            TARGET_ONLY_SETTINGS
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        );
        let target = LocalServer::start(
            "bench-target",
            ServerOptions {
                durable: true,
                logical_replication: false,
                settings: target_settings,
                ..ServerOptions::default()
            },
        )
        .context("starting the target server")?;
        Ok(Self { source, target })
    }

    pub(crate) fn source_url(&self) -> String {
        self.source.url(DATABASE)
    }

    pub(crate) fn target_url(&self) -> String {
        self.target.url(DATABASE)
    }
}

/// Everything a measurement needs.
pub(crate) struct Fixture<'a> {
    pub servers: &'a Servers,
    pub log: Log,
    /// Rows in each source table.
    pub rows: u64,
    /// Length of each pgbench run.
    pub seconds: u64,
    pub source: Client,
    pub target: Client,
    rowsync: PathBuf,
    /// Scripts and the children's output; deleted at the end.
    work: tempfile::TempDir,
    spawned: u32,
    /// The running `rowsync run`, if any.
    pub daemon: Option<Proc>,
    /// When a subscription was last created or enabled (see [`crate::native::wait_for_launcher`]).
    pub last_worker_start: Option<Instant>,
    /// Warnings and errors rowsync wrote to stderr, collected from every finished child.
    pub rowsync_log: Vec<String>,
    /// Settings for every rowsync child on top of the benchmark's own (`--rowsync-env`).
    pub rowsync_env: Vec<(String, String)>,
}

impl<'a> Fixture<'a> {
    pub(crate) async fn new(
        servers: &'a Servers,
        log: Log,
        rows: u64,
        seconds: u64,
        rowsync: PathBuf,
    ) -> Result<Self> {
        for server in [&servers.source, &servers.target] {
            server
                .create_database(DATABASE)
                .await
                .with_context(|| format!("creating database {DATABASE}"))?;
        }
        let source = db::connect(&servers.source_url(), "source").await?;
        let target = db::connect(&servers.target_url(), "target").await?;
        let work = tempfile::Builder::new()
            .prefix("rowsync-bench-")
            .tempdir()
            .context("creating a working directory")?;
        Ok(Self {
            servers,
            log,
            rows,
            seconds,
            source,
            target,
            rowsync,
            work,
            spawned: 0,
            daemon: None,
            last_worker_start: None,
            rowsync_log: Vec::new(),
            rowsync_env: Vec::new(),
        })
    }

    pub(crate) fn say(&self, text: &str) {
        self.log.say(text);
    }

    pub(crate) fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Creates the three tables in both databases and fills the source ones with `rows` rows.
    pub(crate) async fn create_tables(&self) -> Result<()> {
        for client in [&self.source, &self.target] {
            for table in [USERS, PLAIN, NATIVE] {
                db::exec(client, &users_ddl(table)).await?;
            }
        }
        self.say(&format!("loading {} rows into {USERS}", self.rows));
        self.source
            .execute(&load_sql(USERS), &[&(self.rows as i64)])
            .await
            .context("loading users")?;
        for table in [PLAIN, NATIVE] {
            self.say(&format!("copying them into {table}"));
            db::exec(
                &self.source,
                &format!(
                    "INSERT INTO {} SELECT * FROM {}",
                    quote(table),
                    quote(USERS)
                ),
            )
            .await?;
        }
        self.say("VACUUM ANALYZE and CHECKPOINT");
        for table in [USERS, PLAIN, NATIVE] {
            db::exec(&self.source, &format!("VACUUM ANALYZE {}", quote(table))).await?;
        }
        self.checkpoint().await
    }

    /// CHECKPOINT on both servers, so every measurement starts with the same full-page-write cost.
    pub(crate) async fn checkpoint(&self) -> Result<()> {
        db::exec(&self.source, "CHECKPOINT").await?;
        db::exec(&self.target, "CHECKPOINT").await
    }

    /// A `rowsync` command with the benchmark's configuration and nothing inherited (no `.env`,
    /// no stray variables), then `--rowsync-env`: `HEALTH_ADDR` is `off` unless `health` is given.
    pub(crate) fn rowsync_command(&self, subcommand: &str, health: Option<SocketAddr>) -> Command {
        let mut command = Command::new(&self.rowsync);
        command
            .arg(subcommand)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SOURCE_DATABASE_URL", self.servers.source_url())
            .env("TARGET_DATABASE_URL", self.servers.target_url())
            .env("SYNC_TABLES", USERS)
            .env(
                "HEALTH_ADDR",
                health.map_or_else(|| "off".to_string(), |addr| addr.to_string()),
            )
            .env("LOG_LEVEL", "warn")
            .env("SYNC_INTERVAL_MINUTES", "1")
            .envs(self.rowsync_env.iter().map(|(name, value)| (name, value)))
            .current_dir(self.work.path());
        command
    }

    /// A program from the PostgreSQL binaries (psql, pgbench).
    pub(crate) fn pg_program(&self, name: &str) -> PathBuf {
        self.servers.source.bindir().join(name)
    }

    /// Starts a child; `name` gets a sequence number so every child keeps its own output files.
    pub(crate) fn spawn(&mut self, name: &str, command: Command) -> Result<Proc> {
        self.spawned += 1;
        Proc::spawn(
            &format!("{:02}-{name}", self.spawned),
            command,
            self.work.path(),
        )
    }

    /// Keeps the warnings and errors a finished rowsync child wrote.
    pub(crate) fn collect_rowsync_log(&mut self, proc: &Proc) {
        for line in proc.stderr().lines() {
            if !line.trim().is_empty() {
                self.rowsync_log.push(format!("{}: {line}", proc.name()));
            }
        }
    }

    /// Starts `rowsync run` and waits until it listens on the source and the journal is empty.
    pub(crate) async fn start_daemon(&mut self, health: Option<SocketAddr>) -> Result<()> {
        if self.daemon.is_some() {
            return Err(Error::msg("a rowsync daemon is already running"));
        }
        let command = self.rowsync_command("run", health);
        let proc = self.spawn("rowsync-run", command)?;
        self.daemon = Some(proc);
        self.wait_listening().await?;
        self.wait_caught_up(Duration::from_secs(600)).await
    }

    /// Waits until the daemon's LISTEN session is connected to the source.
    pub(crate) async fn wait_listening(&mut self) -> Result<()> {
        db::wait_for(
            "rowsync run to listen on the source",
            Duration::from_secs(120),
            Duration::from_millis(20),
            async || {
                if let Some(daemon) = self.daemon.as_mut() {
                    daemon.ensure_running()?;
                }
                let listening = db::int(
                    &self.source,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rowsync-listener'",
                    &[],
                )
                .await?;
                Ok((listening > 0).then_some(()))
            },
        )
        .await
    }

    /// SIGTERM to the daemon, and wait until it has exited (it must exit with status 0).
    pub(crate) async fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut daemon) = self.daemon.take() else {
            return Ok(());
        };
        let exited = daemon.terminate(Duration::from_secs(60)).await;
        self.collect_rowsync_log(&daemon);
        let exited = exited?;
        if !exited.success() {
            return Err(Error::msg(format!(
                "rowsync run did not exit cleanly at SIGTERM ({exited:?}); stderr:\n{}",
                daemon.stderr()
            )));
        }
        Ok(())
    }

    /// Journal rows not yet applied (and deleted) by rowsync.
    pub(crate) async fn journal_depth(&self) -> Result<i64> {
        db::int(
            &self.source,
            &format!("SELECT count(*) FROM {JOURNAL}"),
            &[],
        )
        .await
    }

    /// Waits until the journal is empty: every captured change is in the target.
    pub(crate) async fn wait_caught_up(&mut self, timeout: Duration) -> Result<()> {
        let empty = format!("SELECT (NOT EXISTS (SELECT 1 FROM {JOURNAL}))::int::int8");
        db::wait_for(
            "rowsync to empty the journal",
            timeout,
            Duration::from_millis(20),
            async || {
                if let Some(daemon) = self.daemon.as_mut() {
                    daemon.ensure_running()?;
                }
                Ok((db::int(&self.source, &empty, &[]).await? == 1).then_some(()))
            },
        )
        .await
    }

    /// Row count and a checksum of what the sync changes (status, updated_at) of `table`.
    pub(crate) async fn fingerprint(client: &Client, table: &str) -> Result<(i64, i64)> {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(sum(hashtext(id::text || status || \
                     extract(epoch FROM updated_at)::text)), 0)::int8 FROM {}",
                    quote(table)
                ),
                &[],
            )
            .await
            .with_context(|| format!("fingerprinting {table}"))?;
        Ok((row.get(0), row.get(1)))
    }
}

/// The seed service's users shape.
fn users_ddl(table: &str) -> String {
    let name = quote(table);
    let index = quote(&format!("{table}_updated_at_idx"));
    format!(
        "CREATE TABLE {name} (
            id          uuid PRIMARY KEY,
            first_name  text NOT NULL,
            last_name   text,
            email       text,
            phone       text,
            role        text NOT NULL,
            status      text NOT NULL,
            avatar_url  text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX {index} ON {name} (updated_at);"
    )
}

/// Rows of about 200 bytes with keys `md5(g::text)::uuid` (g = 1..$1), so pgbench can address a
/// random row by key. Timestamps lie 10 to 400 days back: a real table's rows were not all just
/// updated (which would make every sweep's look-back re-read the whole table).
fn load_sql(table: &str) -> String {
    format!(
        "INSERT INTO {} (id, first_name, last_name, email, phone, role, status, avatar_url, \
                         created_at, updated_at)
         SELECT md5(g::text)::uuid, n.first, n.last,
                lower(n.first || '.' || n.last) || g || '@example.com',
                '+1-555-' || lpad((g % 10000000)::text, 7, '0'),
                (ARRAY['customer', 'customer', 'customer', 'provider', 'admin'])[1 + g % 5],
                CASE WHEN g % 4 = 0 THEN 'away' ELSE 'active' END,
                'https://cdn.example.com/avatars/' || md5('avatar' || g) || '.png',
                n.created, n.created + (g % 90) * interval '1 day'
           FROM generate_series(1, $1::int8) AS g,
           LATERAL (SELECT
                (ARRAY['Olivia', 'Liam', 'Emma', 'Noah', 'Amelia', 'Oliver', 'Ava', 'Elijah',
                       'Sophia', 'Mateo', 'Isabella', 'Lucas', 'Mia', 'Levi', 'Harper', 'Ezra'])
                    [1 + g % 16] AS first,
                (ARRAY['Smith', 'Johnson', 'Williams', 'Brown', 'Jones', 'Garcia', 'Miller',
                       'Davis', 'Rodriguez', 'Martinez', 'Hernandez', 'Lopez', 'Gonzalez',
                       'Wilson', 'Anderson', 'Thomas', 'Taylor'])[1 + (g / 16) % 17] AS last,
                now() - interval '400 days' + (g % 300) * interval '1 day'
                      + (g % 86400) * interval '1 second' AS created) AS n",
        quote(table)
    )
}
