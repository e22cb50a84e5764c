//! Configuration as a newcomer meets it: `.env` values taken literally (as Node's dotenv does),
//! values that are not UTF-8, and numbers past what PostgreSQL and the runtime can honour. Every
//! bad value is exit 2 with one line naming the variable, and never a password.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output};

use rowsync_sandbox::ServerOptions;

use crate::harness::{Pair, USERS, seed_users};

/// `rowsync <args>` in `dir` with exactly `env` (plus PATH), values as raw bytes.
fn rowsync_in(dir: &Path, env: &[(&str, &[u8])], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rowsync"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HEALTH_ADDR", "off")
        .envs(env.iter().map(|(k, v)| (*k, OsStr::from_bytes(v))))
        .output()
        .unwrap()
}

const SOURCE: &[u8] = b"postgres://app:pw-source-secret@127.0.0.1:1/backend";
const TARGET: &[u8] = b"postgres://app:pw-target-secret@127.0.0.1:1/chat";

fn assert_config_error(output: &Output, variable: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{what}: {stderr}");
    assert!(
        stderr.starts_with(&format!("error: {variable}: ")),
        "{what}: {stderr}"
    );
    assert!(
        !stderr.contains("secret"),
        "{what}: password leaked: {stderr}"
    );
}

#[test]
fn a_value_that_is_not_utf8_is_exit_2_naming_it_and_unrelated_ones_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let commands = ["setup", "run", "verify", "status", "sync-now"];
    // A password that is not UTF-8: exit 2, naming the variable, never showing the value.
    for command in commands {
        let output = rowsync_in(
            dir.path(),
            &[
                (
                    "SOURCE_DATABASE_URL",
                    b"postgres://app:hunter2-secret\xff@127.0.0.1:1/backend",
                ),
                ("TARGET_DATABASE_URL", TARGET),
            ],
            &[command],
        );
        assert_config_error(&output, "SOURCE_DATABASE_URL", command);
        assert!(!String::from_utf8_lossy(&output.stderr).contains("hunter2"));
    }
    let output = rowsync_in(
        dir.path(),
        &[
            ("SOURCE_DATABASE_URL", SOURCE),
            ("TARGET_DATABASE_URL", TARGET),
            ("LOG_LEVEL", b"\xffinfo"),
        ],
        &["verify"],
    );
    assert_config_error(&output, "LOG_LEVEL", "LOG_LEVEL");
    // Variables rowsync does not read may hold anything: it gets as far as connecting.
    let output = rowsync_in(
        dir.path(),
        &[
            ("SOURCE_DATABASE_URL", SOURCE),
            ("TARGET_DATABASE_URL", TARGET),
            ("UNRELATED", b"\xfe\xff"),
            ("LANG", b"C.\xff"),
        ],
        &["verify"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_dotenv_file_that_is_not_utf8_is_exit_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        b"SOURCE_DATABASE_URL=postgres://app:pw-source-secret\xff@127.0.0.1:1/backend\n",
    )
    .unwrap();
    let output = rowsync_in(dir.path(), &[("TARGET_DATABASE_URL", TARGET)], &["setup"]);
    assert_config_error(&output, ".env", ".env");
}

#[test]
fn numbers_past_what_postgres_and_the_runtime_honour_are_exit_2_with_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [&[(&str, &[u8])]; 6] = [
        &[("SOURCE_DB_POOL_SIZE", b"1000000000000000")],
        &[("STATEMENT_TIMEOUT_SECONDS", b"3000000")],
        &[("BATCH_SIZE", b"4294967296")],
        &[
            ("SYNC_INTERVAL_MINUTES", b"60000"),
            ("SYNC_WINDOW_MULTIPLIER", b"60000"),
        ],
        &[("RETRY_BACKOFF_MULTIPLIER", b"1e300")],
        &[("HEALTH_ADDR", b"127.0.0.1:0")],
    ];
    for case in cases {
        let variable = case[0].0;
        let mut env: Vec<(&str, &[u8])> = vec![
            ("SOURCE_DATABASE_URL", SOURCE),
            ("TARGET_DATABASE_URL", TARGET),
        ];
        env.extend_from_slice(case);
        for command in ["setup", "run", "verify", "status"] {
            let output = rowsync_in(dir.path(), &env, &[command]);
            assert_config_error(&output, variable, &format!("{command} {case:?}"));
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains(" to "),
                "the accepted range is not named: {stderr}"
            );
        }
    }
}

/// Servers that ask every role but the superuser for a password (SCRAM), like a real one.
fn password_auth() -> ServerOptions {
    ServerOptions {
        hba: Some(
            "host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
                .into(),
        ),
        ..ServerOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotenv_values_are_literal_so_passwords_with_dollar_hash_quotes_and_spaces_connect() {
    let pair = Pair::with_servers(password_auth(), password_auth(), USERS, USERS).await;
    let source = pair.source().await;
    let target = pair.target().await;
    seed_users(&source, 20).await;
    // Each password is written in .env the way a person would: quoted where it needs quotes.
    let cases = [
        ("plain", "pa$word", ""),
        ("single", r#"pa$$ "dq" #hash $HOME"#, "'"),
        ("double", "it's $HOME #x", "\""),
        ("backtick", r#"pa$word #1 "q" 'x'"#, "`"),
    ];
    for (name, password, quote) in cases {
        let role = format!("app_{name}");
        for client in [&source, &target] {
            let sql: String = client
                .query_one(
                    "SELECT format('CREATE ROLE %I LOGIN SUPERUSER PASSWORD %L', $1::text, $2::text)",
                    &[&role, &password],
                )
                .await
                .unwrap()
                .get(0);
            client.batch_execute(&sql).await.unwrap();
        }
        let url = |port: u16| format!("postgres://{role}:{password}@127.0.0.1:{port}/app");
        let dotenv = format!(
            "# written by hand\nSOURCE_DATABASE_URL={quote}{}{quote}\nTARGET_DATABASE_URL={quote}{}{quote}\n",
            url(pair.source.port()),
            url(pair.target.port())
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".env"), &dotenv).unwrap();
        let output = rowsync_in(dir.path(), &[], &["setup"]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.status.code(), Some(0), "{name}: {dotenv}\n{all}");
        assert!(!all.contains(password), "{name}: password shown: {all}");
        let output = rowsync_in(dir.path(), &[], &["verify"]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    // The first setup ran as the first role, signed in with its password (the servers ask every
    // role but postgres for one).
    let owner: String = source
        .query_one(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'rowsync'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "app_plain");
    pair.assert_synced("users").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_come_from_pgpassword_or_a_password_file_as_in_libpq() {
    let pair = Pair::with_servers(password_auth(), password_auth(), USERS, USERS).await;
    for client in [pair.source().await, pair.target().await] {
        client
            .batch_execute("CREATE ROLE app LOGIN SUPERUSER PASSWORD 'file:pass'")
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let url = |port: u16| format!("postgres://app@127.0.0.1:{port}/app");
    let (source, target) = (url(pair.source.port()), url(pair.target.port()));
    let urls = [
        ("SOURCE_DATABASE_URL", source.as_bytes()),
        ("TARGET_DATABASE_URL", target.as_bytes()),
    ];
    let with = |extra: &[(&'static str, &'static [u8])]| {
        let mut env: Vec<(&str, &[u8])> = urls.to_vec();
        env.extend_from_slice(extra);
        rowsync_in(dir.path(), &env, &["setup"])
    };
    let output = with(&[("PGPASSWORD", b"file:pass")]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The password file: a wildcard line, a colon escaped in the password.
    let passfile = dir.path().join("pgpass");
    std::fs::write(&passfile, "# rowsync\n127.0.0.1:*:app:app:file\\:pass\n").unwrap();
    let mode = |m| std::os::unix::fs::PermissionsExt::from_mode(m);
    std::fs::set_permissions(&passfile, mode(0o600)).unwrap();
    let passfile_env = passfile.display().to_string().into_bytes().leak();
    let output = with(&[("PGPASSFILE", passfile_env)]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // One that others may read is ignored, as libpq ignores it, and rowsync says why.
    std::fs::set_permissions(&passfile, mode(0o644)).unwrap();
    let output = with(&[("PGPASSFILE", passfile_env)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("chmod 0600"), "{stderr}");
}
