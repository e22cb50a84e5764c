//! The command line as users meet it: configuration errors, verify's verdicts, the demo, the
//! hand-installed SQL, and shutdown.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Pair, USERS, count, seed_users, slow_writes};

fn rowsync(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_rowsync"))
        .args(args)
        .current_dir(dir.path())
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

const GOOD: [(&str, &str); 2] = [
    (
        "SOURCE_DATABASE_URL",
        "postgres://app:pw-source-secret@127.0.0.1:1/backend",
    ),
    (
        "TARGET_DATABASE_URL",
        "postgres://app:pw-target-secret@127.0.0.1:1/chat",
    ),
];

#[test]
fn bad_configuration_exits_2_with_one_line_naming_the_variable() {
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![GOOD[1]], "SOURCE_DATABASE_URL"),
        (
            vec![GOOD[0], GOOD[1], ("SYNC_INTERVAL_MINUTES", "soon")],
            "SYNC_INTERVAL_MINUTES",
        ),
        (
            vec![GOOD[0], GOOD[1], ("CHAT_DB_POOL_SIZE", "0")],
            "CHAT_DB_POOL_SIZE",
        ),
        (vec![GOOD[0], GOOD[1], ("LOG_FORMAT", "yaml")], "LOG_FORMAT"),
        (
            vec![GOOD[0], GOOD[1], ("SYNC_TABLES", "users;drop")],
            "SYNC_TABLES",
        ),
        (
            vec![
                (
                    "SOURCE_DATABASE_URL",
                    "postgres://u:hunter2-secret@host:port/db",
                ),
                GOOD[1],
            ],
            "SOURCE_DATABASE_URL",
        ),
    ];
    for (env, variable) in cases {
        for command in ["setup", "run", "verify"] {
            let output = rowsync(&env, &[command]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command} with {env:?}: {stderr}"
            );
            assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
            assert!(
                stderr.starts_with(&format!("error: {variable}: ")),
                "{stderr}"
            );
            assert!(!stderr.contains("secret"), "password leaked: {stderr}");
        }
    }
}

#[test]
fn connection_failures_never_show_the_password() {
    // Nothing listens on port 1: every command fails to connect.
    for command in ["setup", "verify"] {
        let output = rowsync(&GOOD, &[command]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(1), "{all}");
        assert!(
            all.contains("app@127.0.0.1:1/"),
            "the database is not named: {all}"
        );
        assert!(!all.contains("secret"), "password leaked: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_says_consistent_or_inconsistent_and_exits_accordingly() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 200).await;
    pair.setup();
    let output = pair.rowsync(&["verify"], &[]);
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert!(
        report.contains("public.users") && report.contains("CONSISTENT"),
        "{report}"
    );
    assert!(
        report
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()[1..5]
            == ["200", "200", "0", "200"],
        "{report}"
    );

    // Same row count, different contents: still inconsistent.
    pair.target()
        .await
        .execute(
            "UPDATE users SET status = 'tampered' WHERE name = 'user-5'",
            &[],
        )
        .await
        .unwrap();
    let output = pair.rowsync(&["verify", "--attempts", "1"], &[]);
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(
        report.contains("INCONSISTENT") && report.contains("differ"),
        "{report}"
    );

    // A missing row shows in the counts.
    pair.target()
        .await
        .execute("DELETE FROM users WHERE name = 'user-6'", &[])
        .await
        .unwrap();
    let output = pair.rowsync(&["verify", "--attempts", "1"], &[]);
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("  200         199           1"), "{report}");
}

#[test]
fn demo_runs_end_to_end_and_leaves_no_server_behind() {
    let output = rowsync(
        &[("PATH", &std::env::var("PATH").unwrap())],
        &["demo", "--seconds", "3", "--rate", "50", "--rows", "200"],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "$ rowsync setup",
        "capture installed; copied",
        "$ rowsync run",
        "$ rowsync verify",
        "CONSISTENT",
        "sync_errors rows: 0",
        "stopped and deleted",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // Both servers' ports were printed; nothing may listen there any more.
    for line in stdout
        .lines()
        .filter(|l| l.contains("postgres://postgres@127.0.0.1:"))
    {
        let port: u16 = line
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "server on {port} still running"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_files_install_by_hand_with_psql_as_the_readme_shows() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 10).await;
    let psql = rowsync_sandbox::server_bindir().unwrap().join("psql");
    let root = env!("CARGO_MANIFEST_DIR");
    let run_psql = |url: String, args: &[&str]| {
        let output = Command::new(&psql)
            .arg(url)
            .args(["-v", "ON_ERROR_STOP=1", "-q"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "psql {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run_psql(
        pair.source_url(),
        &["-f", &format!("{root}/sql/capture.sql")],
    );
    run_psql(
        pair.source_url(),
        &["-c", "SELECT rowsync.install_capture('public.users')"],
    );
    for migration in ["001_sync_errors.sql", "002_rowsync_progress.sql"] {
        run_psql(
            pair.target_url(),
            &["-f", &format!("{root}/migrations/{migration}")],
        );
    }
    // The binary finds everything in place and only copies.
    let summary = pair.setup();
    assert!(
        summary.contains("capture already installed; copied 10 rows"),
        "{summary}"
    );
    // The sync_errors queries operators run must work as written.
    let target = pair.target().await;
    for query in [
        "SELECT * FROM sync_errors WHERE created_at > NOW() - INTERVAL '1 hour' ORDER BY created_at DESC;",
        "SELECT error_type, COUNT(*), MAX(created_at) as last_occurrence FROM sync_errors GROUP BY error_type ORDER BY COUNT(*) DESC;",
        "SELECT * FROM sync_errors WHERE resolved = FALSE ORDER BY created_at DESC;",
    ] {
        target.simple_query(query).await.unwrap();
    }
}

/// A source whose capture objects an earlier rowsync installed (before their version was
/// recorded, or of a lower one) is named at the daemon's start and by `rowsync status`, with what
/// to do; once `rowsync setup` has run again, neither says anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_objects_of_an_older_rowsync_are_reported_until_setup_runs_again() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 5).await;
    pair.setup();
    let source = pair.source().await;
    let older = [
        "DROP FUNCTION rowsync.capture_sql_version()",
        "CREATE FUNCTION rowsync.capture_sql_version() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
    ];
    for (older, version) in older.iter().zip([0, 1]) {
        source.batch_execute(older).await.unwrap();
        let expected = format!("from an older rowsync (version {version},");
        let status = pair.rowsync(&["status"], &[]);
        let status = String::from_utf8_lossy(&status.stdout).to_string();
        assert!(status.contains(&expected), "{status}");
        assert!(status.contains("`rowsync setup` runs again"), "{status}");
        let mut daemon = pair.spawn(&[]);
        pair.wait_logged(
            &daemon,
            "the daemon to start",
            "sync loop started",
            Duration::from_secs(20),
        )
        .await;
        assert!(
            daemon.log_text().contains(&expected),
            "{}",
            daemon.log_text()
        );
        daemon.signal(libc::SIGTERM);
        assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    }

    pair.setup();
    let status = pair.rowsync(&["status"], &[]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(!status.contains("older rowsync"), "{status}");
    let daemon = pair.spawn(&[]);
    pair.wait_logged(
        &daemon,
        "the daemon to start",
        "sync loop started",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        !daemon.log_text().contains("capture objects"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    // Each target update takes 20 ms, so a batch of 100 changed rows is in flight for 2 s.
    let slow_updates = format!("{USERS}{}", slow_writes("users", "UPDATE", 0.02));
    let pair = Pair::with_ddl(USERS, &slow_updates).await;
    seed_users(&pair.source().await, 100).await;
    pair.setup();
    let mut daemon = pair.spawn(&[("SHUTDOWN_TIMEOUT_SECONDS", "20")]);
    daemon.wait_listening(&pair).await;
    let source = pair.source().await;
    let target = pair.target().await;
    source
        .execute("UPDATE users SET version = version + 1", &[])
        .await
        .unwrap();
    pair.wait(
        "the batch to be in flight",
        Duration::from_secs(20),
        || async {
            count(
                &target,
                "SELECT count(*) FROM pg_stat_activity \
              WHERE application_name = 'rowsync' AND wait_event = 'PgSleep'",
            )
            .await
                > 0
        },
    )
    .await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(
        log.contains("shutting down") && log.contains("sync loop stopped"),
        "{log}"
    );
    // The batch that was in flight at the signal finished before the process exited.
    assert_eq!(
        count(&target, "SELECT count(*) FROM users WHERE version = 2").await,
        100,
        "{log}"
    );
    pair.assert_synced("users").await;
}

/// A target whose inserts take about 2 ms each, so that copying 3,000 rows takes several seconds
/// (rows of 20 kB, so that they do not all fit into the sockets' buffers at once).
async fn pair_with_a_slow_copy() -> Pair {
    let slow_target = format!("{USERS}{}", slow_writes("users", "INSERT", 0.002));
    let pair = Pair::with_ddl(USERS, &slow_target).await;
    let source = pair.source().await;
    seed_users(&source, 3000).await;
    for sql in [
        "UPDATE users SET bio = repeat(md5(id::text), 625)",
        "VACUUM ANALYZE users",
    ] {
        source.batch_execute(sql).await.unwrap();
    }
    pair
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_copy_logs_its_progress_every_few_seconds_when_not_on_a_terminal() {
    let pair = pair_with_a_slow_copy().await;
    let output = pair.rowsync(&["setup"], &[("LOG_FORMAT", "json")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|line: &serde_json::Value| line["message"] == "copying")
        .collect();
    assert!(
        lines.len() >= 2,
        "expected a line at the start and later ones: {stderr}"
    );
    // The estimate is the planner's row count, there from the first line on.
    for line in &lines {
        assert_eq!(line["table"], "public.users", "{line}");
        assert_eq!(line["estimated_rows"], 3000, "{line}");
    }
    assert_eq!(lines[0]["rows"], 0, "{}", lines[0]);
    let later = &lines[1];
    let rows = later["rows"].as_u64().unwrap();
    assert!(rows > 0 && rows < 3000, "{later}");
    assert!(later["rows_per_second"].as_u64().unwrap() > 0, "{later}");
    assert!(later["eta_seconds"].as_u64().is_some(), "{later}");
    assert!(later["percent"].as_u64().unwrap() < 100, "{later}");
    pair.assert_synced("users").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_copy_shows_a_live_line_on_a_terminal() {
    let pair = pair_with_a_slow_copy().await;
    // `script` runs setup on a pseudo-terminal and records what it drew.
    let setup = format!("{} setup", env!("CARGO_BIN_EXE_rowsync"));
    let output = Command::new("script")
        .args(["-qec", &setup, "/dev/null"])
        .current_dir(pair.dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERM", "xterm")
        .envs(pair.env())
        .env("LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{screen}");
    for expected in ["copying public.users", "/~3,000 rows", "rows/s", "left"] {
        assert!(
            screen.contains(expected),
            "missing {expected:?} in:\n{screen}"
        );
    }
    // The line ends complete.
    assert!(screen.contains("3,000/~3,000 rows"), "{screen}");
    pair.assert_synced("users").await;
}
