//! The command line as users meet it: configuration errors, verify's verdicts, the demo, the
//! hand-installed SQL, and shutdown.

use std::process::Command;
use std::time::Duration;

use crate::harness::{Pair, USERS, count, seed_users};

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
    let psql = rowsync::ephemeral::server_bindir().unwrap().join("psql");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    let (pair, mut daemon) = Pair::running(100, &[("SHUTDOWN_TIMEOUT_SECONDS", "20")]).await;
    let source = pair.source().await;
    source
        .execute("UPDATE users SET version = version + 1", &[])
        .await
        .unwrap();
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
    // Whatever was not applied before the signal is applied at the next start.
    let _daemon = pair.spawn(&[]);
    pair.wait_synced("users", Duration::from_secs(20)).await;
    assert_eq!(
        count(
            &pair.target().await,
            "SELECT count(*) FROM users WHERE version = 2"
        )
        .await,
        100
    );
}
