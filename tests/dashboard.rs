//! The operator's view: the dashboard in a real headless Chromium against a real rowsync and real
//! servers, `rowsync errors` and its two actions, the dashboard's own actions and their
//! protection against other sites, and the shipped Grafana dashboard and Prometheus rules naming
//! only metrics that a running rowsync exports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Pair, USERS, count, free_port, http_get};

/// Debian's Chromium, which `.ci/run` installs where it is missing.
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found: the dashboard is tested in a real browser; install Debian's chromium package (apt-get install chromium) or set CHROMIUM",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `extra` arguments, a fresh profile, no network but
/// loopback, and gives the page `budget` of (virtual) time to run its script. Returns stdout.
fn browse(url: &str, extra: &[&str], budget: Duration) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The page as the browser rendered it: the DOM after the script ran.
struct Page {
    dom: String,
}

impl Page {
    fn open(url: &str) -> Self {
        Self {
            dom: browse(url, &["--dump-dom"], Duration::from_secs(5)),
        }
    }

    /// What a person sees in the element of this `id`: its text, markup taken out (up to
    /// `closing`, the element's end tag).
    fn text(&self, id: &str, closing: &str) -> String {
        let start = self
            .dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id} on the page: {}", self.dom));
        let body = &self.dom[start..];
        let open = body.find('>').map_or(0, |i| i + 1);
        let end = body.find(closing).unwrap_or(body.len());
        visible(&body[open..end])
    }

    /// The notice line at the top (empty when it says nothing).
    fn notice(&self) -> String {
        self.text("notice", "</div>")
    }
}

/// Text of an HTML fragment, markup taken out and white space collapsed.
fn visible(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One HTTP/1.1 request with `headers` and `body`; the status code and the body.
async fn raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let code = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Waits until `sync_errors` has `n` unresolved rows (`what` says why, should it time out).
async fn unresolved(pair: &Pair, target: &tokio_postgres::Client, n: i64, what: &str) {
    pair.wait(what, Duration::from_secs(15), || async {
        count(
            target,
            "SELECT count(*) FROM sync_errors WHERE NOT resolved",
        )
        .await
            == n
    })
    .await;
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_tables_lag_and_errors_and_follows_what_operators_do() {
    // The target refuses one kind of row: a poison row for the error queue.
    let target_ddl =
        format!("{USERS} ALTER TABLE users ADD CONSTRAINT no_poison CHECK (name <> 'poison');");
    let pair = Pair::with_ddl(USERS, &target_ddl).await;
    crate::harness::seed_users(&pair.source().await, 20).await;
    pair.setup();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Rows the target rejects wait ten minutes for their retry, unless an operator asks sooner.
    let env = [
        ("HEALTH_ADDR", addr.as_str()),
        ("RETRY_INITIAL_DELAY", "600000"),
        ("RETRY_MAX_DELAY", "600000"),
    ];
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    pair.wait(
        "the daemon to serve the dashboard",
        Duration::from_secs(10),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    let url = format!("http://{addr}/");

    // Without a token, only requests addressed to an IP or localhost are answered: a page whose
    // name was made to point here (DNS rebinding) gets nothing.
    let rebound = [("Host", "evil.example:9393")];
    assert_eq!(
        raw(port, "GET", "/api/dashboard", &rebound, "").await.0,
        403
    );
    assert_eq!(raw(port, "GET", "/", &rebound, "").await.0, 403);
    let local = format!("localhost:{port}");
    assert_eq!(
        raw(
            port,
            "GET",
            "/api/dashboard",
            &[("Host", local.as_str())],
            ""
        )
        .await
        .0,
        200
    );
    assert_eq!(
        raw(port, "GET", "/metrics", &rebound, "").await.0,
        200,
        "not the dashboard's"
    );

    let first = Page::open(&url);
    assert_eq!(first.text("health", "</span>"), "HEALTHY", "{}", first.dom);
    let tables = first.text("tables", "</tbody>");
    assert!(tables.starts_with("public.users "), "{tables}");
    assert!(
        tables.contains("busiest minute 0"),
        "nothing applied yet: {tables}"
    );
    assert_eq!(first.text("errors", "</tbody>"), "none");

    // Writes: the applied figure and the lag move.
    let source = pair.source().await;
    source
        .batch_execute(
            "UPDATE users SET version = version + 1; INSERT INTO users (name) VALUES ('poison');",
        )
        .await
        .unwrap();
    let target = pair.target().await;
    unresolved(&pair, &target, 1, "the poison row to be recorded").await;
    let second = Page::open(&url);
    let tables_after = second.text("tables", "</tbody>");
    // The chart holds the 20 rows written this minute; the lag is a figure of its own.
    assert!(tables_after.contains("busiest minute 20"), "{tables_after}");
    let lag = |text: &str| text.split_whitespace().nth(1).map(str::to_string);
    assert!(
        lag(&tables_after).is_some_and(|l| l.parse::<f64>().is_ok()),
        "{tables_after}"
    );
    assert_ne!(
        tables, tables_after,
        "the table's figures did not change after writes"
    );
    let errors = second.text("errors", "</tbody>");
    assert!(
        errors.contains("CONSTRAINT_VIOLATION") && errors.contains("public.users"),
        "{errors}"
    );
    assert!(
        errors.contains("no_poison"),
        "the message is shown: {errors}"
    );
    // A screenshot of the page as a person sees it now, an error on it (the README shows it: docs/dashboard.png).
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browse(
        &url,
        &[
            "--window-size=1280,820",
            &format!("--screenshot={}", shot.display()),
        ],
        Duration::from_secs(5),
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "no screenshot"
    );

    // rowsync errors lists it; resolve takes it off the page, with the note recorded.
    let listed = pair.rowsync(&["errors", "--table", "users"], &env);
    let listed_text = stdout(&listed);
    assert!(
        listed.status.success() && listed_text.contains("CONSTRAINT_VIOLATION"),
        "{listed_text}"
    );
    let json = pair.rowsync(
        &["errors", "--json", "--type", "constraint_violation"],
        &env,
    );
    let rows: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let id = rows[0]["id"].as_i64().unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    let resolved = pair.rowsync(
        &[
            "errors",
            "resolve",
            &id.to_string(),
            "--note",
            "poison is test data",
        ],
        &env,
    );
    assert!(resolved.status.success(), "{}", stdout(&resolved));
    let third = Page::open(&url);
    assert_eq!(third.text("errors", "</tbody>"), "none");
    let note: String = target
        .query_one(
            "SELECT metadata -> 'resolution' ->> 'note' FROM sync_errors WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(note, "poison is test data");
    let again = pair.rowsync(
        &["errors", "resolve", &id.to_string(), "--note", "twice"],
        &env,
    );
    assert_eq!(
        again.status.code(),
        Some(1),
        "resolving a resolved error: {}",
        stdout(&again)
    );

    // Another poison row; the target is fixed; `errors retry` makes the next sweep apply it now
    // (its own retry would be ten minutes away).
    source
        .batch_execute("INSERT INTO users (name) VALUES ('poison')")
        .await
        .unwrap();
    unresolved(&pair, &target, 1, "the second poison row to be recorded").await;
    target
        .batch_execute("ALTER TABLE users DROP CONSTRAINT no_poison")
        .await
        .unwrap();
    // A table filter before the action is refused, not ignored (it would act on every table).
    let wrong = pair.rowsync(
        &[
            "errors", "--table", "users", "resolve", "--all", "--note", "x",
        ],
        &env,
    );
    assert_eq!(wrong.status.code(), Some(2), "{}", stdout(&wrong));
    let ids_and_table = pair.rowsync(&["errors", "retry", "1", "--table", "users"], &env);
    assert_eq!(
        ids_and_table.status.code(),
        Some(2),
        "{}",
        stdout(&ids_and_table)
    );
    unresolved(&pair, &target, 1, "the second poison row still unresolved").await;
    let retried = pair.rowsync(&["errors", "retry", "--all", "--table", "users"], &env);
    assert!(
        retried.status.success() && stdout(&retried).contains("will retry 1"),
        "{}",
        stdout(&retried)
    );
    pair.wait(
        "the retried row to be applied and its error resolved",
        Duration::from_secs(20),
        || async {
            count(&target, "SELECT count(*) FROM users WHERE name = 'poison'").await == 1
                && count(
                    &target,
                    "SELECT count(*) FROM sync_errors WHERE NOT resolved",
                )
                .await
                    == 0
        },
    )
    .await;
    // The row resolved by hand was not retried; it follows its next change.
    source
        .batch_execute("UPDATE users SET version = version + 1 WHERE name = 'poison'")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;

    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboards_actions_need_the_token_and_refuse_other_sites() {
    const TOKEN: &str = "s3cret-dashboard-token";
    let target_ddl =
        format!("{USERS} ALTER TABLE users ADD CONSTRAINT no_poison CHECK (name <> 'poison');");
    let pair = Pair::with_ddl(USERS, &target_ddl).await;
    pair.setup();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = [
        ("HEALTH_ADDR", addr.as_str()),
        ("HEALTH_TOKEN", TOKEN),
        ("RETRY_INITIAL_DELAY", "600000"),
        ("RETRY_MAX_DELAY", "600000"),
    ];
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    pair.source()
        .await
        .batch_execute("INSERT INTO users (name) VALUES ('poison')")
        .await
        .unwrap();
    let target = pair.target().await;
    unresolved(&pair, &target, 1, "the poison row to be recorded").await;
    let id: i64 = target
        .query_one("SELECT id FROM sync_errors WHERE NOT resolved", &[])
        .await
        .unwrap()
        .get(0);

    // The page holds no figures and is served to anyone; its data needs the token.
    let (code, page) = http_get(port, "/").await;
    assert_eq!(code, 200);
    assert!(page.contains("<title>rowsync</title>") && !page.contains("public.users"));
    assert_eq!(http_get(port, "/api/dashboard").await.0, 401);
    let bearer = format!("Bearer {TOKEN}");
    let json = [
        ("Content-Type", "application/json"),
        ("Authorization", bearer.as_str()),
    ];
    let (code, body) = raw(port, "GET", "/api/dashboard", &json[1..], "").await;
    assert_eq!(code, 200, "{body}");
    let document: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(document["errors"][0]["id"], id, "{document}");
    assert!(
        document["status"]["tables"]["public.users"]["appliedPerMinute"]
            .as_array()
            .is_some_and(|m| m.len() == 60)
    );

    // The browser, given the token in the address's fragment, shows the error.
    let shown = Page::open(&format!("http://{addr}/#token={TOKEN}"));
    let errors = shown.text("errors", "</tbody>");
    assert!(errors.contains("CONSTRAINT_VIOLATION"), "{errors}");
    let refused = Page::open(&format!("http://{addr}/"));
    assert!(
        refused.notice().contains("wants its HEALTH_TOKEN"),
        "{}",
        refused.dom
    );
    assert_eq!(
        refused.text("errors", "</tbody>"),
        "",
        "nothing shown without the token"
    );

    let body = format!(r#"{{"ids": [{id}], "note": "from the dashboard"}}"#);
    // Without the token; from another site; not JSON: refused, and nothing changes.
    assert_eq!(
        raw(port, "POST", "/api/errors/resolve", &json[..1], &body)
            .await
            .0,
        401
    );
    let other_site = [json[0], json[1], ("Origin", "http://evil.example")];
    assert_eq!(
        raw(port, "POST", "/api/errors/resolve", &other_site, &body)
            .await
            .0,
        403
    );
    let fetch_site = [json[0], json[1], ("Sec-Fetch-Site", "cross-site")];
    assert_eq!(
        raw(port, "POST", "/api/errors/resolve", &fetch_site, &body)
            .await
            .0,
        403
    );
    let form = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        json[1],
    ];
    assert_eq!(
        raw(port, "POST", "/api/errors/resolve", &form, &body)
            .await
            .0,
        415
    );
    let no_note = format!(r#"{{"ids": [{id}]}}"#);
    assert_eq!(
        raw(port, "POST", "/api/errors/resolve", &json, &no_note)
            .await
            .0,
        400
    );
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM sync_errors WHERE NOT resolved"
        )
        .await,
        1
    );

    // Same origin, with the token: retry then resolve.
    let same_site = [
        json[0],
        json[1],
        ("Origin", &format!("http://{addr}")),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let (code, answer) = raw(
        port,
        "POST",
        "/api/errors/retry",
        &same_site,
        &format!(r#"{{"ids": [{id}]}}"#),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains(&format!("\"done\":[{id}]")), "{answer}");
    let (code, answer) = raw(port, "POST", "/api/errors/resolve", &same_site, &body).await;
    assert_eq!(code, 200, "{answer}");
    let by: String = target
        .query_one(
            "SELECT metadata -> 'resolution' ->> 'by' FROM sync_errors WHERE id = $1 AND resolved",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by, "dashboard");
    drop(daemon);
}

/// Every `rowsync_…` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("rowsync_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_grafana_dashboard_and_alert_rules_use_only_metrics_rowsync_exports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(root.join("prometheus-rules.yml")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = parsed["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        assert!(
            panel["targets"][0]["expr"]
                .as_str()
                .is_some_and(|e| e.contains("rowsync_")),
            "{panel}"
        );
    }
    let used: std::collections::BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metric_names(&rules))
        .collect();
    for alert in [
        "RowsyncTargetBehind",
        "RowsyncSweepsOverdue",
        "RowsyncCaptureDisabled",
        "RowsyncUnresolvedErrorsGrowing",
        "RowsyncNoLeader",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "no {alert} rule"
        );
    }

    let pair = Pair::new(USERS).await;
    pair.setup();
    let port = free_port();
    // Verifying too, so that the verification's families have samples.
    let daemon = pair.spawn(&[
        ("HEALTH_ADDR", &format!("127.0.0.1:{port}")),
        ("VERIFY_INTERVAL_MINUTES", "0.01"),
    ]);
    daemon.wait_listening(&pair).await;
    pair.wait(
        "a sweep and a verification",
        Duration::from_secs(30),
        || async {
            let metrics = http_get(port, "/metrics").await.1;
            metrics.contains("# TYPE rowsync_divergent_rows")
                && metrics.contains("# TYPE rowsync_capture_intact")
                && !metrics.contains("rowsync_last_sweep_timestamp_seconds NaN")
        },
    )
    .await;
    let (_, metrics) = http_get(port, "/metrics").await;
    let exported: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect();
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| exported.contains(*f)))
            .unwrap_or(name);
        assert!(
            exported.contains(family),
            "{name} is used by monitoring/ but not exported: {exported:?}"
        );
    }
    drop(daemon);
}
