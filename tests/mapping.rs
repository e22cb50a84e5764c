//! Mapping from `SYNC_CONFIG`: another target name, renamed, excluded and computed columns, row
//! filters, a chosen key, one source into two targets, and every validation error, against real
//! servers. The target is compared in full with the same mapping written as a query on the source.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::harness::{Pair, USERS, count};

/// Every row of `sql`'s result as text, in its order.
async fn rows(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(&format!("SELECT r::text FROM ({sql}) r"), &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The id of a user with this status.
async fn one_id(source: &Client, status: &str) -> String {
    source
        .query_one(
            "SELECT id::text FROM users WHERE status = $1 LIMIT 1",
            &[&status],
        )
        .await
        .unwrap()
        .get(0)
}

/// Writes `text` as the mapping file of `pair`, returning its path.
fn mapping_file(pair: &Pair, text: &str) -> String {
    let path = pair.dir.path().join("rowsync.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `rowsync setup` with `env`, which must succeed; what it printed.
fn set_up(pair: &Pair, env: &[(&str, &str)]) -> String {
    let setup = pair.rowsync(&["setup"], env);
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    String::from_utf8_lossy(&setup.stdout).into_owned()
}

/// Waits until `target_sql` on the target gives what `source_sql` gives on the source.
async fn wait_equal(pair: &Pair, source_sql: &str, target_sql: &str, timeout: Duration) {
    let (source, target) = (pair.source().await, pair.target().await);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (s, t) = (
            rows(&source, source_sql).await,
            rows(&target, target_sql).await,
        );
        if s == t {
            return;
        }
        if std::time::Instant::now() > deadline {
            let only_s: Vec<&String> = s.iter().filter(|r| !t.contains(r)).take(3).collect();
            let only_t: Vec<&String> = t.iter().filter(|r| !s.contains(r)).take(3).collect();
            panic!(
                "target did not converge within {timeout:?}: source {} rows, target {}; only in source {only_s:?}; only in target {only_t:?}\n{}",
                s.len(),
                t.len(),
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writers that move users in and out of `status <> 'deleted'`, rename them, change emails,
/// insert and delete, until `stop`.
async fn moving_writes(url: String, stop: Arc<AtomicBool>) -> u64 {
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let statements = [
        "UPDATE users SET status = CASE WHEN status = 'deleted' THEN 'active' ELSE 'deleted' END, \
                version = version + 1 \
          WHERE id = (SELECT id FROM users WHERE phone IS DISTINCT FROM 'kept' ORDER BY random() LIMIT 1)",
        "UPDATE users SET name = 'n-' || md5(random()::text), email = NULLIF(md5(random()::text), '') \
          WHERE id IN (SELECT id FROM users WHERE phone IS DISTINCT FROM 'kept' ORDER BY random() LIMIT 3)",
        "INSERT INTO users (name, email, status, phone) \
         VALUES ('new', 'e-' || md5(random()::text), \
                 CASE WHEN random() < 0.5 THEN 'deleted' ELSE 'active' END, '555')",
        "UPDATE users SET email = NULL WHERE id = (SELECT id FROM users WHERE phone IS DISTINCT FROM 'kept' ORDER BY random() LIMIT 1)",
        "DELETE FROM users WHERE id = (SELECT id FROM users WHERE phone IS DISTINCT FROM 'kept' ORDER BY random() LIMIT 1)",
        "UPDATE users SET bio = md5(random()::text), phone = '1' \
          WHERE id = (SELECT id FROM users WHERE phone IS DISTINCT FROM 'kept' ORDER BY random() LIMIT 1)",
    ];
    let mut done = 0;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        client
            .execute(statements[i % statements.len()], &[])
            .await
            .unwrap();
        done += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    done
}

const CHAT_USERS: &str = "
    CREATE TABLE chat_users (
        id           uuid PRIMARY KEY,
        display_name text NOT NULL,
        contact      text,
        status       text NOT NULL,
        version      bigint NOT NULL,
        created_at   timestamptz NOT NULL,
        note         text NOT NULL DEFAULT 'not synced'
    );";

const USERS_MAPPING: &str = r#"
[[table]]
source  = "public.users"
target  = "public.chat_users"
filter  = "status <> 'deleted' -- deleted users stay out; a comment ends at the line"
exclude = ["bio", "phone"]

[table.rename]
email = "contact"

[table.compute]
display_name = "upper(name) || ' <' || coalesce(email, '?') || '>'"
"#;

/// The mapping above as a query on the source, and what it is compared with on the target.
const SOURCE_VIEW: &str = "SELECT id, upper(name) || ' <' || coalesce(email, '?') || '>' AS display_name, \
                                  email AS contact, status, version::bigint, created_at \
                             FROM users WHERE status <> 'deleted' ORDER BY id";
const TARGET_VIEW: &str = "SELECT id, display_name, contact, status, version, created_at \
                             FROM chat_users ORDER BY id";

#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_table_follows_its_filter_renames_and_computed_columns_everywhere() {
    let source_ddl = format!("{USERS} ALTER TABLE users ADD COLUMN phone text;");
    let pair = Pair::with_ddl(&source_ddl, CHAT_USERS).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO users (name, email, status, phone, bio) \
             SELECT 'user ' || i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'u' || i || '@x.org' END, \
                    CASE WHEN i % 3 = 0 THEN 'deleted' ELSE 'active' END, '555-' || i, 'bio' \
               FROM generate_series(1, 300) i",
        )
        .await
        .unwrap();
    // The target already has rows: one kept (a column rowsync does not map is left as it is),
    // one whose source row the filter leaves out, one the source lacks: the copy merges.
    let target = pair.target().await;
    let kept: String = one_id(&source, "active").await;
    // The writers leave this row alone: leaving the filter and coming back would delete and
    // insert it again, with the unmapped column's default.
    source
        .execute(
            "UPDATE users SET phone = 'kept' WHERE id = $1::text::uuid",
            &[&kept],
        )
        .await
        .unwrap();
    let filtered: String = one_id(&source, "deleted").await;
    target
        .execute(
            "INSERT INTO chat_users (id, display_name, status, version, created_at, note) VALUES \
             ($1::text::uuid, 'stale', 'active', 0, now(), 'by hand'), \
             ($2::text::uuid, 'filtered', 'active', 0, now(), 'x'), \
             (gen_random_uuid(), 'gone', 'active', 0, now(), 'x')",
            &[&kept, &filtered],
        )
        .await
        .unwrap();
    let file = mapping_file(&pair, USERS_MAPPING);
    let env = [("SYNC_CONFIG", file.as_str())];

    let printed = set_up(&pair, &env);
    assert!(
        printed.contains("public.users → public.chat_users"),
        "{printed}"
    );
    wait_equal(&pair, SOURCE_VIEW, TARGET_VIEW, Duration::from_secs(5)).await;

    let daemon = pair.spawn(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(moving_writes(pair.source_url(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for writer in writers {
        writes += writer.await.unwrap();
    }
    assert!(writes > 100, "only {writes} writes");
    wait_equal(&pair, SOURCE_VIEW, TARGET_VIEW, Duration::from_secs(30)).await;
    // Rows moved out of the filter and back in again: they are in the target only when in.
    let moved = count(
        &source,
        "SELECT count(*) FROM users WHERE version > 1 AND status <> 'deleted'",
    )
    .await;
    assert!(moved > 0, "no row came back into the filter");
    // The row kept out of the writers' way was updated by the copy, its unmapped column not.
    let note: String = target
        .query_one(
            "SELECT note FROM chat_users WHERE id = $1::text::uuid",
            &[&kept],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        note, "by hand",
        "a column rowsync does not map was overwritten"
    );

    // Verify compares the mapped rows; repair fixes what is changed by hand.
    let verify = pair.rowsync(&["verify"], &env);
    let report = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(
        verify.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        report.contains("public.users → public.chat_users"),
        "{report}"
    );
    target
        .batch_execute(
            "UPDATE chat_users SET contact = 'changed by hand' \
              WHERE id = (SELECT id FROM chat_users ORDER BY id LIMIT 1); \
             DELETE FROM chat_users WHERE id = (SELECT id FROM chat_users ORDER BY id DESC LIMIT 1);",
        )
        .await
        .unwrap();
    let excluded: String = one_id(&source, "deleted").await;
    target
        .execute(
            "INSERT INTO chat_users (id, display_name, status, version, created_at) \
             VALUES ($1::text::uuid, 'left out by the filter', 'active', 1, now())",
            &[&excluded],
        )
        .await
        .unwrap();
    let verify = pair.rowsync(&["verify"], &env);
    let report = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert_eq!(verify.status.code(), Some(1), "{report}");
    for kind in ["MISSING", "EXTRA", "DIFFERENT"] {
        assert!(report.contains(kind), "{kind} not in {report}");
    }
    let repair = pair.rowsync(&["repair"], &env);
    assert!(
        repair.status.success(),
        "{}{}",
        String::from_utf8_lossy(&repair.stdout),
        String::from_utf8_lossy(&repair.stderr)
    );
    wait_equal(&pair, SOURCE_VIEW, TARGET_VIEW, Duration::from_secs(10)).await;

    // The operator's view names the mapping.
    let status = pair.rowsync(&["status"], &env);
    let shown = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        shown.contains("public.users → public.chat_users"),
        "{shown}"
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_source_into_two_targets_loses_nothing_for_either() {
    let target_ddl = format!(
        "{USERS} CREATE TABLE active_users (id uuid PRIMARY KEY, name text NOT NULL, email text);"
    );
    let pair = Pair::with_ddl(USERS, &target_ddl).await;
    let source = pair.source().await;
    crate::harness::seed_users(&source, 100).await;
    let file = mapping_file(
        &pair,
        r#"
[[table]]
source = "users"

[[table]]
source = "users"
target = "active_users"
filter = "status = 'active'"
"#,
    );
    let env = [("SYNC_CONFIG", file.as_str())];
    set_up(&pair, &env);
    let daemon = pair.spawn(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(crate::harness::resilient_writes(
        pair.source_url(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 100);
    pair.wait_synced("users", Duration::from_secs(30)).await;
    wait_equal(
        &pair,
        "SELECT id, name, email FROM users WHERE status = 'active' ORDER BY id",
        "SELECT id, name, email FROM active_users ORDER BY id",
        Duration::from_secs(30),
    )
    .await;
    // Both consumed the journal: it empties.
    pair.wait(
        "the shared journal to empty",
        Duration::from_secs(10),
        || async { count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await == 0 },
    )
    .await;
    drop(daemon);

    // Writes that bypass capture (triggers disabled): setup repairs capture and copies both
    // mappings of the source again, not only the first one it looks at.
    source
        .batch_execute(
            "ALTER TABLE users DISABLE TRIGGER USER;
             UPDATE users SET name = 'bypassed', status = 'active' WHERE id IN (SELECT id FROM users LIMIT 10);
             DELETE FROM users WHERE id IN (SELECT id FROM users WHERE name <> 'bypassed' LIMIT 5);",
        )
        .await
        .unwrap();
    let printed = set_up(&pair, &env);
    assert_eq!(printed.matches("copied").count(), 2, "{printed}");
    pair.assert_synced("users").await;
    wait_equal(
        &pair,
        "SELECT id, name, email FROM users WHERE status = 'active' ORDER BY id",
        "SELECT id, name, email FROM active_users ORDER BY id",
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_primary_key_syncs_by_a_unique_key() {
    let pair = Pair::with_ddl(
        "CREATE TABLE accounts (email text NOT NULL, name text, plan text);
         CREATE UNIQUE INDEX accounts_email ON accounts (email);
         INSERT INTO accounts SELECT 'a' || i || '@x.org', 'name ' || i, 'free' FROM generate_series(1, 50) i;",
        "CREATE TABLE accounts (email text PRIMARY KEY, name text, plan text);",
    )
    .await;
    let file = mapping_file(
        &pair,
        "[[table]]\nsource = \"accounts\"\nkey = [\"email\"]\n",
    );
    let env = [("SYNC_CONFIG", file.as_str())];
    set_up(&pair, &env);
    let daemon = pair.spawn(&env);
    let source = pair.source().await;
    source
        .batch_execute(
            "UPDATE accounts SET plan = 'pro' WHERE email LIKE 'a1%';
             UPDATE accounts SET email = 'renamed-' || email WHERE email LIKE 'a2%';
             DELETE FROM accounts WHERE email LIKE 'a3%';
             INSERT INTO accounts VALUES ('new@x.org', 'new', 'free');",
        )
        .await
        .unwrap();
    let all = "SELECT email, name, plan FROM accounts ORDER BY email";
    wait_equal(&pair, all, all, Duration::from_secs(20)).await;
    let target = pair.target().await;
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM accounts WHERE email LIKE 'a2%'"
        )
        .await,
        0,
        "the old key of a changed key stayed behind"
    );
    // A migration lets the key be NULL: writes still go through (capture never fails one), and
    // capture says it cannot follow.
    source
        .batch_execute(
            "ALTER TABLE accounts ALTER COLUMN email DROP NOT NULL;
             INSERT INTO accounts VALUES (NULL, 'no key', 'free');
             UPDATE accounts SET plan = 'team' WHERE email IS NULL;",
        )
        .await
        .unwrap();
    let lost: Option<String> = source
        .query_one("SELECT lost_reason FROM rowsync.captured_tables", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        lost.is_some_and(|r| r.contains("NULL")),
        "capture did not say it lost the key"
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn computed_values_of_other_types_are_cast_on_the_target_and_one_that_does_not_fit_is_isolated()
 {
    let pair = Pair::with_ddl(
        "CREATE TABLE items (id int PRIMARY KEY, price numeric NOT NULL, happy boolean NOT NULL);
         INSERT INTO items SELECT i, i * 1.25, i % 2 = 0 FROM generate_series(1, 30) i;
         INSERT INTO items VALUES (31, 1e12, true);",
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE TABLE items (id int PRIMARY KEY, cents integer, mood mood, label varchar(8));",
    )
    .await;
    let file = mapping_file(
        &pair,
        r#"
[[table]]
source = "items"
exclude = ["price", "happy"]
[table.compute]
cents = "price * 100"
mood = "CASE WHEN happy THEN 'happy' ELSE 'sad' END"
label = "'#' || id"
"#,
    );
    let env = [("SYNC_CONFIG", file.as_str())];
    set_up(&pair, &env);
    let daemon = pair.spawn(&env);
    pair.source()
        .await
        .batch_execute("UPDATE items SET price = price + 0.004 WHERE id <= 10")
        .await
        .unwrap();
    // numeric into integer rounds as an assignment does; the one too large for an integer is
    // recorded, the others are synced.
    let view = "SELECT id, round(price * 100)::int AS cents, \
                       (CASE WHEN happy THEN 'happy' ELSE 'sad' END) AS mood, '#' || id AS label \
                  FROM items WHERE id <= 30 ORDER BY id";
    let target_view = "SELECT id, cents, mood::text, label FROM items ORDER BY id";
    wait_equal(&pair, view, target_view, Duration::from_secs(20)).await;
    let target = pair.target().await;
    pair.wait(
        "the row that does not fit to be recorded",
        Duration::from_secs(10),
        || async {
            count(
                &target,
                "SELECT count(*) FROM sync_errors WHERE NOT resolved AND record_id = '31'",
            )
            .await
                == 1
        },
    )
    .await;
    drop(daemon);
}

/// `rowsync setup` with this mapping file must exit 2 with one line naming the file, the entry
/// and `expected`, and write nothing into either database.
async fn refused(pair: &Pair, file_text: &str, expected: &str) {
    refused_at(pair, file_text, expected, 1).await;
}

/// As [`refused`], naming entry `entry` of the file.
async fn refused_at(pair: &Pair, file_text: &str, expected: &str, entry: usize) {
    let file = mapping_file(pair, file_text);
    for command in ["setup", "run"] {
        let output = pair.rowsync(&[command], &[("SYNC_CONFIG", file.as_str())]);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let error: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains(" WARN ") && !l.contains(" INFO "))
            .collect();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{command} {file_text}: {stderr}"
        );
        let line = error
            .iter()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        assert!(
            line.contains(&file) && line.contains(&format!("[[table]] {entry}")),
            "{line}"
        );
        assert!(
            line.contains(expected),
            "{file_text}: expected {expected:?} in {line}"
        );
        assert!(!stderr.contains("caused by"), "one line: {stderr}");
    }
    assert_eq!(
        count(
            &pair.source().await,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'rowsync'"
        )
        .await,
        0,
        "{file_text}: the source was written"
    );
    assert_eq!(
        count(
            &pair.target().await,
            "SELECT count(*) FROM pg_class WHERE relname = 'rowsync_progress'"
        )
        .await,
        0,
        "{file_text}: the target was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mapping_error_is_a_configuration_error_before_anything_is_written() {
    let pair = Pair::with_ddl(
        "CREATE TABLE users (id int PRIMARY KEY, first_name text, given_name text, age int,
                             email text NOT NULL, nick text UNIQUE, born date);
         CREATE TABLE logs (line text);",
        "CREATE TABLE users (id int PRIMARY KEY, given_name text, age int, email text,
                             adult boolean, nick text);
         CREATE TABLE logs (line text);",
    )
    .await;
    let entry = |rest: &str| format!("[[table]]\nsource = \"users\"\n{rest}");
    let cases = [
        (
            "[[table]]\nsource = \"nosuch\"\n".to_string(),
            "no such table in the source database",
        ),
        (
            entry("target = \"nosuch\"\n"),
            "no such table in the target database",
        ),
        (entry("exclude = [\"phone\"]\n"), "has no column phone"),
        (entry("exclude = [\"Email\"]\n"), "there is email"),
        (
            entry("[table.rename]\nfirst_name = \"surname\"\n"),
            "the column surname of the target table public.users does not exist",
        ),
        (
            entry("[table.rename]\nfirst_name = \"given_name\"\n"),
            "target column given_name is mapped twice",
        ),
        (entry("filter = \"age >\"\n"), "filter: syntax error"),
        (
            entry("filter = \"agee > 3\"\n"),
            "filter: column \"agee\" does not exist",
        ),
        (
            entry("filter = \"age + 1\"\n"),
            "filter: argument of WHERE must be type boolean",
        ),
        (
            entry("filter = \"true; DROP TABLE users\"\n"),
            "filter: contains `;`",
        ),
        (
            entry("filter = \"true) OR (true\"\n"),
            "filter: has a `)` without its `(`",
        ),
        (
            entry("filter = \"count(*) > 1\"\n"),
            "aggregate functions are not allowed",
        ),
        (
            entry("[table.compute]\nadult = \"age >= \"\n"),
            "compute adult: syntax error",
        ),
        (
            entry("[table.compute]\nadult = \"agee >= 18\"\n"),
            "compute adult: column \"agee\" does not exist",
        ),
        (
            entry("[table.compute]\nage = \"born > now()\"\n"),
            "compute age: column \"age\" is of type integer but expression is of type boolean",
        ),
        (
            entry("[table.compute]\nadult = \"count(*) > 0\"\n"),
            "compute adult: aggregate functions are not allowed",
        ),
        (
            entry("[table.compute]\nnosuch = \"1\"\n"),
            "has no column nosuch that can be written",
        ),
        (
            entry("key = [\"email\"]\n"),
            "key (email) is not the columns of a unique index",
        ),
        (entry("key = [\"nick\"]\n"), "key column nick may be NULL"),
        (
            "[[table]]\nsource = \"logs\"\n".to_string(),
            "has no primary key",
        ),
    ];
    for (text, expected) in cases {
        refused(&pair, &text, expected).await;
    }
    // One target table named two ways: the second entry's copy would delete the first's rows.
    for text in [
        "[[table]]\nsource = \"users\"\nfilter = \"id < 10\"\n[[table]]\nsource = \"public.users\"\nfilter = \"id >= 10\"\n",
        "[[table]]\nsource = \"users\"\ntarget = \"users\"\n[[table]]\nsource = \"public.users\"\ntarget = \"public.users\"\nexclude = [\"age\"]\n",
    ] {
        refused_at(&pair, text, "two entries cannot write one table", 2).await;
    }
    // Both ways of naming tables at once.
    let file = mapping_file(&pair, &entry(""));
    let output = pair.rowsync(
        &["setup"],
        &[("SYNC_CONFIG", file.as_str()), ("SYNC_TABLES", "users")],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SYNC_CONFIG") && stderr.contains("SYNC_TABLES"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_mapping_is_applied_to_the_rows_already_in_the_target() {
    let target_ddl =
        "CREATE TABLE users (id uuid PRIMARY KEY, name text, status text, label text);";
    let pair = Pair::with_ddl(USERS, target_ddl).await;
    let source = pair.source().await;
    crate::harness::seed_users(&source, 60).await;
    source
        .batch_execute("UPDATE users SET status = 'gone' WHERE version % 2 = 0 OR name LIKE '%1%'")
        .await
        .unwrap();
    let mapping = |filter: &str, label: &str| {
        format!(
            "[[table]]\nsource = \"users\"\nfilter = \"{filter}\"\n[table.compute]\nlabel = \"{label}\"\n"
        )
    };
    let file = mapping_file(&pair, &mapping("status = 'active'", "'one: ' || name"));
    // No sweep looks back over updated_at: only the changed mapping can bring the rows again.
    let env = [("SYNC_CONFIG", file.as_str()), ("SYNC_LOOKBACK", "never")];
    set_up(&pair, &env);
    let view = |filter: &str, label: &str| {
        format!("SELECT id, name, status, {label} AS label FROM users WHERE {filter} ORDER BY id")
    };
    let target_view = "SELECT id, name, status, label FROM users ORDER BY id";
    wait_equal(
        &pair,
        &view("status = 'active'", "'one: ' || name"),
        target_view,
        Duration::from_secs(5),
    )
    .await;

    // Changed while stopped: the daemon reads every row again when it starts.
    mapping_file(&pair, &mapping("status <> 'active'", "'two: ' || name"));
    let mut daemon = pair.spawn(&env);
    wait_equal(
        &pair,
        &view("status <> 'active'", "'two: ' || name"),
        target_view,
        Duration::from_secs(20),
    )
    .await;

    // Changed while running: a reload sets the table up again the new way.
    mapping_file(&pair, &mapping("true", "'three: ' || name"));
    daemon.signal(libc::SIGHUP);
    wait_equal(
        &pair,
        &view("true", "'three: ' || name"),
        target_view,
        Duration::from_secs(20),
    )
    .await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn choosing_another_key_for_a_captured_table_needs_setup_and_then_keys_by_it() {
    let ddl = "CREATE TABLE members (id int PRIMARY KEY, email text NOT NULL UNIQUE, name text);";
    let pair = Pair::new(ddl).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO members SELECT i, 'm' || i || '@x.org', 'n' FROM generate_series(1, 20) i",
        )
        .await
        .unwrap();
    set_up(&pair, &[("SYNC_TABLES", "members")]);
    let file = mapping_file(
        &pair,
        "[[table]]\nsource = \"members\"\nkey = [\"email\"]\n",
    );
    let env = [("SYNC_CONFIG", file.as_str())];

    // The journal is keyed by id: the daemon says what to do instead of failing every batch.
    let daemon = pair.spawn(&env);
    pair.wait(
        "the daemon to ask for setup",
        Duration::from_secs(10),
        || async {
            daemon
                .log_text()
                .contains("capture journals the key (id) but the mapping keys rows by (email)")
        },
    )
    .await;
    drop(daemon);

    let printed = set_up(&pair, &env);
    assert!(printed.contains("copied"), "{printed}");
    let daemon = pair.spawn(&env);
    source
        .batch_execute("UPDATE members SET email = 'changed-' || email, name = 'x' WHERE id <= 5")
        .await
        .unwrap();
    pair.wait_synced("members", Duration::from_secs(20)).await;
    drop(daemon);
}

/// A filter that fails every batch for a schema reason (here a setting nobody set) reads the
/// table's mapping again once, then backs off like any failure: it does not reload, "recover"
/// and fail again every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_failing_for_a_schema_reason_backs_off_instead_of_reloading_every_second() {
    let pair = Pair::new(USERS).await;
    let file = mapping_file(
        &pair,
        "[[table]]\nsource = \"users\"\nfilter = \"current_setting('app.tenant') = '1'\"\n",
    );
    let env = [
        ("SYNC_CONFIG", file.as_str()),
        ("RETRY_INITIAL_DELAY", "200"),
        ("RETRY_MAX_DELAY", "2000"),
    ];
    // Set for setup's sessions only.
    let with_setting = format!("{}?options=-c%20app.tenant%3D1", pair.source_url());
    let setup = pair.rowsync(
        &["setup"],
        &[env[0], ("SOURCE_DATABASE_URL", with_setting.as_str())],
    );
    assert!(setup.status.success(), "{setup:?}");
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    pair.source()
        .await
        .batch_execute("INSERT INTO users (name) VALUES ('one')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = daemon.log_text();
    let reloads = log.matches("reading it again").count();
    assert!(reloads <= 1, "{reloads} reloads: {log}");
    let recovered = log.matches("sync recovered").count();
    assert!(recovered <= 1, "{recovered} recoveries: {log}");
}
