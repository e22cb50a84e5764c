//! Tables that come and go without a restart: SIGHUP re-reads the configuration (`.env`), a table
//! added is set up while the others keep streaming, one removed stops being applied (its capture
//! stays until `rowsync teardown`), a bad configuration is rejected and the running one kept; and
//! `rowsync resync` copies a table again while the daemon streams and the source is written.

use std::time::Duration;

use crate::harness::proxy::Proxy;
use crate::harness::{Daemon, Pair, contents, count, slow_writes};

const TABLES: &str = "CREATE TABLE a (id int PRIMARY KEY, v text NOT NULL);
     CREATE TABLE b (id int PRIMARY KEY, v text NOT NULL);";

fn write_dotenv(pair: &Pair, tables: &str) {
    std::fs::write(
        pair.dir.path().join(".env"),
        format!("SYNC_TABLES={tables}\n"),
    )
    .unwrap();
}

/// Rows `1..=a` in table `a` and `1..=b` in table `b` of the source.
async fn fill(source: &tokio_postgres::Client, a: i32, b: i32) {
    source
        .execute(
            "INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, $1) g",
            &[&a],
        )
        .await
        .unwrap();
    source
        .execute(
            "INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, $1) g",
            &[&b],
        )
        .await
        .unwrap();
}

async fn triggers_on(source: &tokio_postgres::Client, table: &str) -> i64 {
    count(
        source,
        &format!(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass AND tgname LIKE 'rowsync%'"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_tables_and_keeps_a_bad_configuration_out() {
    let pair = Pair::new(TABLES).await;
    let source = pair.source().await;
    let target = pair.target().await;
    fill(&source, 100, 100).await;
    write_dotenv(&pair, "a");
    pair.setup();
    assert_eq!(triggers_on(&source, "b").await, 0);
    let daemon = pair.spawn(&[]);
    daemon.wait_listening(&pair).await;
    pair.wait_synced("a", Duration::from_secs(20)).await;

    // Added: set up (capture, copy) and streamed from then on, while `a` keeps streaming.
    write_dotenv(&pair, "a,b");
    daemon.signal(libc::SIGHUP);
    source
        .batch_execute("UPDATE a SET v = 'during the copy' WHERE id <= 10")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(30)).await;
    source
        .batch_execute("UPDATE b SET v = 'streamed' WHERE id <= 10; DELETE FROM b WHERE id > 90;")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(20)).await;
    pair.wait_synced("a", Duration::from_secs(20)).await;

    // A configuration that does not parse is rejected; the running one goes on.
    write_dotenv(&pair, "a,,b");
    daemon.signal(libc::SIGHUP);
    pair.wait(
        "the rejection in the log",
        Duration::from_secs(10),
        || async {
            daemon
                .log_text()
                .contains("the new configuration is rejected")
        },
    )
    .await;
    source
        .batch_execute("UPDATE a SET v = 'after the bad reload' WHERE id <= 5; UPDATE b SET v = 'too' WHERE id <= 5;")
        .await
        .unwrap();
    pair.wait_synced("a", Duration::from_secs(20)).await;
    pair.wait_synced("b", Duration::from_secs(20)).await;

    // Removed: no longer applied; its capture stays until teardown.
    write_dotenv(&pair, "b");
    daemon.signal(libc::SIGHUP);
    pair.wait_logged(
        &daemon,
        "the removal in the log",
        "removed from the configuration",
        Duration::from_secs(10),
    )
    .await;
    let a_before = contents(&target, "a").await;
    source
        .batch_execute("UPDATE a SET v = 'not synced any more' WHERE id <= 5; UPDATE b SET v = 'still synced' WHERE id <= 5;")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(contents(&target, "a").await, a_before);
    assert_eq!(triggers_on(&source, "a").await, 4);
    let teardown = pair.rowsync(&["teardown", "a"], &[]);
    let out = String::from_utf8_lossy(&teardown.stdout).into_owned();
    assert!(teardown.status.success(), "{teardown:?}");
    assert!(out.contains("a: capture removed"), "{out}");
    assert_eq!(triggers_on(&source, "a").await, 0);
    assert!(daemon.is_running(), "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_copies_one_table_again_while_the_daemon_streams_and_the_source_is_written() {
    let pair = Pair::new(TABLES).await;
    let source = pair.source().await;
    let target = pair.target().await;
    fill(&source, 20000, 100).await;
    let tables = [("SYNC_TABLES", "a,b")];
    assert!(pair.rowsync(&["setup"], &tables).status.success());
    let daemon = pair.spawn(&tables);
    daemon.wait_listening(&pair).await;
    // Divergence made by hand in the target: rows missing, extra and different.
    target
        .batch_execute(
            "DELETE FROM a WHERE id % 100 = 0; INSERT INTO a VALUES (-1, 'extra');
             UPDATE a SET v = 'wrong' WHERE id % 77 = 0;",
        )
        .await
        .unwrap();
    let writes = tokio::spawn({
        let url = pair.source_url();
        async move {
            let client = crate::harness::connect(&url).await;
            for i in 0..200 {
                client
                    .batch_execute(&format!(
                        "UPDATE a SET v = 'write {i}' WHERE id = {}; UPDATE b SET v = 'write {i}' WHERE id = {};",
                        i * 97 % 20000 + 1,
                        i % 100 + 1
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let resync = pair.rowsync(&["resync", "a"], &tables);
    let out = String::from_utf8_lossy(&resync.stdout).into_owned();
    assert!(resync.status.success(), "{resync:?}");
    assert!(
        out.contains("public.a: capture already installed; copied 20000 rows"),
        "{out}"
    );
    writes.await.unwrap();
    pair.wait_synced("a", Duration::from_secs(30)).await;
    pair.wait_synced("b", Duration::from_secs(30)).await;

    // Only configured tables; exit 2 naming the variable.
    let wrong = pair.rowsync(&["resync", "nope"], &tables);
    assert_eq!(wrong.status.code(), Some(2), "{wrong:?}");
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("SYNC_TABLES"));
    drop(daemon);
    // And without a daemon running.
    target
        .batch_execute("DELETE FROM b WHERE id <= 3")
        .await
        .unwrap();
    assert!(pair.rowsync(&["resync", "b"], &tables).status.success());
    assert_eq!(contents(&source, "b").await, contents(&target, "b").await);
}

/// A daemon syncing `a` that a reload has just told to add `b` (`rows` rows), whose copy is in
/// flight: each row the copy writes into the target's b takes 20 ms.
async fn daemon_copying_b(rows: i32) -> (Pair, Daemon) {
    let slow_b = format!("{TABLES}{}", slow_writes("b", "INSERT", 0.02));
    let pair = Pair::with_ddl(TABLES, &slow_b).await;
    fill(&pair.source().await, 10, rows).await;
    write_dotenv(&pair, "a");
    pair.setup();
    let daemon = pair.spawn(&[]);
    daemon.wait_listening(&pair).await;
    write_dotenv(&pair, "a,b");
    daemon.signal(libc::SIGHUP);
    let target = pair.target().await;
    pair.wait(
        "the copy of b to be in flight",
        Duration::from_secs(20),
        || async {
            count(
                &target,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
            )
            .await
                > 0
        },
    )
    .await;
    (pair, daemon)
}

/// A table a reload added, handed over to a second process while it is being set up: the setup
/// finishes where it started, the second process (which has only that table, not set up when it
/// gets it) waits for it instead of giving up, and applies the table from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_handed_over_while_being_set_up_is_set_up_and_applied_by_its_new_owner() {
    let (pair, first) = daemon_copying_b(600).await;
    let source = pair.source().await;
    let second = pair.spawn(&[("SYNC_TABLES", "a,b")]);
    pair.wait_logged(
        &first,
        "the hand-over of b",
        "handing the table over",
        Duration::from_secs(20),
    )
    .await;
    source
        .batch_execute("UPDATE b SET v = 'after the hand-over' WHERE id <= 5")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(60)).await;
    assert!(second.is_running(), "{}", second.log_text());
    // The first process says how the setup it finished for the second one ended.
    pair.wait_logged(
        &first,
        "the end of b's setup in the first process",
        "set up for the process that applies it now",
        Duration::from_secs(20),
    )
    .await;
    source
        .batch_execute("UPDATE b SET v = 'applied by its new owner' WHERE id > 590")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(20)).await;
    pair.wait_synced("a", Duration::from_secs(10)).await;
}

/// A reload that comes while the daemon applies nothing (the target out of reach: it lost its
/// lock session and is waiting to take the locks again) adds its table all the same: the start
/// that follows sets the table up, where before it took the table for one set up already and
/// reported it as not set up for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_by_a_reload_while_the_target_is_out_of_reach_is_set_up_when_it_is_back() {
    let pair = Pair::new(TABLES).await;
    let source = pair.source().await;
    fill(&source, 10, 50).await;
    write_dotenv(&pair, "a");
    pair.setup();
    let proxy = Proxy::start(pair.target.port()).await;
    let url = proxy.url("app");
    let daemon = pair.spawn(&[("TARGET_DATABASE_URL", &url)]);
    daemon.wait_listening(&pair).await;
    pair.wait_synced("a", Duration::from_secs(20)).await;

    pair.lose_the_target(&proxy, &daemon).await;
    write_dotenv(&pair, "a,b");
    daemon.signal(libc::SIGHUP);
    pair.wait_logged(
        &daemon,
        "the reload",
        "configuration reloaded",
        Duration::from_secs(10),
    )
    .await;
    proxy.heal().await;
    pair.wait_synced("b", Duration::from_secs(60)).await;
    source
        .batch_execute("UPDATE b SET v = 'streamed' WHERE id <= 5; DELETE FROM b WHERE id > 45;")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(20)).await;
    pair.wait_synced("a", Duration::from_secs(10)).await;
}

/// A second setup of a table that another setup is copying (here `rowsync setup` while the
/// daemon sets up a table a reload added; in production also a process that handed the table
/// over or lost its lead, finishing its setup) waits for that copy and copies nothing again,
/// however short its lock timeout: before, it waited on the copy's lock, gave up after its
/// retries, and failed (or, after a short copy, copied the whole table again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_of_a_table_being_copied_waits_for_that_copy_and_copies_nothing_again() {
    let (pair, _daemon) = daemon_copying_b(400).await;
    let source = pair.source().await;
    let target = pair.target().await;
    let setup = pair.rowsync(
        &["setup"],
        &[("SYNC_TABLES", "b"), ("LOCK_TIMEOUT_SECONDS", "0.2")],
    );
    let stdout = String::from_utf8_lossy(&setup.stdout);
    assert!(
        setup.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    assert!(stdout.contains("already copied, nothing to do"), "{stdout}");
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM sync_runs WHERE kind = 'copy' AND table_name = 'public.b'"
        )
        .await,
        1
    );
    source
        .batch_execute("UPDATE b SET v = 'streamed' WHERE id <= 5")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(30)).await;
}

/// A table a reload added whose setup fails (here: the target has no such table yet) is failing
/// like any other, recorded in `sync_errors` and retried: once the target has the table, the
/// daemon sets it up and syncs it without another reload, and the record is resolved. Before,
/// the table was dropped from the loop until the next reload, and nothing but one log line said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_whose_setup_failed_is_recorded_and_set_up_once_what_stopped_it_is_fixed() {
    let pair = Pair::with_ddl(
        TABLES,
        "CREATE TABLE a (id int PRIMARY KEY, v text NOT NULL);",
    )
    .await;
    let source = pair.source().await;
    let target = pair.target().await;
    fill(&source, 10, 50).await;
    write_dotenv(&pair, "a");
    pair.setup();
    let daemon = pair.spawn(&[
        ("RETRY_INITIAL_DELAY", "200"),
        ("RETRY_MAX_DELAY", "1000"),
        ("MAX_RETRIES", "1"),
    ]);
    daemon.wait_listening(&pair).await;
    pair.wait_synced("a", Duration::from_secs(20)).await;

    write_dotenv(&pair, "a,b");
    daemon.signal(libc::SIGHUP);
    let open_b =
        "SELECT count(*) FROM sync_errors WHERE table_name IN ('b', 'public.b') AND NOT resolved";
    pair.wait(
        "b's failed setup in sync_errors",
        Duration::from_secs(30),
        || async { count(&target, open_b).await == 1 },
    )
    .await;
    // Retried all the while, and still one record: an episode, not a row per attempt.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&target, open_b).await, 1, "{}", daemon.log_text());
    source
        .batch_execute("UPDATE a SET v = 'streamed meanwhile' WHERE id <= 5")
        .await
        .unwrap();
    pair.wait_synced("a", Duration::from_secs(20)).await;

    target
        .batch_execute("CREATE TABLE b (id int PRIMARY KEY, v text NOT NULL)")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(30)).await;
    source
        .batch_execute("UPDATE b SET v = 'streamed' WHERE id <= 5; DELETE FROM b WHERE id > 45;")
        .await
        .unwrap();
    pair.wait_synced("b", Duration::from_secs(20)).await;
    pair.wait("b's record resolved", Duration::from_secs(10), || async {
        count(&target, open_b).await == 0
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log_text());
}

/// One reload adding many tables sets them all up, side by side, and none fails: before, their
/// setups replaced the shared capture functions at the same moment and most failed with "tuple
/// concurrently updated".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adding_many_tables_sets_up_every_one_of_them() {
    const ADDED: usize = 10;
    let ddl: String = (0..=ADDED)
        .map(|i| format!("CREATE TABLE t{i} (id int PRIMARY KEY, v text NOT NULL);"))
        .collect();
    let pair = Pair::new(&ddl).await;
    let source = pair.source().await;
    for i in 0..=ADDED {
        source
            .batch_execute(&format!(
                "INSERT INTO t{i} SELECT g, 't{i}.' || g FROM generate_series(1, 20) g"
            ))
            .await
            .unwrap();
    }
    write_dotenv(&pair, "t0");
    pair.setup();
    let daemon = pair.spawn(&[]);
    daemon.wait_listening(&pair).await;
    let all: Vec<String> = (0..=ADDED).map(|i| format!("t{i}")).collect();
    write_dotenv(&pair, &all.join(","));
    daemon.signal(libc::SIGHUP);
    for table in &all {
        pair.wait_synced(table, Duration::from_secs(60)).await;
    }
    let log = daemon.log_text();
    assert!(!log.contains("concurrently"), "{log}");
    assert!(!log.contains("sync failed"), "{log}");
}
