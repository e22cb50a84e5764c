//! TLS as managed PostgreSQL services demand it: servers that accept rowsync's role only over
//! TLS (`hostssl`), certificates the test makes itself, and libpq's `sslmode` semantics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use rowsync_sandbox::ServerOptions;

use crate::harness::{Pair, USERS, count, seed_users};

/// A certificate authority and what it signed.
struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Authority { cert, key }
    }

    /// A certificate for `names` (subject alternative names) with common name `cn`: PEM cert, key.
    fn issue(&self, cn: &str, names: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A server that accepts the role `app` only over TLS (and `certuser` only with a client
/// certificate); the harness's own superuser connects in plain text to set things up.
fn tls_only(authority: &Authority) -> ServerOptions {
    let (cert, key) = authority.issue("localhost", &["localhost"]);
    ServerOptions {
        hba: Some(
            "host all postgres 127.0.0.1/32 trust\n\
             hostssl all app 127.0.0.1/32 trust\n\
             hostssl all certuser 127.0.0.1/32 cert\n"
                .into(),
        ),
        files: vec![
            ("server.crt".into(), cert, 0o644),
            ("server.key".into(), key, 0o600),
            ("ca.crt".into(), authority.cert.pem(), 0o644),
        ],
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), "server.crt".into()),
            ("ssl_key_file".into(), "server.key".into()),
            ("ssl_ca_file".into(), "ca.crt".into()),
        ],
        ..ServerOptions::default()
    }
}

/// Writes `contents` to `dir/name` with `mode`.
fn write(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A pair of TLS-only servers with `users` in both, and the role `app` (and `certuser`).
async fn tls_pair(authority: &Authority) -> Pair {
    let pair = Pair::with_servers(tls_only(authority), tls_only(authority), USERS, USERS).await;
    for client in [pair.source().await, pair.target().await] {
        client
            .batch_execute("CREATE ROLE app LOGIN SUPERUSER; CREATE ROLE certuser LOGIN SUPERUSER")
            .await
            .unwrap();
    }
    seed_users(&pair.source().await, 50).await;
    pair
}

/// The two URLs for `user` at `host`, with `query` (libpq options).
fn urls(pair: &Pair, user: &str, host: &str, query: &str) -> [(&'static str, String); 2] {
    [
        (
            "SOURCE_DATABASE_URL",
            format!(
                "postgres://{user}@{host}:{}/app?{query}",
                pair.source.port()
            ),
        ),
        (
            "TARGET_DATABASE_URL",
            format!(
                "postgres://{user}@{host}:{}/app?{query}",
                pair.target.port()
            ),
        ),
    ]
}

fn run(pair: &Pair, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    pair.rowsync(args, &env)
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_servers_sync_with_verify_full_and_every_session_is_encrypted() {
    let authority = Authority::new("rowsync test CA");
    let pair = tls_pair(&authority).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &authority.cert.pem(), 0o644);
    let query = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let env = urls(&pair, "app", "localhost", &query);
    let output = run(&pair, &["setup"], &env);
    assert!(output.status.success(), "{}", stderr(&output));

    let env_run: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _daemon = pair.spawn(&env_run);
    pair.source()
        .await
        .execute(
            "UPDATE users SET status = 'over-tls' WHERE name = 'user-3'",
            &[],
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    // Every session rowsync holds (pool, listener, leader lock) is encrypted.
    for client in [pair.source().await, pair.target().await] {
        let plain = count(
            &client,
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
              WHERE a.application_name LIKE 'rowsync%' AND NOT s.ssl",
        )
        .await;
        let encrypted = count(
            &client,
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
              WHERE a.application_name LIKE 'rowsync%' AND s.ssl",
        )
        .await;
        assert_eq!(plain, 0);
        assert!(encrypted > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_behave_as_in_libpq() {
    let authority = Authority::new("rowsync test CA");
    let other = Authority::new("some other CA");
    let pair = tls_pair(&authority).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &authority.cert.pem(), 0o644);
    let wrong_ca = write(dir.path(), "other.pem", &other.cert.pem(), 0o644);
    let root = |path: &Path| format!("sslrootcert={}", path.display());
    let cases: Vec<(&str, String, bool)> = vec![
        // Encrypted but not verified: any certificate will do.
        ("localhost", "sslmode=require".into(), true),
        ("localhost", "sslmode=prefer".into(), true),
        // A server that refuses plain sessions, to a client that tries them first.
        ("localhost", "sslmode=allow".into(), true),
        ("localhost", "sslmode=disable".into(), false),
        // The certificate names localhost: the chain is fine from 127.0.0.1, the name is not.
        (
            "127.0.0.1",
            format!("sslmode=verify-ca&{}", root(&ca)),
            true,
        ),
        (
            "127.0.0.1",
            format!("sslmode=verify-full&{}", root(&ca)),
            false,
        ),
        (
            "localhost",
            format!("sslmode=verify-full&{}", root(&ca)),
            true,
        ),
        // Signed by another CA: every verifying mode refuses it, require with a root too.
        (
            "localhost",
            format!("sslmode=verify-ca&{}", root(&wrong_ca)),
            false,
        ),
        (
            "localhost",
            format!("sslmode=require&{}", root(&wrong_ca)),
            false,
        ),
    ];
    for (host, query, connects) in cases {
        let output = run(&pair, &["verify"], &urls(&pair, "app", host, &query));
        let text = stderr(&output);
        if connects {
            // verify exits 1 here (setup has not run), but only after connecting.
            assert!(
                !text.contains("could not connect") && !text.contains("no connection"),
                "{host} {query}: {text}"
            );
        } else {
            assert_eq!(output.status.code(), Some(1), "{host} {query}: {text}");
            assert!(
                text.contains("no connection") || text.contains("could not connect"),
                "{host} {query}: {text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_variables_client_certificates_and_url_files_work() {
    let authority = Authority::new("rowsync test CA");
    let pair = tls_pair(&authority).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &authority.cert.pem(), 0o644);
    // The PG* variables, as libpq reads them, with URLs that say nothing of TLS.
    let mut env: Vec<(&str, String)> = urls(&pair, "app", "localhost", "").to_vec();
    env.push(("PGSSLMODE", "verify-full".into()));
    env.push(("PGSSLROOTCERT", ca.display().to_string()));
    let output = run(&pair, &["setup"], &env);
    assert!(output.status.success(), "{}", stderr(&output));

    // A client certificate (pg_hba's cert method: its common name is the role).
    let (cert, key) = authority.issue("certuser", &[]);
    let cert = write(dir.path(), "client.crt", &cert, 0o644);
    let key = write(dir.path(), "client.key", &key, 0o600);
    let query = format!(
        "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        ca.display(),
        cert.display(),
        key.display()
    );
    let output = run(
        &pair,
        &["verify"],
        &urls(&pair, "certuser", "localhost", &query),
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // libpq refuses a key that others may read, and so does rowsync, before connecting.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let output = run(
        &pair,
        &["verify"],
        &urls(&pair, "certuser", "localhost", &query),
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("chmod 0600"),
        "{}",
        stderr(&output)
    );

    // The URLs in files (systemd credentials, container secrets).
    let [(_, source), (_, target)] = urls(
        &pair,
        "app",
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let source_file = write(dir.path(), "source-url", &format!("{source}\n"), 0o600);
    let target_file = write(dir.path(), "target-url", &target, 0o600);
    let env = [
        (
            "SOURCE_DATABASE_URL_FILE",
            source_file.display().to_string(),
        ),
        (
            "TARGET_DATABASE_URL_FILE",
            target_file.display().to_string(),
        ),
    ];
    // The harness's own URLs would win: run without them.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rowsync"))
        .arg("verify")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HEALTH_ADDR", "off")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}
