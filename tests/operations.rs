//! Operations against real running rowsync processes: systemd notifications, the HTTP endpoints,
//! `rowsync status` and `sync-now`, sync_runs, JSON logs, and hot-standby failover.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::proxy::Proxy;
use crate::harness::{Daemon, Pair, USERS, count, free_port, resilient_writes, seed_users};

async fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let method = rowsync::ops::http::Method::from_bytes(method.as_bytes()).unwrap();
    rowsync::ops::http::request(([127, 0, 0, 1], port).into(), method.clone(), path, None)
        .await
        .unwrap_or_else(|err| panic!("{method} {path}: {err}"))
}

async fn json(port: u16, path: &str) -> (u16, Value) {
    let (code, body) = http(port, "GET", path).await;
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path} is not JSON: {body}")),
    )
}

/// A daemon serving HTTP on a free port, sweeping once an hour (with `extra_env`), once its
/// listener is connected and its first sweep is done.
async fn serving(pair: &Pair, extra_env: &[(&str, &str)]) -> (Daemon, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = vec![("HEALTH_ADDR", &addr), ("SYNC_INTERVAL_MINUTES", "60")];
    env.extend_from_slice(extra_env);
    let daemon = pair.spawn(&env);
    daemon.wait_listening(pair).await;
    pair.wait("the first sweep", Duration::from_secs(20), || async {
        json(port, "/status").await.1["sweeps"] == 1
    })
    .await;
    (daemon, port)
}

/// Every datagram a fake systemd receives, with when it arrived.
struct FakeSystemd {
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeSystemd {
    fn start() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => sink.lock().unwrap().push((
                        Instant::now(),
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                    )),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
                if Arc::strong_count(&sink) == 1 {
                    return;
                }
            }
        });
        FakeSystemd {
            messages,
            path,
            _dir: dir,
        }
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    fn position(&self, prefix: &str) -> Option<usize> {
        self.messages()
            .iter()
            .position(|(_, m)| m.starts_with(prefix))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_status_watchdog_and_stopping_in_order() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 50).await;
    pair.setup();
    let systemd = FakeSystemd::start();
    let socket = systemd.path.to_str().unwrap().to_string();
    let proxy = Proxy::start(pair.source.port()).await;
    let source_url = proxy.url("app");
    let mut daemon = pair.spawn(&[
        ("NOTIFY_SOCKET", &socket),
        ("WATCHDOG_USEC", "2000000"),
        ("SOURCE_DATABASE_URL", &source_url),
        ("STATEMENT_TIMEOUT_SECONDS", "4"),
    ]);
    pair.wait("READY=1", Duration::from_secs(20), || async {
        systemd.position("READY=1").is_some()
    })
    .await;
    pair.wait(
        "a STATUS line with the last sweep",
        Duration::from_secs(20),
        || async {
            systemd
                .messages()
                .iter()
                .any(|(_, m)| m.starts_with("STATUS=active; last sweep"))
        },
    )
    .await;
    pair.wait("watchdog pings", Duration::from_secs(10), || async {
        systemd
            .messages()
            .iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .count()
            >= 3
    })
    .await;

    // A loop that is stuck (here: every source call hangs until its timeout) must not be pinged
    // for: systemd would restart it.
    proxy.black_hole();
    let stuck_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pings: Vec<Instant> = systemd
        .messages()
        .iter()
        .filter(|(at, m)| m == "WATCHDOG=1" && *at > stuck_at)
        .map(|(at, _)| *at)
        .collect();
    let longest_gap = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .chain(pings.first().map(|first| *first - stuck_at))
        .chain(
            pings
                .last()
                .map(|last| stuck_at + Duration::from_secs(4) - *last),
        )
        .max()
        .unwrap_or(Duration::from_secs(4));
    assert!(
        longest_gap >= Duration::from_secs(2),
        "watchdog kept pinging a stuck loop: {pings:?}"
    );
    proxy.heal().await;
    let healed_at = Instant::now();
    pair.wait(
        "watchdog pings to resume",
        Duration::from_secs(30),
        || async {
            systemd
                .messages()
                .iter()
                .any(|(at, m)| m == "WATCHDOG=1" && *at > healed_at + Duration::from_secs(1))
        },
    )
    .await;

    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));
    let messages: Vec<String> = systemd.messages().into_iter().map(|(_, m)| m).collect();
    let ready = messages.iter().position(|m| m == "READY=1").unwrap();
    let stopping = messages
        .iter()
        .position(|m| m == "STOPPING=1")
        .expect("STOPPING=1");
    assert_eq!(
        messages.iter().filter(|m| *m == "READY=1").count(),
        1,
        "{messages:?}"
    );
    assert!(ready < stopping);
    assert!(
        messages[ready..stopping]
            .iter()
            .any(|m| m.starts_with("STATUS="))
    );
    assert!(messages[ready..stopping].iter().any(|m| m == "WATCHDOG=1"));
    assert!(
        messages[stopping..].iter().all(|m| m == "STOPPING=1"),
        "nothing but STOPPING after STOPPING: {messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_status_and_sync_now_report_what_happened() {
    let mut pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 20).await;
    pair.setup();
    let (mut daemon, port) = serving(&pair, &[]).await;
    // What `rowsync status` and `sync-now` need to find the daemon.
    let addr = format!("127.0.0.1:{port}");
    let env: Vec<(&str, &str)> = vec![("HEALTH_ADDR", &addr)];

    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO users (name) SELECT 'new-' || g FROM generate_series(1, 10) g;
             UPDATE users SET status = 'away' WHERE name IN ('user-1', 'user-2', 'user-3', 'user-4', 'user-5');
             DELETE FROM users WHERE name IN ('user-6', 'user-7');",
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;

    let (code, health) = json(port, "/health").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "HEALTHY", "{health}");
    for check in [
        "sweep_duration",
        "error_rate",
        "pool_usage_source",
        "pool_usage_target",
        "consecutive_failures",
        "realtime",
        "sweep_overdue",
        "replication_lag",
        "capture",
    ] {
        assert_eq!(health["checks"][check]["ok"], true, "{check}: {health}");
    }
    assert_eq!(health["recommendations"][0], "All systems operational.");

    let (_, status) = json(port, "/status").await;
    assert_eq!(status["totalSynced"], 17, "{status}");
    let users = &status["tables"]["public.users"];
    assert_eq!(
        (
            users["created"].as_u64(),
            users["updated"].as_u64(),
            users["deleted"].as_u64()
        ),
        (Some(10), Some(5), Some(2)),
        "{status}"
    );
    assert_eq!(status["isRealTimeActive"], true);
    assert_eq!(status["isSyncInProgress"], false);
    assert_eq!(status["consecutiveFailures"], 0);
    assert_eq!(status["errors"], 0);
    assert_eq!(status["role"], "active");
    assert_eq!(status["healthStatus"]["status"], "HEALTHY");
    assert!(
        status["lastSyncTime"].as_str().unwrap().ends_with('Z'),
        "{status}"
    );
    assert!(status["lastSyncDuration"].as_u64().is_some());
    assert!(status["lagSeconds"].as_f64().unwrap() < 5.0, "{status}");

    let (code, metrics) = http(port, "GET", "/metrics").await;
    assert_eq!(code, 200);
    for expected in [
        "rowsync_changes_applied_total{operation=\"created\",table=\"public.users\"} 10",
        "rowsync_changes_applied_total{operation=\"updated\",table=\"public.users\"} 5",
        "rowsync_changes_applied_total{operation=\"deleted\",table=\"public.users\"} 2",
        "rowsync_realtime_connected 1",
        "rowsync_active 1",
        "rowsync_sweep_duration_seconds_count 1",
        "rowsync_journal_pending{table=\"public.users\"} 0",
        "rowsync_pool_max_size{database=\"source\"} 10",
        "rowsync_build_info{version=\"",
        "# TYPE rowsync_lag_seconds gauge",
        "# TYPE rowsync_sync_errors_total counter",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in\n{metrics}"
        );
    }

    // POST /sync starts a sweep at once; asked again straight away, it says one is on its way.
    let (code, body) = http(port, "POST", "/sync").await;
    assert_eq!(code, 202, "{body}");
    let (code, body) = http(port, "POST", "/sync").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("already running or queued"), "{body}");
    pair.wait("the requested sweep", Duration::from_secs(10), || async {
        json(port, "/status").await.1["sweeps"] == 2
    })
    .await;
    let output = pair.rowsync(&["sync-now"], &env);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("a sweep starts now"));

    let output = pair.rowsync(&["status"], &env);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(text.contains(": active, HEALTHY"), "{text}");
    assert!(
        text.contains("public.users: 10 created, 5 updated, 2 deleted"),
        "{text}"
    );

    // The source goes away: attempts fail in a row, and health says so with a 503.
    tokio::task::block_in_place(|| pair.source.stop()).unwrap();
    pair.wait(
        "health to turn unhealthy",
        Duration::from_secs(30),
        || async { http(port, "GET", "/health").await.0 == 503 },
    )
    .await;
    let (_, health) = json(port, "/health").await;
    assert_eq!(health["status"], "UNHEALTHY");
    assert_eq!(
        health["checks"]["consecutive_failures"]["ok"], false,
        "{health}"
    );
    assert!(
        health["recommendations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("accept connections")),
        "{health}"
    );
    let (_, metrics) = http(port, "GET", "/metrics").await;
    assert!(
        metrics.contains("rowsync_sync_errors_total{type=\"CONNECTION_ERROR\"}"),
        "{metrics}"
    );
    tokio::task::block_in_place(|| pair.source.start_again()).unwrap();
    pair.wait("health to recover", Duration::from_secs(30), || async {
        http(port, "GET", "/health").await.0 == 200
    })
    .await;

    // With the daemon gone, status reads the databases.
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));
    let output = pair.rowsync(&["status"], &env);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains(&format!("No rowsync daemon answers at {addr}")),
        "{text}"
    );
    assert!(text.contains("public.users: copied 20"), "{text}");
    assert!(
        text.contains("0 journaled changes pending; 0 unresolved sync_errors; capture in place"),
        "{text}"
    );
    let output = pair.rowsync(&["sync-now"], &env);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no rowsync daemon answers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_runs_records_copies_and_sweeps_and_prunes_old_history() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 30).await;
    pair.setup();
    let target = pair.target().await;
    let copy = target
        .query_one(
            "SELECT kind, table_name, status, created, finished_at IS NOT NULL FROM sync_runs",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            copy.get::<_, String>(0),
            copy.get::<_, String>(1),
            copy.get::<_, String>(2),
            copy.get::<_, i64>(3),
            copy.get::<_, bool>(4)
        ),
        (
            "copy".into(),
            "public.users".into(),
            "succeeded".into(),
            30,
            true
        )
    );
    // History older than the retention, a run a crashed process left "running", and one of
    // another rowsync process that is still there (its lock session is connected).
    target
        .batch_execute(
            "INSERT INTO sync_runs (kind, started_at, finished_at, status) VALUES ('sweep', now() - interval '40 days', now() - interval '40 days', 'succeeded');
             INSERT INTO sync_runs (kind, instance, status) VALUES ('sweep', 'gone-host:1', 'running');
             INSERT INTO sync_runs (kind, table_name, instance, status) VALUES ('copy', 'public.other', 'live-host:2', 'running');",
        )
        .await
        .unwrap();
    let live = pair.target().await;
    live.batch_execute("SET application_name = 'rowsync-leader live-host:2'")
        .await
        .unwrap();
    let _daemon = pair.spawn(&[
        ("SYNC_INTERVAL_MINUTES", "0.01"),
        ("SYNC_RUNS_RETENTION_DAYS", "30"),
    ]);
    pair.source()
        .await
        .execute(
            "UPDATE users SET status = 'swept' WHERE name = 'user-3'",
            &[],
        )
        .await
        .unwrap();
    pair.wait("three finished sweeps", Duration::from_secs(20), || async {
        count(
            &target,
            "SELECT count(*) FROM sync_runs WHERE kind = 'sweep' AND status = 'succeeded'",
        )
        .await
            >= 3
    })
    .await;
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM sync_runs WHERE started_at < now() - interval '30 days'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&target, "SELECT count(*) FROM sync_runs WHERE instance = 'gone-host:1' AND status = 'failed' AND error LIKE 'interrupted%'").await,
        1
    );
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM sync_runs WHERE instance = 'live-host:2' AND status = 'running'"
        )
        .await,
        1
    );
    let sweep = target
        .query_one(
            "SELECT instance, unchanged + updated FROM sync_runs WHERE kind = 'sweep' AND status = 'succeeded' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert!(
        sweep
            .get::<_, String>(0)
            .ends_with(&format!(":{}", _daemon.pid()))
    );
    assert!(
        sweep.get::<_, i64>(1) >= 30,
        "the first sweep re-reads the recently updated rows"
    );
    pair.wait_synced("users", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_without_passwords_or_row_contents() {
    let target_ddl = format!(
        "{USERS} ALTER TABLE users ADD CONSTRAINT no_secrets CHECK (bio NOT LIKE '%ROW-SECRET%');"
    );
    let pair = Pair::with_ddl(USERS, &target_ddl).await;
    seed_users(&pair.source().await, 10).await;
    pair.setup();
    // Trust authentication ignores the password, but rowsync must never print it.
    let source_url = pair
        .source_url()
        .replace("postgres@", "postgres:PW-SECRET-123@");
    let mut daemon = pair.spawn(&[
        ("LOG_FORMAT", "json"),
        ("LOG_LEVEL", "debug"),
        ("SOURCE_DATABASE_URL", &source_url),
    ]);
    daemon.wait_listening(&pair).await;
    pair.source()
        .await
        .execute(
            "UPDATE users SET bio = 'my ROW-SECRET value' WHERE name = 'user-4'",
            &[],
        )
        .await
        .unwrap();
    let target = pair.target().await;
    pair.wait(
        "the rejected row to be recorded",
        Duration::from_secs(20),
        || async { count(&target, "SELECT count(*) FROM sync_errors").await == 1 },
    )
    .await;
    // sync_errors, in the operators' own database, does keep the server's detail.
    let trace: String = target
        .query_one("SELECT stack_trace FROM sync_errors", &[])
        .await
        .unwrap()
        .get(0);
    assert!(trace.contains("ROW-SECRET"), "{trace}");
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));

    let log = daemon.log_text();
    let mut messages = Vec::new();
    for line in log.lines() {
        let object: Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not one JSON object: {line}"));
        assert!(
            object["timestamp"].is_string() && object["level"].is_string(),
            "{line}"
        );
        messages.push(object["message"].as_str().unwrap_or_default().to_string());
    }
    for expected in [
        "rowsync starting",
        "sync loop started",
        "target rejected a row; recorded in sync_errors, retried by later sweeps",
        "rowsync stopped",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no {expected:?} in {messages:?}"
        );
    }
    assert!(!log.contains("PW-SECRET"), "password in the log");
    assert!(!log.contains("ROW-SECRET"), "row contents in the log");
}

/// Starts a daemon for the HA test: debug logs, fast retries.
fn ha_daemon(pair: &Pair) -> Daemon {
    pair.spawn(&[("SYNC_INTERVAL_MINUTES", "0.05")])
}

fn is_active(daemon: &Daemon) -> bool {
    daemon.log_text().contains("holding the leader lock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_processes_applies_and_a_standby_takes_over_within_5_seconds() {
    let pair = Pair::new(USERS).await;
    // Every write to the target records which rowsync process made it.
    pair.target()
        .await
        .batch_execute(
            "CREATE TABLE audit (seq bigserial PRIMARY KEY, instance text);
             CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO audit (instance) VALUES (current_setting('rowsync.instance', true));
                 RETURN NULL;
             END $$;
             CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON users
                 FOR EACH ROW EXECUTE FUNCTION audit();",
        )
        .await
        .unwrap();
    seed_users(&pair.source().await, 200).await;
    pair.setup();
    pair.target()
        .await
        .batch_execute("TRUNCATE audit")
        .await
        .unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(resilient_writes(pair.source_url(), stop.clone())))
        .collect();
    let mut first = ha_daemon(&pair);
    pair.wait("one active instance", Duration::from_secs(20), || async {
        is_active(&first)
    })
    .await;
    let mut second = ha_daemon(&pair);
    pair.wait_logged(
        &second,
        "the second to stand by",
        "standing by",
        Duration::from_secs(20),
    )
    .await;
    assert!(!is_active(&second));

    let mut takeovers = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // kill -9 the active one; the standby must take over within 5 s.
        first.kill9();
        let killed = Instant::now();
        pair.wait(
            "the standby to take over",
            Duration::from_secs(10),
            || async { is_active(&second) },
        )
        .await;
        takeovers.push(killed.elapsed());
        // The killed one comes back, as a standby.
        std::mem::swap(&mut first, &mut second);
        second = ha_daemon(&pair);
        pair.wait_logged(
            &second,
            "the restarted process to stand by",
            "standing by",
            Duration::from_secs(20),
        )
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    pair.wait_synced("users", Duration::from_secs(30)).await;
    for took in &takeovers {
        assert!(
            *took < Duration::from_secs(5),
            "takeovers took {takeovers:?}"
        );
    }

    // Never two appliers at once: the audited writes come from one process at a time, so the
    // writing process changes at most once per takeover.
    let instances: Vec<Option<String>> = pair
        .target()
        .await
        .query("SELECT instance FROM audit ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing = instances.iter().filter(|i| i.is_none()).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} writes without rowsync.instance",
        instances.len()
    );
    let switches = instances.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches <= takeovers.len(),
        "{switches} switches between writers for {} takeovers",
        takeovers.len()
    );
    assert!(instances.len() > 100, "too few writes: {}", instances.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_loses_its_connection_and_says_what_it_is() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 100).await;
    pair.setup();
    // The first process reaches the target through a proxy that the test can cut.
    let proxy = Proxy::start(pair.target.port()).await;
    let target_url = proxy.url("app");
    let leader_port = free_port();
    let leader_addr = format!("127.0.0.1:{leader_port}");
    let leader = pair.spawn(&[
        ("TARGET_DATABASE_URL", &target_url),
        ("HEALTH_ADDR", &leader_addr),
    ]);
    pair.wait(
        "the first process to lead",
        Duration::from_secs(20),
        || async { is_active(&leader) },
    )
    .await;

    let systemd = FakeSystemd::start();
    let socket = systemd.path.to_str().unwrap().to_string();
    let standby_port = free_port();
    let standby_addr = format!("127.0.0.1:{standby_port}");
    let standby = pair.spawn(&[("HEALTH_ADDR", &standby_addr), ("NOTIFY_SOCKET", &socket)]);
    pair.wait_logged(
        &standby,
        "the second to stand by",
        "standing by",
        Duration::from_secs(20),
    )
    .await;

    // A standby is ready and healthy as a standby, does no sweeps, and says so everywhere.
    pair.wait(
        "READY=1 and a standby STATUS",
        Duration::from_secs(10),
        || async {
            systemd.position("READY=1").is_some() && systemd.position("STATUS=standby").is_some()
        },
    )
    .await;
    let (code, health) = json(standby_port, "/health").await;
    assert_eq!(
        (code, health["status"].as_str(), health["role"].as_str()),
        (200, Some("HEALTHY"), Some("standby")),
        "{health}"
    );
    assert!(
        health["recommendations"][0]
            .as_str()
            .unwrap()
            .starts_with("Standing by"),
        "{health}"
    );
    let (code, body) = http(standby_port, "POST", "/sync").await;
    assert_eq!(code, 409, "{body}");
    let (_, metrics) = http(standby_port, "GET", "/metrics").await;
    assert!(metrics.contains("rowsync_active 0"), "{metrics}");
    let (_, status) = json(leader_port, "/status").await;
    assert_eq!(status["role"], "active");

    // The leader's connections to the target break: its lock goes with them, the standby takes
    // over within 5 s, and the old leader stops applying and stands by.
    pair.source()
        .await
        .execute(
            "UPDATE users SET status = 'before-cut' WHERE name = 'user-1'",
            &[],
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(10)).await;
    // Refuse first: a reconnect must not slip in between the cut and the refusal.
    proxy.refuse();
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.cut();
    let cut = Instant::now();
    pair.wait(
        "the standby to take over",
        Duration::from_secs(10),
        || async { is_active(&standby) },
    )
    .await;
    assert!(
        cut.elapsed() < Duration::from_secs(5),
        "took {:?}",
        cut.elapsed()
    );
    pair.wait_logged(
        &leader,
        "the old leader to step down",
        "lost the leader lock",
        Duration::from_secs(10),
    )
    .await;
    pair.source()
        .await
        .execute(
            "UPDATE users SET status = 'after-cut' WHERE name = 'user-2'",
            &[],
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    pair.wait(
        "the new leader's STATUS",
        Duration::from_secs(10),
        || async {
            systemd
                .messages()
                .iter()
                .any(|(_, m)| m.starts_with("STATUS=active"))
        },
    )
    .await;
    proxy.heal().await;
    pair.wait(
        "the old leader to stand by again",
        Duration::from_secs(20),
        || async { json(leader_port, "/status").await.1["role"] == "standby" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_has_samples_from_a_running_rowsync() {
    let target_ddl =
        format!("{USERS} ALTER TABLE users ADD CONSTRAINT no_banned CHECK (status <> 'banned');");
    let pair = Pair::with_ddl(USERS, &target_ddl).await;
    seed_users(&pair.source().await, 10).await;
    pair.setup();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = pair.spawn(&[("HEALTH_ADDR", &addr)]);
    daemon.wait_listening(&pair).await;
    pair.source()
        .await
        .execute(
            "UPDATE users SET status = 'banned' WHERE name = 'user-1'",
            &[],
        )
        .await
        .unwrap();
    pair.wait(
        "the rejected row to show in /status",
        Duration::from_secs(20),
        || async { json(port, "/status").await.1["tables"]["public.users"]["failed"] == 1 },
    )
    .await;
    pair.wait("a sweep after it", Duration::from_secs(20), || async {
        json(port, "/status").await.1["sweeps"].as_u64() >= Some(2)
    })
    .await;
    let (_, metrics) = http(port, "GET", "/metrics").await;
    use rowsync::ops::metrics::*;
    for family in [
        CHANGES_APPLIED,
        SYNC_ERRORS,
        LAG_SECONDS,
        SWEEP_DURATION,
        JOURNAL_PENDING,
        UNRESOLVED_ROWS,
        POOL_SIZE,
        POOL_IN_USE,
        POOL_MAX,
        REALTIME_CONNECTED,
        ACTIVE,
        BATCHES,
        SWEEPS,
        FAILED_ATTEMPTS,
        CONSECUTIVE_FAILURES,
        BUILD_INFO,
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "no TYPE for {family}"
        );
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(family) && !l.starts_with('#')),
            "no sample for {family}:\n{metrics}"
        );
    }
    for sample in [
        // Each attempt counts: the sweeps' retries of the rejected row add to it.
        "rowsync_changes_applied_total{operation=\"failed\",table=\"public.users\"} ",
        "rowsync_sync_errors_total{type=\"CONSTRAINT_VIOLATION\"}",
        "rowsync_unresolved_rows{table=\"public.users\"} 1",
        "rowsync_consecutive_failures 0",
    ] {
        assert!(metrics.contains(sample), "missing {sample:?}:\n{metrics}");
    }
    let lag: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rowsync_lag_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..10.0).contains(&lag), "lag {lag}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_capture_makes_health_critical_until_setup_repairs_it() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_users(&source, 50).await;
    pair.setup();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = pair.spawn(&[("HEALTH_ADDR", &addr), ("SYNC_INTERVAL_MINUTES", "0.01")]);
    daemon.wait_listening(&pair).await;
    pair.wait("a healthy daemon", Duration::from_secs(20), || async {
        http(port, "GET", "/health").await.0 == 200
    })
    .await;

    // Someone disables capture and writes: nothing is journaled.
    source
        .batch_execute(
            "ALTER TABLE users DISABLE TRIGGER rowsync_capture_update;
             UPDATE users SET status = 'uncaptured', version = version + 1 WHERE name = 'user-8';",
        )
        .await
        .unwrap();
    pair.wait(
        "health to report the broken capture",
        Duration::from_secs(20),
        || async {
            let (code, health) = json(port, "/health").await;
            code == 503 && health["checks"]["capture"]["ok"] == false
        },
    )
    .await;
    let (_, health) = json(port, "/health").await;
    assert!(
        health["recommendations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("rowsync setup")),
        "{health}"
    );
    // setup repairs capture (and re-copies, merging); the daemon reloads the progress it moved.
    let summary = pair.setup();
    assert!(
        summary.contains("capture repaired; copied 50 rows"),
        "{summary}"
    );
    pair.wait_synced("users", Duration::from_secs(20)).await;
    pair.wait("health to recover", Duration::from_secs(20), || async {
        http(port, "GET", "/health").await.0 == 200
    })
    .await;
}

/// Sessions that stay active on the source until cancelled.
struct BusySource {
    cancel: Vec<tokio_postgres::CancelToken>,
}

impl BusySource {
    async fn start(pair: &Pair, sessions: usize) -> BusySource {
        let mut cancel = Vec::new();
        for _ in 0..sessions {
            let client = pair.source().await;
            cancel.push(client.cancel_token());
            tokio::spawn(async move {
                let _ = client.simple_query("SELECT pg_sleep(120)").await;
            });
        }
        let source = pair.source().await;
        pair.wait("the busy sessions", Duration::from_secs(10), || async {
            count(
                &source,
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(120)' AND state = 'active'",
            )
            .await
                == sessions as i64
        })
        .await;
        BusySource { cancel }
    }

    async fn stop(self) {
        for token in self.cancel {
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        }
    }
}

/// Sets the user's status to `away`.
async fn away(source: &tokio_postgres::Client, name: &str) {
    source
        .execute(
            "UPDATE users SET status = 'away', updated_at = now() WHERE name = $1",
            &[&name],
        )
        .await
        .unwrap();
}

async fn yielding(port: u16) -> bool {
    json(port, "/status").await.1["yielding"].is_object()
}

/// Six busy sessions, then a change to `name`: the batch that applies it sees the source busy,
/// and rowsync yields.
async fn busy_until_rowsync_yields(pair: &Pair, port: u16, name: &str) -> BusySource {
    let busy = BusySource::start(pair, 6).await;
    // rowsync looks at most every 200 ms and forgets a look after a second: wait for both.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    away(&pair.source().await, name).await;
    pair.wait_synced("users", Duration::from_secs(10)).await;
    pair.wait("rowsync to yield", Duration::from_secs(5), || {
        yielding(port)
    })
    .await;
    busy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_source_is_yielded_to_for_at_most_the_longest_yield_and_nothing_is_lost() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 20).await;
    pair.setup();
    let (mut daemon, port) = serving(
        &pair,
        &[("YIELD_ACTIVE_SESSIONS", "4"), ("YIELD_MAX_SECONDS", "6")],
    )
    .await;
    let source = pair.source().await;
    let update = |name: &'static str| away(&source, name);
    let yielding = || yielding(port);

    // Two busy sessions are below the threshold, even with one of this test's own queries
    // running when rowsync looks: changes keep flowing.
    let two = BusySource::start(&pair, 2).await;
    update("user-1").await;
    pair.wait_synced("users", Duration::from_secs(10)).await;
    update("user-2").await;
    pair.wait_synced("users", Duration::from_secs(10)).await;
    assert!(!yielding().await);
    two.stop().await;

    // Six are above it. The batch that applies user-3 notices, and rowsync defers the next.
    let busy = busy_until_rowsync_yields(&pair, port, "user-3").await;
    update("user-4").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, status) = json(port, "/status").await;
    assert!(status["yielding"].is_object(), "{status}");
    assert!(
        status["sourceActiveSessions"].as_u64() >= Some(4),
        "{status}"
    );
    let (_, metrics) = http(port, "GET", "/metrics").await;
    assert!(metrics.contains("\nrowsync_yielding 1\n"), "{metrics}");
    let addr = format!("127.0.0.1:{port}");
    let output = pair.rowsync(&["status"], &[("HEALTH_ADDR", &addr)]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("yielding to a busy source since"), "{text}");
    assert_eq!(
        count(
            &pair.target().await,
            "SELECT count(*) FROM users WHERE status = 'away'"
        )
        .await,
        3,
        "user-4's change waits while the source is busy"
    );
    // The source calms down: the change arrives well before the longest yield is over.
    busy.stop().await;
    pair.wait_synced("users", Duration::from_secs(3)).await;
    let log = daemon.log_text();
    assert!(log.contains("resuming sync after yielding"), "{log}");
    assert!(!log.contains("still busy after the longest yield"), "{log}");
    let (_, status) = json(port, "/status").await;
    assert!(status["yielding"].is_null(), "{status}");
    assert!(status["yieldedSeconds"].as_f64() > Some(1.0), "{status}");

    // A source that stays busy delays changes by at most YIELD_MAX_SECONDS.
    let busy = busy_until_rowsync_yields(&pair, port, "user-5").await;
    let changed = Instant::now();
    update("user-6").await;
    source
        .execute("DELETE FROM users WHERE name = 'user-7'", &[])
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(15)).await;
    assert!(
        changed.elapsed() > Duration::from_secs(2),
        "the changes should have waited for the yield to run out"
    );
    let log = daemon.log_text();
    assert!(log.contains("still busy after the longest yield"), "{log}");
    busy.stop().await;

    // An operator's POST /sync ends a yield at once.
    let busy = busy_until_rowsync_yields(&pair, port, "user-8").await;
    let asked = Instant::now();
    update("user-9").await;
    let (code, body) = http(port, "POST", "/sync").await;
    assert!(code < 300, "{code} {body}");
    pair.wait_synced("users", Duration::from_secs(10)).await;
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "the change should not have waited for the yield to run out"
    );
    busy.stop().await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
}
