//! What a user of the daemon expects beyond the headline guarantees.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::harness::{Pair, USERS, count, resilient_writes, seed_users, wait_for, xmins};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_twice_changes_and_duplicates_nothing() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    let target = pair.target().await;
    seed_users(&source, 300).await;
    let first = pair.setup();
    assert!(
        first.contains("capture installed; copied 300 rows"),
        "{first}"
    );

    let snapshot_sql = "SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'users'::regclass AND NOT tgisinternal)::text \
        || '/' || (SELECT count(*) FROM rowsync.captured_tables)::text \
        || '/' || (SELECT string_agg(tgname::text || tgenabled::text, ',' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 'users'::regclass)";
    let source_state: String = source.query_one(snapshot_sql, &[]).await.unwrap().get(0);
    let progress_sql =
        "SELECT string_agg(table_name || snapshot || copied_at::text, ';') FROM rowsync_progress";
    let progress: String = target.query_one(progress_sql, &[]).await.unwrap().get(0);
    let migrations = count(&target, "SELECT count(*) FROM rowsync_migrations").await;
    let rows = xmins(&target, "true").await;

    let second = pair.setup();
    assert!(
        second.contains("capture already installed; already copied, nothing to do"),
        "{second}"
    );
    let source_state_after: String = source.query_one(snapshot_sql, &[]).await.unwrap().get(0);
    assert_eq!(source_state, source_state_after);
    assert!(source_state.starts_with("4/1/"), "{source_state}");
    let progress_after: String = target.query_one(progress_sql, &[]).await.unwrap().get(0);
    assert_eq!(progress, progress_after);
    assert_eq!(
        migrations,
        count(&target, "SELECT count(*) FROM rowsync_migrations").await
    );
    assert_eq!(
        rows,
        xmins(&target, "true").await,
        "target rows were rewritten"
    );
    assert_eq!(count(&target, "SELECT count(*) FROM users").await, 300);
    assert_eq!(count(&target, "SELECT count(*) FROM sync_errors").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_rows_are_not_rewritten() {
    let (pair, _daemon) = Pair::running(100, &[]).await;
    let source = pair.source().await;
    let target = pair.target().await;
    let before = xmins(&target, "true").await;
    // Rewrites every source row with the same values: journaled, re-read, found identical.
    source
        .execute("UPDATE users SET name = name", &[])
        .await
        .unwrap();
    source
        .execute(
            "UPDATE users SET status = 'changed' WHERE name = 'user-7'",
            &[],
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    wait_for("the journal to drain", Duration::from_secs(10), || async {
        count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await == 0
    })
    .await;
    let after = xmins(&target, "true").await;
    let rewritten = before.iter().filter(|x| !after.contains(x)).count();
    assert_eq!(rewritten, 1, "only the changed row may be rewritten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_arrives_through_the_realtime_path_without_polling_or_sweeps() {
    let (pair, _daemon) = Pair::running(
        0,
        &[
            ("POLL_INTERVAL_MS", "600000"),
            ("SYNC_INTERVAL_MINUTES", "60"),
        ],
    )
    .await;
    let source = pair.source().await;
    // Let the start-up sweep finish and the doorbell be armed.
    let target = pair.target().await;
    crate::harness::wait_for_sweeps(&target, 1, Duration::from_secs(10)).await;
    for i in 0..5 {
        source
            .execute(
                "INSERT INTO users (name) VALUES ($1)",
                &[&format!("rt-{i}")],
            )
            .await
            .unwrap();
        pair.wait_synced("users", Duration::from_secs(5)).await;
    }
}

/// A REPEATABLE READ writer whose snapshot saw the doorbell armed, after another writer rang it
/// meanwhile, must still write (locking the bell's row would be a serialization failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeatable_read_write_after_another_ring_does_not_fail() {
    let (pair, _daemon) = Pair::running(20, &[("SYNC_INTERVAL_MINUTES", "60")]).await;
    let target = pair.target().await;
    crate::harness::wait_for_sweeps(&target, 1, Duration::from_secs(10)).await;
    let source = pair.source().await;
    wait_for(
        "the doorbell to be armed",
        Duration::from_secs(10),
        || async { count(&source, "SELECT count(*) FROM rowsync.doorbell WHERE armed").await == 1 },
    )
    .await;
    let mut late = pair.source().await;
    let tx = late
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    // The snapshot is taken here, with the bell armed.
    tx.query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap();
    source
        .execute(
            "UPDATE users SET status = 'rang' WHERE name = 'user-1'",
            &[],
        )
        .await
        .unwrap();
    tx.execute(
        "UPDATE users SET status = 'late' WHERE name = 'user-2'",
        &[],
    )
    .await
    .expect("the write must not fail because of the doorbell");
    tx.commit().await.unwrap();
    pair.wait_synced("users", Duration::from_secs(10)).await;
}

/// Runs `sql` as a maintenance script bypassing every trigger of `table` might, and turns capture
/// back on: it is intact again, and only the changed catalog rows of the triggers tell that it
/// was off.
async fn with_capture_bypassed(client: &tokio_postgres::Client, table: &str, sql: &str) {
    client
        .batch_execute(&format!(
            "ALTER TABLE {table} DISABLE TRIGGER ALL; {sql};
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER rowsync_capture_insert,
                 ENABLE ALWAYS TRIGGER rowsync_capture_update, ENABLE ALWAYS TRIGGER rowsync_capture_delete,
                 ENABLE ALWAYS TRIGGER rowsync_capture_truncate;"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_catches_changes_made_with_capture_disabled() {
    let (pair, _daemon) = Pair::running(50, &[("SYNC_INTERVAL_MINUTES", "0.02")]).await;
    let source = pair.source().await;
    let target = pair.target().await;
    // The first sweep looks back anyway; what is tested is the sweep after the triggers changed.
    crate::harness::wait_for_sweeps(&target, 1, Duration::from_secs(20)).await;
    with_capture_bypassed(
        &source,
        "users",
        "UPDATE users SET status = 'bulk-fix', updated_at = now() WHERE name LIKE 'user-1%'",
    )
    .await;
    assert_eq!(
        count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await,
        0
    );
    pair.wait_synced("users", Duration::from_secs(20)).await;
}

/// A sweep checks the capture of all its tables with one query: each table must get its own
/// state. Capture is bypassed on the last of four tables only, so a table given another's state
/// would look back in the wrong place and leave the bypassed rows behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_of_many_tables_looks_back_where_capture_was_bypassed() {
    let tables = ["t1", "t2", "t3", "t4"];
    let ddl: String = tables
        .iter()
        .map(|t| {
            format!(
                "CREATE TABLE {t} (id int PRIMARY KEY, v text, \
                 updated_at timestamptz NOT NULL DEFAULT now());"
            )
        })
        .collect();
    let seed: String = tables
        .iter()
        .map(|t| {
            format!(
                "INSERT INTO {t} SELECT g, '{t}-' || g, now() - interval '1 day' \
                 FROM generate_series(1, 20) g;"
            )
        })
        .collect();
    let pair = Pair::new(&ddl).await;
    let source = pair.source().await;
    let target = pair.target().await;
    source.batch_execute(&seed).await.unwrap();
    let env = [
        ("SYNC_TABLES", "t1,t2,t3,t4"),
        ("SYNC_INTERVAL_MINUTES", "0.02"),
    ];
    let setup = pair.rowsync(&["setup"], &env);
    assert!(setup.status.success(), "{setup:?}");
    let _daemon = pair.spawn(&env);
    crate::harness::wait_for_sweeps(&target, 2, Duration::from_secs(30)).await;
    with_capture_bypassed(
        &source,
        "t4",
        "UPDATE t4 SET v = 'bypassed', updated_at = now() WHERE id <= 5",
    )
    .await;
    for table in tables {
        pair.wait_synced(table, Duration::from_secs(30)).await;
    }
    assert_eq!(
        count(&target, "SELECT count(*) FROM t4 WHERE v = 'bypassed'").await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_key_changes_and_varied_types_sync() {
    let source_ddl = "
        CREATE TYPE mood AS ENUM ('happy', 'sad');
        CREATE TABLE items (
            tenant   integer,
            code     text,
            price    numeric(12, 2),
            tags     text[],
            doc      json,
            raw      bytea,
            at       timestamptz,
            spot     point,
            feeling  mood,
            note     varchar(20),
            only_src text,
            PRIMARY KEY (tenant, code)
        );";
    let target_ddl = "
        CREATE TYPE mood AS ENUM ('sad', 'happy');
        CREATE TABLE items (
            code     text,
            tenant   bigint,
            price    numeric(12, 2),
            tags     text[],
            doc      json,
            raw      bytea,
            at       timestamptz,
            spot     point,
            feeling  mood,
            note     text,
            only_tgt text DEFAULT 'kept',
            PRIMARY KEY (tenant, code)
        );";
    let pair = Pair::with_ddl(source_ddl, target_ddl).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO items VALUES
               (1, 'a', 9.99, '{x,y}', '{\"k\": [1, 2]}', '\\x00ff', '2024-01-02 03:04:05+00', '(1,2)', 'happy', 'n1', 's'),
               (1, 'b', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
               (2, 'it''s', 0.5, '{}', '[]', '', 'infinity', '(0,0)', 'sad', '', '');",
        )
        .await
        .unwrap();
    let output = pair.rowsync(&["setup"], &[("SYNC_TABLES", "items")]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let daemon = pair.spawn(&[("SYNC_TABLES", "items")]);
    daemon.wait_listening(&pair).await;
    source
        .batch_execute(
            "UPDATE items SET code = 'renamed', price = 1.10 WHERE tenant = 1 AND code = 'a';
             UPDATE items SET doc = '{\"new\": true}', spot = '(5,5)', feeling = 'sad' WHERE code = 'b';
             INSERT INTO items VALUES (3, 'c', 3, '{\"q,r\"}', 'null', '\\xdeadbeef', now(), '(9,9)', 'happy', 'n3', 'z');
             DELETE FROM items WHERE tenant = 2;",
        )
        .await
        .unwrap();
    let target = pair.target().await;
    let shared = "SELECT tenant::bigint, code, price, tags, doc::text, raw, at, spot::text, feeling::text, note::text \
                  FROM items ORDER BY tenant, code";
    let render = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| format!("{:?}", r.try_get::<_, Option<String>>(i).ok().flatten()))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()
    };
    let text_sql = format!("SELECT t::text FROM ({shared}) t");
    pair.wait("items to converge", Duration::from_secs(20), || async {
        render(source.query(&text_sql, &[]).await.unwrap())
            == render(target.query(&text_sql, &[]).await.unwrap())
    })
    .await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM items WHERE code = 'a'").await,
        0
    );
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM items WHERE only_tgt = 'kept'"
        )
        .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_on_the_source_empties_the_target() {
    let (pair, _daemon) = Pair::running(200, &[]).await;
    let source = pair.source().await;
    source
        .batch_execute("TRUNCATE users; INSERT INTO users (name) VALUES ('after-truncate')")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    assert_eq!(
        count(&pair.target().await, "SELECT count(*) FROM users").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_merges_into_a_target_that_already_has_rows() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    let target = pair.target().await;
    seed_users(&source, 100).await;
    // The target holds a stale copy: one row changed, one missing, one extra.
    for row in source
        .query("SELECT t::text FROM users t", &[])
        .await
        .unwrap()
    {
        let text: String = row.get(0);
        target
            .execute("INSERT INTO users SELECT ($1::text::users).*", &[&text])
            .await
            .unwrap();
    }
    target
        .batch_execute(
            "UPDATE users SET status = 'stale' WHERE name = 'user-1';
             DELETE FROM users WHERE name = 'user-2';
             INSERT INTO users (name) VALUES ('only-in-target');",
        )
        .await
        .unwrap();
    let summary = pair.setup();
    assert!(
        summary.contains("copied 100 rows")
            && summary.contains("(1 created, 1 updated, 1 deleted, 98 unchanged)"),
        "{summary}"
    );
    pair.assert_synced("users").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_slower_than_80_percent_of_the_interval_warns_and_sweeps_never_overlap() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_users(&source, 30_000).await;
    pair.setup();
    // Every sweep re-reads the 30,000 recently updated rows: far longer than 80% of 120 ms.
    let mut daemon = pair.spawn(&[
        ("SYNC_INTERVAL_MINUTES", "0.002"),
        ("SYNC_WINDOW_MULTIPLIER", "1000"),
        ("SYNC_LOOKBACK", "always"),
    ]);
    let target = pair.target().await;
    pair.wait("three sweeps", Duration::from_secs(30), || async {
        crate::harness::finished_sweeps(&target).await >= 3
    })
    .await;
    source
        .execute(
            "UPDATE users SET status = 'during-sweeps' WHERE name = 'user-9'",
            &[],
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));
    let log = daemon.log_text();
    assert!(
        log.contains("sweep took more than 80% of the interval"),
        "{log}"
    );
    assert!(crate::harness::assert_sweeps_never_overlapped(&pair).await >= 3);
}

#[test]
fn run_before_setup_fails_and_says_what_to_do() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pair = runtime.block_on(Pair::new(USERS));
    let output = pair.rowsync(&["run"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("run `rowsync setup` first"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_journal_is_truncated_once_empty_and_never_while_a_writer_holds_it() {
    const JOURNAL: &str = "rowsync.public_users_journal";
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_users(&source, 30_000).await;
    pair.setup();
    let size = format!("SELECT pg_relation_size('{JOURNAL}')");

    // A writer whose transaction has journaled a change and stays open: the journal must not be
    // truncated under it, and its change must arrive once it commits.
    let mut holder = pair.source().await;
    let open = holder.transaction().await.unwrap();
    open.execute(
        "UPDATE users SET status = 'held' WHERE name = 'user-1'",
        &[],
    )
    .await
    .unwrap();
    // About 1.5 MB of journal, consumed in one go by the daemon's first pass.
    source
        .execute(
            "UPDATE users SET version = version + 1 WHERE name <> 'user-1'",
            &[],
        )
        .await
        .unwrap();
    assert!(count(&source, &size).await > 1 << 20);

    let daemon = pair.spawn(&[]);
    let target = pair.target().await;
    pair.wait(
        "the bulk update to arrive",
        Duration::from_secs(60),
        || async { count(&target, "SELECT count(*) FROM users WHERE version = 2").await == 29_999 },
    )
    .await;
    // The journal was vacuumed after those rows, and the truncation deferred: the writer holds it.
    assert!(!daemon.log_text().contains("truncated the emptied journal"));
    open.commit().await.unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM users WHERE status = 'held'").await,
        1
    );

    // Large batches while writers keep committing: a truncation may find the journal free between
    // their transactions, but never empty of their unconsumed rows, which must all arrive.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(resilient_writes(pair.source_url(), stop.clone())))
        .collect();
    for _ in 0..4 {
        // Only the seeded rows: a change to the writers' own rows, were it lost with the journal,
        // would not be journaled again by this update. It may deadlock with a writer: retry.
        while let Err(err) = source
            .execute(
                "UPDATE users SET version = version + 1 WHERE name LIKE 'user-%'",
                &[],
            )
            .await
        {
            assert_eq!(err.code(), Some(&SqlState::T_R_DEADLOCK_DETECTED), "{err}");
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        assert!(writer.await.unwrap() > 0);
    }
    pair.wait_synced("users", Duration::from_secs(60)).await;

    // Writers gone, the next large batch finds the journal empty and gives its space back.
    source
        .execute("UPDATE users SET version = version + 1", &[])
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(60)).await;
    pair.wait(
        "the journal to be truncated",
        Duration::from_secs(30),
        || async { count(&source, &size).await == 0 },
    )
    .await;
    assert!(daemon.log_text().contains("truncated the emptied journal"));
    pair.assert_synced("users").await;
    assert_eq!(count(&target, "SELECT count(*) FROM sync_errors").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_needs_only_the_documented_privileges_on_the_source() {
    // A partitioned table too: privileges on the table, none on its partitions.
    let events = "CREATE TABLE events (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
        CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (0) TO (100);
        CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (100) TO (1000);";
    let pair = Pair::new(&format!("{USERS}{events}")).await;
    let source = pair.source().await;
    seed_users(&source, 100).await;
    source
        .batch_execute("INSERT INTO events SELECT g, 'e' || g FROM generate_series(1, 200) g")
        .await
        .unwrap();
    let tables = ("SYNC_TABLES", "users,events");
    let setup = pair.rowsync(&["setup"], &[tables]);
    assert!(setup.status.success(), "{setup:?}");
    // The README's list for `run` on the source, and nothing more.
    source
        .batch_execute(
            "CREATE ROLE runner LOGIN;
             GRANT SELECT ON users TO runner;
             GRANT USAGE ON SCHEMA rowsync TO runner;
             GRANT SELECT ON rowsync.captured_tables TO runner;
             GRANT SELECT, DELETE ON rowsync.public_users_journal TO runner;
             GRANT SELECT ON events TO runner;
             GRANT SELECT, DELETE ON rowsync.public_events_journal TO runner;
             GRANT EXECUTE ON FUNCTION rowsync.arm_doorbell() TO runner;",
        )
        .await
        .unwrap();
    let runner_url = pair.source_url().replacen("postgres@", "runner@", 1);
    assert!(runner_url.contains("runner@"), "{runner_url}");
    let daemon = pair.spawn(&[("SOURCE_DATABASE_URL", &runner_url), tables]);
    daemon.wait_listening(&pair).await;
    source
        .batch_execute(
            "UPDATE users SET status = 'away' WHERE name LIKE 'user-1%';
             DELETE FROM users WHERE name = 'user-2';
             INSERT INTO users (name) VALUES ('newcomer');
             UPDATE events SET v = 'moved up', id = id + 500 WHERE id < 10;",
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
    pair.wait_synced("events", Duration::from_secs(30)).await;
    assert!(
        daemon
            .log_text()
            .contains("the journal is owned by another role"),
        "{}",
        daemon.log_text()
    );
    let verify = pair.rowsync(&["verify"], &[("SOURCE_DATABASE_URL", &runner_url), tables]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let target = pair.target().await;
    assert_eq!(count(&target, "SELECT count(*) FROM sync_errors").await, 0);
}
