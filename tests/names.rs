//! Any legal name: schemas and tables whose names hold dots, quotes, spaces or multibyte
//! characters up to PostgreSQL's 63 bytes each get their own progress, journal, functions and
//! metrics, and their writes never fail.

use std::time::Duration;

use crate::harness::{Pair, contents, count, free_port, http_get};

/// 31 two-byte letters: 62 bytes. With one more ASCII letter, 63: the longest legal name.
const LONG: &str = "жжжжжжжжжжжжжжжжжжжжжжжжжжжжжжж";

fn ddl() -> String {
    format!(
        r#"CREATE SCHEMA "a.b"; CREATE SCHEMA a; CREATE SCHEMA "My Schema";
        CREATE TABLE "a.b".c (id int PRIMARY KEY, v text);
        CREATE TABLE a."b.c" (id int PRIMARY KEY, v text);
        CREATE TABLE "My Schema"."Wé""ird, name" ("the id" int PRIMARY KEY, "value with space" text);
        CREATE TABLE "таблица_пользователей_сервиса" (id int PRIMARY KEY, v text);
        CREATE TABLE "{LONG}a" (id int PRIMARY KEY, v text);
        CREATE TABLE "{LONG}b" (id int PRIMARY KEY, v text);
        CREATE TABLE payments (txid bigint PRIMARY KEY, amount numeric);"#
    )
}

/// The tables of [`ddl`], as SQL names (for SYNC_TABLES and for queries).
fn tables() -> Vec<String> {
    vec![
        r#""a.b".c"#.to_string(),
        r#"a."b.c""#.to_string(),
        r#""My Schema"."Wé""ird, name""#.to_string(),
        "таблица_пользователей_сервиса".to_string(),
        format!(r#""{LONG}a""#),
        format!(r#""{LONG}b""#),
        "payments".to_string(),
    ]
}

/// Inserts, updates and deletes in `table` (first column the key, second a value).
async fn write(source: &tokio_postgres::Client, table: &str, round: i32) {
    let columns: Vec<String> = source
        .query(
            "SELECT quote_ident(attname) FROM pg_attribute \
              WHERE attrelid = $1::text::regclass AND attnum > 0 ORDER BY attnum",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (key, value) = (&columns[0], &columns[1]);
    let value_type = if table == "payments" {
        "numeric"
    } else {
        "text"
    };
    source
        .batch_execute(&format!(
            "INSERT INTO {table} ({key}, {value}) \
               SELECT g, (g * {round})::{value_type} FROM generate_series({round} * 10, {round} * 10 + 9) g;
             UPDATE {table} SET {value} = ({key} + 1000)::{value_type} WHERE {key} % 3 = 0;
             DELETE FROM {table} WHERE {key} % 5 = 0;"
        ))
        .await
        .unwrap_or_else(|err| panic!("writing to {table}: {err}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_with_any_legal_name_sync_without_collisions() {
    let pair = Pair::new(&ddl()).await;
    let source = pair.source().await;
    let target = pair.target().await;
    let tables = tables();
    for table in &tables {
        write(&source, table, 1).await;
    }
    let list = tables.join(",");
    let setup = pair.rowsync(&["setup"], &[("SYNC_TABLES", &list)]);
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _daemon = pair.spawn(&[("SYNC_TABLES", &list), ("HEALTH_ADDR", &addr)]);

    // Every write succeeds (the trigger functions of the long names once collided, making every
    // write to them fail) and reaches the target, each table from its own position.
    for round in 2..5 {
        for table in &tables {
            write(&source, table, round).await;
        }
    }
    for table in &tables {
        pair.wait_synced(table, Duration::from_secs(30)).await;
        assert!(!contents(&target, table).await.is_empty(), "{table}");
    }

    let names: Vec<String> = target
        .query(
            "SELECT table_name FROM rowsync_progress ORDER BY table_name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut expected = vec![
        r#""My Schema"."Wé""ird, name""#.to_string(),
        r#""a.b".c"#.to_string(),
        r#"a."b.c""#.to_string(),
        format!("public.{LONG}a"),
        format!("public.{LONG}b"),
        "public.payments".to_string(),
        "public.таблица_пользователей_сервиса".to_string(),
    ];
    expected.sort();
    assert_eq!(names, expected);
    // Journals and functions: one of each per table, each within 63 bytes.
    assert_eq!(
        count(
            &source,
            "SELECT count(DISTINCT p.proname) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
              WHERE t.tgname LIKE 'rowsync_capture%' AND octet_length(p.proname) <= 63"
        )
        .await,
        tables.len() as i64
    );
    assert_eq!(
        count(
            &source,
            "SELECT count(DISTINCT journal_name) FROM rowsync.captured_tables"
        )
        .await,
        tables.len() as i64
    );

    let (code, metrics) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"rowsync_journal_pending{table="\"My Schema\".\"Wé\"\"ird, name\""}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_kept_under_an_earlier_versions_name_is_adopted() {
    let ddl = r#"CREATE TABLE "Users" (id int PRIMARY KEY, v text);"#;
    let pair = Pair::new(ddl).await;
    let source = pair.source().await;
    let target = pair.target().await;
    source
        .batch_execute(r#"INSERT INTO "Users" SELECT g, 'v' || g FROM generate_series(1, 50) g"#)
        .await
        .unwrap();
    let tables = [("SYNC_TABLES", r#""Users""#)];
    assert!(pair.rowsync(&["setup"], &tables).status.success());
    // What an earlier version recorded: the unquoted name, and an open error under it.
    target
        .batch_execute(
            r#"UPDATE rowsync_progress SET table_name = 'public.Users';
               INSERT INTO sync_errors (error_type, table_name, record_id, error_message, metadata)
               VALUES ('CONSTRAINT_VIOLATION', 'public.Users', '7', 'earlier', '{"key": {"id": 7}}');"#,
        )
        .await
        .unwrap();
    let _daemon = pair.spawn(&tables);
    source
        .batch_execute(r#"UPDATE "Users" SET v = 'changed' WHERE id <= 10"#)
        .await
        .unwrap();
    pair.wait_synced(r#""Users""#, Duration::from_secs(30))
        .await;
    assert_eq!(
        count(
            &target,
            r#"SELECT count(*) FROM rowsync_progress WHERE table_name = 'public."Users"' AND snapshot IS NOT NULL"#
        )
        .await,
        1
    );
    assert_eq!(
        count(&target, "SELECT count(*) FROM rowsync_progress").await,
        1
    );
    // The row of the open error was re-read and is resolved under the table's name.
    pair.wait(
        "the earlier error to be resolved",
        Duration::from_secs(30),
        || async {
            count(
            &target,
            r#"SELECT count(*) FROM sync_errors WHERE table_name = 'public."Users"' AND resolved"#,
        )
        .await
            == 1
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_calling_another_function_are_replaced_without_a_copy() {
    let pair = Pair::new("CREATE TABLE t (id int PRIMARY KEY, v text);").await;
    let source = pair.source().await;
    let target = pair.target().await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 20) g")
        .await
        .unwrap();
    let tables = [("SYNC_TABLES", "t")];
    assert!(pair.rowsync(&["setup"], &tables).status.success());
    // As an earlier version left it: the triggers call functions of other names.
    source
        .batch_execute("ALTER FUNCTION rowsync.public_t_capture() RENAME TO old_capture;")
        .await
        .unwrap();
    let setup = pair.rowsync(&["setup"], &tables);
    let out = String::from_utf8_lossy(&setup.stdout).into_owned();
    assert!(setup.status.success(), "{out}");
    assert!(out.contains("upgraded"), "{out}");
    assert!(
        out.contains("already copied, nothing to do"),
        "no copy after an upgrade: {out}"
    );
    assert_eq!(
        count(
            &source,
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
              WHERE t.tgrelid = 't'::regclass AND p.proname = 'public_t_capture'"
        )
        .await,
        4
    );
    assert_eq!(
        count(
            &source,
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'old_capture%'"
        )
        .await,
        0,
        "the functions no trigger calls are dropped"
    );
    let _daemon = pair.spawn(&tables);
    source
        .batch_execute("UPDATE t SET v = 'w' WHERE id < 5; UPDATE t SET id = 100 WHERE id = 10")
        .await
        .unwrap();
    pair.wait_synced("t", Duration::from_secs(30)).await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM t WHERE id = 10").await,
        0
    );
}
