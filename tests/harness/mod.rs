//! Test harness: a fresh pair of real PostgreSQL servers per test, the real `rowsync` binary, and
//! waits that fail with a message saying what they waited for.

#![allow(dead_code)]

pub(crate) mod proxy;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rowsync_sandbox::{LocalServer, ServerOptions};
use tokio_postgres::{Client, NoTls};

/// The users table most tests sync: the seed's shape plus a version counter.
pub(crate) const USERS: &str = "
    CREATE TABLE users (
        id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        name       text NOT NULL,
        email      text,
        status     text NOT NULL DEFAULT 'active',
        version    integer NOT NULL DEFAULT 1,
        bio        text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX users_updated_at_idx ON users (updated_at);";

/// A source and a target server, each with a database `app`.
pub(crate) struct Pair {
    pub source: LocalServer,
    pub target: LocalServer,
    /// Working directory of rowsync processes (no stray .env) and home of their logs.
    pub dir: tempfile::TempDir,
}

impl Pair {
    /// Starts both servers and runs `ddl` in both databases.
    pub(crate) async fn new(ddl: &str) -> Pair {
        Self::with_ddl(ddl, ddl).await
    }

    pub(crate) async fn with_ddl(source_ddl: &str, target_ddl: &str) -> Pair {
        Self::with_servers(
            ServerOptions::default(),
            ServerOptions::default(),
            source_ddl,
            target_ddl,
        )
        .await
    }

    /// Like [`Pair::with_ddl`], with servers of these options (authentication, TLS, settings).
    pub(crate) async fn with_servers(
        source_options: ServerOptions,
        target_options: ServerOptions,
        source_ddl: &str,
        target_ddl: &str,
    ) -> Pair {
        let source = LocalServer::start("source", source_options).expect("start source");
        let target = LocalServer::start("target", target_options).expect("start target");
        source
            .create_database("app")
            .await
            .expect("create source db");
        target
            .create_database("app")
            .await
            .expect("create target db");
        let pair = Pair {
            source,
            target,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        pair.source()
            .await
            .batch_execute(source_ddl)
            .await
            .expect("source ddl");
        pair.target()
            .await
            .batch_execute(target_ddl)
            .await
            .expect("target ddl");
        pair
    }

    /// The common start of a test: `users` with `rows` seeded users, set up, and a daemon running
    /// (with `extra_env`) whose listener is connected.
    pub(crate) async fn running(rows: i32, extra_env: &[(&str, &str)]) -> (Pair, Daemon) {
        let pair = Pair::new(USERS).await;
        if rows > 0 {
            seed_users(&pair.source().await, rows).await;
        }
        pair.setup();
        let daemon = pair.spawn(extra_env);
        daemon.wait_listening(&pair).await;
        (pair, daemon)
    }

    pub(crate) fn source_url(&self) -> String {
        self.source.url("app")
    }

    pub(crate) fn target_url(&self) -> String {
        self.target.url("app")
    }

    pub(crate) async fn source(&self) -> Client {
        connect(&self.source_url()).await
    }

    pub(crate) async fn target(&self) -> Client {
        connect(&self.target_url()).await
    }

    /// Environment of a rowsync process: these databases, fast timers.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        [
            ("SOURCE_DATABASE_URL", self.source_url()),
            ("TARGET_DATABASE_URL", self.target_url()),
            ("SYNC_INTERVAL_MINUTES", "0.05".to_string()),
            ("POLL_INTERVAL_MS", "200".to_string()),
            ("RETRY_INITIAL_DELAY", "100".to_string()),
            ("RETRY_MAX_DELAY", "1000".to_string()),
            ("LOG_LEVEL", "debug".to_string()),
            // Tests run in parallel: each HTTP test picks its own port.
            ("HEALTH_ADDR", "off".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn command(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rowsync"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env())
            .envs(
                extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
        command
    }

    /// Runs `rowsync <args>` to completion.
    pub(crate) fn rowsync(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        self.command(args, extra_env).output().expect("run rowsync")
    }

    /// `rowsync setup`, which must succeed.
    pub(crate) fn setup(&self) -> String {
        let output = self.rowsync(&["setup"], &[]);
        assert!(
            output.status.success(),
            "rowsync setup failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts `rowsync run` in the background.
    pub(crate) fn spawn(&self, extra_env: &[(&str, &str)]) -> Daemon {
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.dir.path().join(format!("rowsync-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = self
            .command(&["run"], extra_env)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn rowsync run");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Waits until the target's table equals the source's, row for row.
    pub(crate) async fn wait_synced(&self, table: &str, timeout: Duration) {
        let source = self.source().await;
        let target = self.target().await;
        let deadline = Instant::now() + timeout;
        loop {
            let (s, t) = (
                contents(&source, table).await,
                contents(&target, table).await,
            );
            if s == t {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "target {table} did not converge within {timeout:?}: {}\n{}",
                    describe_difference(&s, &t),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Like [`wait_for`], but a timeout also shows the logs of every rowsync process of this pair.
    pub(crate) async fn wait<F, Fut>(&self, what: &str, timeout: Duration, check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        if !poll_until(timeout, check).await {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.logs()
            );
        }
    }

    /// Waits until `daemon`'s log contains `text` (what it means: `what`).
    pub(crate) async fn wait_logged(
        &self,
        daemon: &Daemon,
        what: &str,
        text: &str,
        timeout: Duration,
    ) {
        self.wait(what, timeout, || async { daemon.log_text().contains(text) })
            .await;
    }

    /// Cuts and refuses `daemon`'s connections through `proxy` (its target) and waits until it
    /// has lost its leader lock.
    pub(crate) async fn lose_the_target(&self, proxy: &proxy::Proxy, daemon: &Daemon) {
        proxy.cut();
        proxy.refuse();
        self.wait_logged(
            daemon,
            "the lead to be lost",
            "lost the leader lock",
            Duration::from_secs(30),
        )
        .await;
    }

    /// The last lines of every rowsync log of this pair, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|dir| dir.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        let mut text = String::new();
        for log in logs {
            let content = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            text.push_str(&format!("--- {} (last 60 lines)\n", log.display()));
            text.push_str(&lines[lines.len().saturating_sub(60)..].join("\n"));
            text.push('\n');
        }
        text
    }

    /// Asserts the target's table equals the source's now.
    pub(crate) async fn assert_synced(&self, table: &str) {
        let s = contents(&self.source().await, table).await;
        let t = contents(&self.target().await, table).await;
        assert!(s == t, "{table} differs: {}", describe_difference(&s, &t));
    }
}

/// A running `rowsync run`. Killed (SIGKILL) on drop if still running.
pub(crate) struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub(crate) fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Whether the process has not exited.
    pub(crate) fn is_running(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        let exists = unsafe { libc::kill(self.pid(), 0) == 0 };
        exists
            && std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .is_ok_and(|stat| !stat.contains(") Z "))
    }

    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child process.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit; returns its status code.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("daemon running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "rowsync did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the listener is connected (its session shows in pg_stat_activity).
    pub(crate) async fn wait_listening(&self, pair: &Pair) {
        let source = pair.source().await;
        wait_for(
            "rowsync's listener to connect",
            Duration::from_secs(20),
            || async { listener_pids(&source).await.len() == 1 },
        )
        .await;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// DDL that makes every row `event` (`INSERT`, `UPDATE`) writes into `table` take `seconds`
/// longer (a trigger that sleeps), so that a copy or a batch stays in flight long enough to act
/// on it meanwhile.
pub(crate) fn slow_writes(table: &str, event: &str, seconds: f64) -> String {
    let name = format!("slow_{}", event.to_lowercase());
    format!(
        "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$;
         CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}();"
    )
}

/// A port nobody listens on at the moment (for HTTP listeners of daemons under test).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Every row of `table` as text, ordered by its primary key.
pub(crate) async fn contents(client: &Client, table: &str) -> Vec<String> {
    let key: String = client
        .query_one(
            "SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) \
               FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
              WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
            &[&table],
        )
        .await
        .expect("primary key")
        .get(0);
    client
        .query(
            &format!("SELECT t::text FROM {table} t ORDER BY {key}"),
            &[],
        )
        .await
        .expect("read contents")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn describe_difference(source: &[String], target: &[String]) -> String {
    let only_source: Vec<&String> = source
        .iter()
        .filter(|r| !target.contains(r))
        .take(3)
        .collect();
    let only_target: Vec<&String> = target
        .iter()
        .filter(|r| !source.contains(r))
        .take(3)
        .collect();
    format!(
        "source has {} rows, target {}; first rows only in source: {only_source:?}; only in target: {only_target:?}",
        source.len(),
        target.len()
    )
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `timeout`.
pub(crate) async fn wait_for<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if !poll_until(timeout, check).await {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `check` every 100 ms; false if it did not hold within `timeout`.
async fn poll_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

pub(crate) async fn listener_pids(source: &Client) -> Vec<i32> {
    source
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'rowsync-listener'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

pub(crate) async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// Inserts `n` users named user-1 … user-n.
pub(crate) async fn seed_users(client: &Client, n: i32) {
    client
        .execute(
            "INSERT INTO users (name, email, bio) \
             SELECT 'user-' || g, 'user' || g || '@example.com', repeat('bio ', g % 20) \
               FROM generate_series(1, $1::int) g",
            &[&n],
        )
        .await
        .expect("seed users");
}

/// `id:xmin` of the users matching `filter` (a WHERE condition), ordered by id: a row rewritten
/// by anyone gets a new xmin.
pub(crate) async fn xmins(client: &Client, filter: &str) -> Vec<String> {
    client
        .query(
            &format!("SELECT id::text || ':' || xmin::text FROM users WHERE {filter} ORDER BY id"),
            &[],
        )
        .await
        .expect("read xmins")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Writes a mix of inserts, updates (each bumps `version`) and deletes until `stop`, reconnecting
/// whenever the server goes away (restarts, cuts). Returns how many statements committed.
pub(crate) async fn resilient_writes(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    use std::sync::atomic::Ordering;
    let statements = [
        "INSERT INTO users (name) VALUES ('r-' || gen_random_uuid())",
        "UPDATE users SET version = version + 1, status = md5(random()::text), updated_at = now() \
          WHERE id = (SELECT id FROM users OFFSET floor(random() * 100) LIMIT 1)",
        "UPDATE users SET version = version + 1, updated_at = now() \
          WHERE id IN (SELECT id FROM users OFFSET floor(random() * 100) LIMIT 10)",
        "DELETE FROM users WHERE id = (SELECT id FROM users OFFSET floor(random() * 100) LIMIT 1)",
    ];
    let mut committed = 0;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(connection);
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            match client.execute(statements[i % statements.len()], &[]).await {
                Ok(_) => committed += 1,
                Err(err) if err.code().is_some() && !client.is_closed() => {}
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    committed
}

/// Sweeps that finished successfully, from `sync_runs`.
pub(crate) async fn finished_sweeps(target: &Client) -> i64 {
    count(
        target,
        "SELECT count(*) FROM sync_runs WHERE kind = 'sweep' AND status = 'succeeded'",
    )
    .await
}

/// Waits until `sweeps` sweeps have finished (as `sync_runs` records them).
pub(crate) async fn wait_for_sweeps(target: &Client, sweeps: i64, timeout: Duration) {
    wait_for(&format!("{sweeps} finished sweeps"), timeout, || async {
        finished_sweeps(target).await >= sweeps
    })
    .await;
}

/// Asserts from `sync_runs` that sweeps ran one after another: each finished before the next one
/// started (so only the last may still be running). Returns how many finished.
pub(crate) async fn assert_sweeps_never_overlapped(pair: &Pair) -> usize {
    let runs: Vec<(String, Option<String>)> = pair
        .target()
        .await
        .query(
            "SELECT started_at::text, finished_at::text FROM sync_runs \
              WHERE kind = 'sweep' ORDER BY started_at",
            &[],
        )
        .await
        .expect("read sync_runs")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for pair_of_runs in runs.windows(2) {
        let (earlier, later) = (&pair_of_runs[0], &pair_of_runs[1]);
        let finished_at = earlier
            .1
            .as_ref()
            .unwrap_or_else(|| panic!("a sweep never finished before the next: {runs:?}"));
        // Both are timestamptz text in the same time zone: text order is time order.
        assert!(
            finished_at <= &later.0,
            "sweeps overlapped: {earlier:?} then {later:?}"
        );
    }
    runs.iter().filter(|r| r.1.is_some()).count()
}

/// GET `path` from a daemon's HTTP listener on `port`: the status code and the body.
pub(crate) async fn http_get(port: u16, path: &str) -> (u16, String) {
    rowsync::ops::http::request(
        ([127, 0, 0, 1], port).into(),
        rowsync::ops::http::Method::GET,
        path,
        None,
    )
    .await
    .unwrap()
}

/// `/health` of a daemon listening on `port`: the status code and the parsed body.
pub(crate) async fn health(port: u16) -> (u16, serde_json::Value) {
    let (code, body) = http_get(port, "/health").await;
    (code, serde_json::from_str(&body).unwrap())
}
