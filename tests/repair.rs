//! Finding and repairing divergence: `verify` names every row changed by hand in the target (and
//! none merely in flight), `repair` fixes exactly those through the apply path, `--dry-run`
//! changes nothing; with a write load and the daemon running, with a composite key, and with a
//! text key under a collation whose order is not the bytes'.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use crate::harness::{Pair, USERS, contents, count, seed_users};

/// `(kind, key)` pairs as owned strings.
fn keyset(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `(kind, key)` of every difference a JSON report lists, per table.
fn differences(report: &Value, table: &str) -> BTreeSet<(String, String)> {
    let table = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .unwrap_or_else(|| panic!("{table} not in {report}"));
    table["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["key"].to_string(),
            )
        })
        .collect()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn described(output: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr (last lines):\n{}",
        output.status.code(),
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// The keys (`{"id": …}` as JSON) of the rows a statement returns `id::text` of.
async fn keys(client: &Client, sql: &str, kind: &str) -> BTreeSet<(String, String)> {
    client
        .query(sql, &[])
        .await
        .expect(sql)
        .iter()
        .map(|row| {
            let id: String = row.get(0);
            (kind.to_string(), format!("{{\"id\":\"{id}\"}}"))
        })
        .collect()
}

/// Seeds `n` users whose rows are a day old: no sweep's look-back re-reads (and so repairs) them
/// behind a test's back.
async fn seed_old_users(source: &Client, n: i32) {
    seed_users(source, n).await;
    source
        .execute(
            "UPDATE users SET updated_at = now() - interval '1 day', created_at = now() - interval '1 day'",
            &[],
        )
        .await
        .unwrap();
}

/// Updates, inserts and deletes source rows outside `user-1` … `user-50000` until stopped.
/// (Deletes of rows another load inserted may find nothing: fine.)
fn write_load(
    url: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = crate::harness::connect(&url).await;
        let statements = [
            "UPDATE users SET version = version + 1, updated_at = now() \
              WHERE name = 'user-' || (50001 + floor(random() * 50000))::int",
            "INSERT INTO users (name) VALUES ('load-' || gen_random_uuid())",
            "UPDATE users SET status = md5(random()::text), updated_at = now() \
              WHERE name = 'user-' || (50001 + floor(random() * 50000))::int",
            "DELETE FROM users WHERE id = (SELECT id FROM users WHERE name LIKE 'load-%' LIMIT 1)",
        ];
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            client
                .execute(statements[i % statements.len()], &[])
                .await
                .unwrap();
            done.fetch_add(1, Ordering::Relaxed);
            i += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_and_repair_fixes_every_row_changed_by_hand_under_writes() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_old_users(&source, 100_000).await;
    // (So that the write load finds its rows fast.)
    source
        .execute("CREATE INDEX users_name_idx ON users (name)", &[])
        .await
        .unwrap();
    pair.setup();
    let daemon = pair.spawn(&[]);
    daemon.wait_listening(&pair).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let loads: Vec<_> = (0..4)
        .map(|_| write_load(pair.source_url(), stop.clone(), done.clone()))
        .collect();

    // By hand, in the target: some rows deleted, some changed, some added.
    let target = pair.target().await;
    let number = "split_part(name, '-', 2)::int";
    let mut expected = keys(
        &target,
        &format!(
            "DELETE FROM users WHERE name LIKE 'user-%' AND {number} <= 50000 AND {number} % 997 = 0 RETURNING id::text"
        ),
        "missing",
    )
    .await;
    expected.extend(
        keys(
            &target,
            &format!(
                "UPDATE users SET bio = 'changed by hand' \
                  WHERE name LIKE 'user-%' AND {number} <= 50000 AND {number} % 991 = 0 RETURNING id::text"
            ),
            "different",
        )
        .await,
    );
    expected.extend(
        keys(
            &target,
            "INSERT INTO users (name) SELECT 'intruder-' || g FROM generate_series(1, 40) g RETURNING id::text",
            "extra",
        )
        .await,
    );
    let kinds = |kind: &str| expected.iter().filter(|(k, _)| k == kind).count();
    assert!(kinds("missing") > 40 && kinds("different") > 40 && kinds("extra") == 40);

    // verify names exactly these rows, though rows keep changing and streaming meanwhile.
    let written = || done.load(Ordering::Relaxed);
    pair.wait("the write load to run", Duration::from_secs(30), || async {
        written() > 300
    })
    .await;
    // And some changes held up on their way: the daemon is stopped until verify has scanned (it
    // must not report them: they are applied before its re-checks end).
    daemon.signal(libc::SIGSTOP);
    source
        .execute(
            "UPDATE users SET bio = 'in flight' \
              WHERE name IN (SELECT 'user-' || g FROM generate_series(60001, 60020) g)",
            &[],
        )
        .await
        .unwrap();
    let pid = daemon.pid();
    let resume = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let (before, started) = (written(), std::time::Instant::now());
    let output = pair.rowsync(&["verify", "--json", "--attempts", "5"], &[]);
    resume.await.unwrap();
    assert!(
        written() > before + 5,
        "writes went on during verify: {before} before, {} after {:?}",
        written(),
        started.elapsed()
    );
    assert_eq!(output.status.code(), Some(1), "{}", described(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).expect("verify --json is JSON");
    assert_eq!(report["consistent"], false);
    let found = differences(&report, "public.users");
    assert_eq!(
        found,
        expected,
        "verify found {} differences, expected {}: not expected {:?}, not found {:?}",
        found.len(),
        expected.len(),
        found.difference(&expected).take(5).collect::<Vec<_>>(),
        expected.difference(&found).take(5).collect::<Vec<_>>(),
    );
    let table = &report["tables"][0];
    assert_eq!(table["missing"], kinds("missing"));
    assert_eq!(table["extra"], kinds("extra"));
    assert_eq!(table["different"], kinds("different"));

    // The text report counts them and lists the first keys.
    let output = pair.rowsync(&["verify", "--keys", "3", "--attempts", "5"], &[]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", described(&output));
    let line = text.lines().nth(1).unwrap();
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        columns[6..10],
        [
            kinds("missing").to_string().as_str(),
            "40",
            kinds("different").to_string().as_str(),
            "INCONSISTENT"
        ],
        "{text}"
    );
    assert!(text.contains("differing rows by key:"), "{text}");
    assert!(
        text.contains(&format!("… and {} more", expected.len() - 3)),
        "{text}"
    );

    // repair fixes them through the running daemon, while the writes go on.
    let before = written();
    let output = pair.rowsync(&["repair", "--attempts", "5"], &[]);
    assert!(written() > before + 5, "writes went on during repair");
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    let text = stdout(&output);
    assert!(
        text.contains(&format!(
            "public.users: {} missing in the target, 40 extra, {} different; fixed {} of them, \
             applied by the running daemon",
            kinds("missing"),
            kinds("different"),
            expected.len()
        )) && text.contains("now CONSISTENT"),
        "{text}"
    );
    let runs = target
        .query_one(
            "SELECT status, created, deleted, updated, failed FROM sync_runs WHERE kind = 'repair'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(runs.get::<_, String>(0), "succeeded");
    assert_eq!(runs.get::<_, i64>(1), kinds("missing") as i64);
    assert_eq!(runs.get::<_, i64>(2), 40);
    assert_eq!(runs.get::<_, i64>(3), kinds("different") as i64);
    assert_eq!(runs.get::<_, i64>(4), 0);

    stop.store(true, Ordering::Relaxed);
    for load in loads {
        load.await.unwrap();
    }
    pair.wait_synced("users", Duration::from_secs(60)).await;
    let output = pair.rowsync(&["verify"], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    drop(daemon);
}

/// A composite key, and a text key under an ICU collation (whose order is not the bytes'): verify
/// names the rows, `--dry-run` changes nothing, and repair (no daemon running: it applies them
/// itself) fixes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_and_collated_keys_are_found_and_repaired_without_a_daemon() {
    const DDL: &str = r#"
        CREATE DOMAIN level AS int NOT NULL CHECK (VALUE > 0);
        CREATE TABLE memberships (
            tenant   int,
            member   text,
            role     text NOT NULL,
            since    date NOT NULL DEFAULT '2020-01-01',
            score    numeric,
            rank     level NOT NULL DEFAULT 1,
            PRIMARY KEY (tenant, member)
        );
        CREATE TABLE tags (
            label    text COLLATE "en-x-icu" PRIMARY KEY,
            uses     bigint NOT NULL,
            meta     jsonb
        );"#;
    let pair = Pair::new(DDL).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO memberships (tenant, member, role, score) \
               SELECT t, 'member ' || m, 'role-' || (m % 3), m / 7.0 \
                 FROM generate_series(1, 20) t, generate_series(1, 500) m; \
             INSERT INTO tags (label, uses, meta) \
               SELECT w || g, g, jsonb_build_object('g', g) \
                 FROM generate_series(1, 2000) g, \
                      unnest(ARRAY['a', 'B', 'Ärger ', 'zebra', 'Zebra', 'émile']) w;",
        )
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "memberships, tags")];
    let output = pair.rowsync(&["setup"], &env);
    assert!(output.status.success(), "{}", described(&output));

    let target = pair.target().await;
    target
        .batch_execute(
            "DELETE FROM memberships WHERE tenant = 3 AND member IN ('member 7', 'member 8'); \
             UPDATE memberships SET score = score + 1 WHERE tenant = 11 AND member = 'member 400'; \
             INSERT INTO memberships (tenant, member, role) VALUES (99, 'stranger', 'none'); \
             DELETE FROM tags WHERE label IN ('Zebra17', 'émile5'); \
             UPDATE tags SET meta = '{\"g\": 0}' WHERE label = 'Ärger 42'; \
             INSERT INTO tags (label, uses) VALUES ('zebra0', 0), ('ZEBRA1', 1);",
        )
        .await
        .unwrap();
    let memberships = keyset(&[
        ("missing", r#"{"member":"member 7","tenant":3}"#),
        ("missing", r#"{"member":"member 8","tenant":3}"#),
        ("different", r#"{"member":"member 400","tenant":11}"#),
        ("extra", r#"{"member":"stranger","tenant":99}"#),
    ]);
    let tags = keyset(&[
        ("missing", r#"{"label":"Zebra17"}"#),
        ("missing", r#"{"label":"émile5"}"#),
        ("different", r#"{"label":"Ärger 42"}"#),
        ("extra", r#"{"label":"zebra0"}"#),
        ("extra", r#"{"label":"ZEBRA1"}"#),
    ]);

    let output = pair.rowsync(&["verify", "--json"], &env);
    assert_eq!(output.status.code(), Some(1), "{}", described(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(differences(&report, "public.memberships"), memberships);
    assert_eq!(differences(&report, "public.tags"), tags);

    // --dry-run lists them, exits 1 and changes nothing.
    let before = (
        contents(&target, "memberships").await,
        contents(&target, "tags").await,
    );
    let output = pair.rowsync(&["repair", "--dry-run"], &env);
    assert_eq!(output.status.code(), Some(1), "{}", described(&output));
    let text = stdout(&output);
    assert!(
        text.contains("public.memberships: 2 missing in the target, 1 extra, 1 different (dry run")
            && text.contains("public.tags: 2 missing in the target, 2 extra, 1 different (dry run")
            && text.contains(r#"missing    {"label": "émile5"}"#),
        "{text}"
    );
    let after = (
        contents(&target, "memberships").await,
        contents(&target, "tags").await,
    );
    assert_eq!(before, after, "--dry-run changed the target");
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM sync_runs WHERE kind = 'repair'"
        )
        .await,
        0
    );

    // One table named: only it is repaired, by this command itself (no daemon runs).
    let output = pair.rowsync(&["repair", "tags"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    assert!(
        stdout(&output).contains("applied by this repair"),
        "{}",
        described(&output)
    );
    pair.assert_synced("tags").await;
    assert_ne!(
        contents(&source, "memberships").await,
        contents(&target, "memberships").await
    );
    let output = pair.rowsync(&["repair"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    pair.assert_synced("memberships").await;
    pair.assert_synced("tags").await;
    let output = pair.rowsync(&["repair", "--dry-run"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    let output = pair.rowsync(&["verify"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
}

/// `VERIFY_INTERVAL_MINUTES`: the daemon finds rows changed by hand by itself and says so in
/// `/metrics`, `/status` and `/health`; with `REPAIR_AUTOMATICALLY=true` it fixes them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_verifies_in_the_background_and_repairs_when_asked() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_old_users(&source, 2000).await;
    pair.setup();
    let target = pair.target().await;
    target
        .batch_execute(
            "DELETE FROM users WHERE name IN ('user-3', 'user-4'); \
             UPDATE users SET bio = 'by hand' WHERE name = 'user-5'",
        )
        .await
        .unwrap();

    let port = crate::harness::free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = [
        ("HEALTH_ADDR", addr.as_str()),
        ("VERIFY_INTERVAL_MINUTES", "0.02"),
    ];
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    pair.wait(
        "the verification to report 3 divergent rows",
        Duration::from_secs(60),
        || async {
            let (_, metrics) = crate::harness::http_get(port, "/metrics").await;
            metrics.contains("rowsync_divergent_rows{table=\"public.users\"} 3")
                && metrics
                    .contains("rowsync_last_verification_timestamp_seconds{table=\"public.users\"}")
        },
    )
    .await;
    let (code, health) = crate::harness::health(port).await;
    assert_eq!(code, 200, "a warning: {health}");
    assert_eq!(health["status"], "DEGRADED", "{health}");
    assert_eq!(health["checks"]["divergence"]["ok"], false, "{health}");
    assert_eq!(health["checks"]["divergence"]["value"]["public.users"], 3);
    let (_, status) = crate::harness::http_get(port, "/status").await;
    let status: Value = serde_json::from_str(&status).unwrap();
    let verified = &status["tables"]["public.users"]["verified"];
    assert_eq!(verified["divergentRows"], 3, "{status}");
    assert_eq!(verified["missing"], 2, "{status}");
    assert_eq!(verified["different"], 1, "{status}");
    assert_eq!(verified["repaired"], false, "{status}");
    // Without REPAIR_AUTOMATICALLY the rows stay as they are.
    assert_ne!(
        contents(&source, "users").await,
        contents(&target, "users").await
    );
    daemon.signal(libc::SIGTERM);
    let mut daemon = daemon;
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));

    let daemon = pair.spawn(&[
        ("HEALTH_ADDR", addr.as_str()),
        ("VERIFY_INTERVAL_MINUTES", "0.02"),
        ("REPAIR_AUTOMATICALLY", "true"),
    ]);
    pair.wait_synced("users", Duration::from_secs(60)).await;
    pair.wait(
        "the next verification to find nothing",
        Duration::from_secs(60),
        || async {
            let (_, health) = crate::harness::health(port).await;
            health["checks"]["divergence"]["ok"] == true
        },
    )
    .await;
    assert!(
        daemon
            .log_text()
            .contains("verification found rows that differ"),
        "{}",
        daemon.log_text()
    );
}

/// Columns whose types differ between the sides (`timestamp` into `timestamptz`, `json` into
/// `jsonb`, `int` into `bigint`) verify as equal when the target holds what rowsync wrote; a
/// target row whose key the source's type cannot hold is reported, and repair says it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differing_types_verify_and_a_key_the_source_cannot_hold_is_reported() {
    let pair = Pair::with_ddl(
        "CREATE TABLE counters (id int PRIMARY KEY, at timestamp NOT NULL, doc json, n int);",
        "CREATE TABLE counters (id bigint PRIMARY KEY, at timestamptz NOT NULL, doc jsonb, n bigint);",
    )
    .await;
    let source = pair.source().await;
    source
        .batch_execute(
            r#"INSERT INTO counters
                 SELECT g, timestamp '2026-01-01 10:00' + g * interval '1 minute',
                        ('{"b": ' || g || ', "a": [1, 2]}')::json, g * 3
                   FROM generate_series(1, 3000) g"#,
        )
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "counters")];
    let output = pair.rowsync(&["setup"], &env);
    assert!(output.status.success(), "{}", described(&output));
    let output = pair.rowsync(&["verify"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));

    let target = pair.target().await;
    target
        .batch_execute(
            r#"INSERT INTO counters VALUES (5000000000, now(), '{}', 1);
               UPDATE counters SET doc = '{"b": 0}' WHERE id = 17;
               DELETE FROM counters WHERE id = 18;"#,
        )
        .await
        .unwrap();
    let output = pair.rowsync(&["verify", "--json"], &env);
    assert_eq!(output.status.code(), Some(1), "{}", described(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let expected = keyset(&[
        ("extra", r#"{"id":5000000000}"#),
        ("different", r#"{"id":17}"#),
        ("missing", r#"{"id":18}"#),
    ]);
    assert_eq!(differences(&report, "public.counters"), expected);

    // repair fixes what it can and names what stays.
    let output = pair.rowsync(&["repair"], &env);
    assert_eq!(output.status.code(), Some(1), "{}", described(&output));
    let text = stdout(&output);
    assert!(
        text.contains("fixed 2 of them") && text.contains("1 still differ: INCONSISTENT"),
        "{text}"
    );
    assert!(text.contains(r#"extra      {"id": 5000000000}"#), "{text}");
    target
        .execute("DELETE FROM counters WHERE id = 5000000000", &[])
        .await
        .unwrap();
    let output = pair.rowsync(&["verify"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
}

/// A partitioned source (two levels) into a partitioned target, and a target whose generated and
/// extra columns are not synced: verify compares the synced columns of every partition's rows,
/// and repair fixes rows changed by hand in partitions of the target while the daemon runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_are_verified_and_repaired_through_their_partitions() {
    const TARGET: &str = "
        CREATE TABLE events (id int, region text, v text,
                             v_upper text GENERATED ALWAYS AS (upper(v)) STORED,
                             note text DEFAULT 'target only',
                             PRIMARY KEY (id, region))
            PARTITION BY LIST (region);
        CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
        CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');";
    let pair = Pair::with_ddl(crate::partitions::PARTITIONED, TARGET).await;
    pair.source()
        .await
        .batch_execute(
            "INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'us' ELSE 'eu' END, 'v' || g \
               FROM generate_series(1, 3000) g",
        )
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "events")];
    let output = pair.rowsync(&["setup"], &env);
    assert!(output.status.success(), "{}", described(&output));
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    let target = pair.target().await;
    // Target-only columns changed by hand are not differences: they are not synced.
    target
        .batch_execute(
            "UPDATE events SET note = 'mine' WHERE id < 100; \
             DELETE FROM events_eu WHERE id IN (1001, 1003); \
             UPDATE events_us SET v = 'by hand' WHERE id = 2000; \
             INSERT INTO events (id, region, v) VALUES (99999, 'eu', 'stray');",
        )
        .await
        .unwrap();
    let output = pair.rowsync(&["verify", "--json"], &env);
    assert_eq!(output.status.code(), Some(1), "{}", described(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let expected = keyset(&[
        ("missing", r#"{"id":1001,"region":"eu"}"#),
        ("missing", r#"{"id":1003,"region":"eu"}"#),
        ("different", r#"{"id":2000,"region":"us"}"#),
        ("extra", r#"{"id":99999,"region":"eu"}"#),
    ]);
    assert_eq!(differences(&report, "public.events"), expected);

    let output = pair.rowsync(&["repair"], &env);
    assert_eq!(output.status.code(), Some(0), "{}", described(&output));
    assert!(
        stdout(&output).contains("applied by the running daemon"),
        "{}",
        described(&output)
    );
    let synced = |client: Client| async move {
        client
            .query("SELECT id, region, v FROM events ORDER BY id, region", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{}|{}|{}",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2)
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        synced(pair.source().await).await,
        synced(pair.target().await).await
    );
    assert_eq!(
        count(&target, "SELECT count(*) FROM events WHERE note = 'mine'").await,
        99,
        "target-only columns are left alone"
    );
    drop(daemon);
}
