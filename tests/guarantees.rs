//! The guarantees of issue 2, each proved against real servers: nothing is lost, nothing is
//! visibly applied twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use crate::harness::{Pair, USERS, connect, count, listener_pids, seed_users, wait_for, xmins};

/// One writer's share of a mixed workload: inserts, single-row and multi-row updates, deletes,
/// and multi-statement transactions, against keys other writers touch too.
async fn mixed_writes(client: Client, operations: usize, stop: Option<Arc<AtomicBool>>) -> usize {
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut done = 0;
    while done < operations {
        if stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        let pick: u32 = rng.random_range(0..100);
        let sql = match pick {
            0..=29 => {
                "INSERT INTO users (name, email) VALUES ('w-' || gen_random_uuid(), 'x@example.com')"
            }
            30..=69 => {
                "UPDATE users SET version = version + 1, status = md5(random()::text), updated_at = now() \
                        WHERE id = (SELECT id FROM users OFFSET floor(random() * 200) LIMIT 1)"
            }
            70..=79 => {
                "UPDATE users SET version = version + 1, updated_at = now() \
                        WHERE id IN (SELECT id FROM users OFFSET floor(random() * 200) LIMIT 20)"
            }
            80..=94 => {
                "DELETE FROM users WHERE id = (SELECT id FROM users OFFSET floor(random() * 200) LIMIT 1)"
            }
            _ => {
                "BEGIN; \
                  INSERT INTO users (name) VALUES ('tx-' || gen_random_uuid()); \
                  UPDATE users SET version = version + 1 WHERE id = (SELECT id FROM users ORDER BY created_at DESC LIMIT 1); \
                  DELETE FROM users WHERE id = (SELECT id FROM users OFFSET floor(random() * 200) LIMIT 1); \
                  COMMIT"
            }
        };
        // Deadlocks between writers are the workload's, not rowsync's: retry them.
        if let Err(err) = client.batch_execute(sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            assert!(err.code().is_some(), "writer lost its connection: {err}");
            continue;
        }
        done += 1;
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_converges_after_10k_concurrent_mixed_writes() {
    let (pair, _daemon) = Pair::running(1000, &[]).await;

    let mut writers = Vec::new();
    for _ in 0..8 {
        let client = pair.source().await;
        writers.push(tokio::spawn(mixed_writes(client, 1250, None)));
    }
    let mut total = 0;
    for writer in writers {
        total += writer.await.unwrap();
    }
    assert_eq!(total, 10_000);
    pair.wait_synced("users", Duration::from_secs(60)).await;
    let source = pair.source().await;
    assert!(count(&source, "SELECT count(*) FROM users").await > 0);
    assert_eq!(
        count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_stopped_are_applied_at_start_including_deletes() {
    let (pair, mut daemon) = Pair::running(500, &[]).await;
    let source = pair.source().await;
    pair.wait_synced("users", Duration::from_secs(20)).await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));

    let target = pair.target().await;
    let copied_at_before: String = target
        .query_one("SELECT copied_at::text FROM rowsync_progress", &[])
        .await
        .unwrap()
        .get(0);
    let untouched_before = count(
        &target,
        "SELECT count(*) FROM users WHERE name LIKE 'user-1%'",
    )
    .await;
    source
        .batch_execute(
            "DELETE FROM users WHERE name IN ('user-2', 'user-3', 'user-4');
             UPDATE users SET status = 'away', version = version + 1 WHERE name LIKE 'user-5%';
             INSERT INTO users (name) SELECT 'offline-' || g FROM generate_series(1, 50) g;
             UPDATE users SET name = 'renamed' WHERE name = 'offline-7';",
        )
        .await
        .unwrap();

    let xmins_before = xmins(&target, "name LIKE 'user-1%'").await;
    let _daemon = pair.spawn(&[]);
    pair.wait_synced("users", Duration::from_secs(30)).await;
    // Caught up from the journal, not by copying the table again: untouched rows were not rewritten.
    let xmins_after = xmins(&target, "name LIKE 'user-1%'").await;
    assert_eq!(xmins_before.len() as i64, untouched_before);
    assert_eq!(xmins_before, xmins_after, "untouched rows were rewritten");
    let copied_at_after: String = target
        .query_one("SELECT copied_at::text FROM rowsync_progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        copied_at_before, copied_at_after,
        "the table was copied again"
    );
    assert_eq!(
        count(&target, "SELECT count(*) FROM users WHERE name = 'user-3'").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_whose_notification_was_lost_is_still_applied() {
    // No polling and no sweeps within the test's time: only the listener can bring a change.
    let (pair, daemon) = Pair::running(
        10,
        &[
            ("POLL_INTERVAL_MS", "600000"),
            ("SYNC_INTERVAL_MINUTES", "60"),
            ("RETRY_INITIAL_DELAY", "3000"),
            ("RETRY_MAX_DELAY", "3000"),
        ],
    )
    .await;
    let source = pair.source().await;
    // The first sweep runs at start; let it finish and the doorbell be armed.
    pair.wait_synced("users", Duration::from_secs(20)).await;
    source
        .execute(
            "UPDATE users SET status = 'first' WHERE name = 'user-1'",
            &[],
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(10)).await;

    for pid in listener_pids(&source).await {
        source
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    }
    wait_for(
        "the listener session to end",
        Duration::from_secs(10),
        || async { listener_pids(&source).await.is_empty() },
    )
    .await;
    // Committed while nobody listens: its notification is gone for good.
    source
        .batch_execute(
            "UPDATE users SET status = 'while-down' WHERE name = 'user-2';
             DELETE FROM users WHERE name = 'user-3';
             INSERT INTO users (name) VALUES ('inserted-while-down');",
        )
        .await
        .unwrap();
    assert!(
        listener_pids(&source).await.is_empty(),
        "listener came back too early for this test"
    );
    pair.wait_synced("users", Duration::from_secs(20)).await;
    assert!(
        daemon.log_text().contains("listener connection failed"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_open_longer_than_the_lookback_window_is_not_lost() {
    // Sweeps every 0.6 s looking back 0.6 s; the transaction below stays open for 4 s.
    let (pair, _daemon) = Pair::running(
        100,
        &[
            ("SYNC_INTERVAL_MINUTES", "0.01"),
            ("SYNC_WINDOW_MULTIPLIER", "1"),
        ],
    )
    .await;
    let source = pair.source().await;

    let long = connect(&pair.source_url()).await;
    long.batch_execute(
        "BEGIN;
         INSERT INTO users (name) VALUES ('from-long-transaction');
         UPDATE users SET status = 'long', version = version + 1 WHERE name = 'user-10';
         DELETE FROM users WHERE name = 'user-11';",
    )
    .await
    .unwrap();
    // Other transactions commit and are applied while the long one is open, so progress moves
    // past it.
    for i in 0..8 {
        source
            .execute(
                "INSERT INTO users (name) VALUES ($1)",
                &[&format!("meanwhile-{i}")],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let target = pair.target().await;
    wait_for(
        "writes made meanwhile to be applied",
        Duration::from_secs(10),
        || async {
            count(
                &target,
                "SELECT count(*) FROM users WHERE name LIKE 'meanwhile-%'",
            )
            .await
                == 8
        },
    )
    .await;
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM users WHERE name = 'from-long-transaction'"
        )
        .await,
        0,
        "uncommitted data reached the target"
    );
    long.batch_execute("COMMIT").await.unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_over_8000_bytes_sync_and_the_source_write_succeeds() {
    let (pair, _daemon) = Pair::running(0, &[]).await;
    let source = pair.source().await;
    // Incompressible text well over NOTIFY's 8000-byte payload limit (and TOASTed).
    let big_insert = source
        .execute(
            "INSERT INTO users (name, bio) \
             SELECT 'big', string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 4000) g",
            &[],
        )
        .await;
    assert_eq!(big_insert.unwrap(), 1, "the source write failed");
    source
        .execute(
            "UPDATE users SET bio = bio || repeat('z', 9000), version = version + 1 WHERE name = 'big'",
            &[],
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    let target = pair.target().await;
    assert!(
        count(
            &target,
            "SELECT length(bio)::int8 FROM users WHERE name = 'big'"
        )
        .await
            > 130_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_never_loses_or_visibly_repeats_a_change() {
    let pair = Pair::new(USERS).await;
    // Every write rowsync makes to the target is audited, in the same transaction.
    pair.target()
        .await
        .batch_execute(
            "CREATE TABLE audit (seq bigserial PRIMARY KEY, id uuid NOT NULL, version integer, op text NOT NULL);
             CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF TG_OP = 'DELETE' THEN
                     INSERT INTO audit (id, version, op) VALUES (OLD.id, OLD.version, TG_OP);
                 ELSE
                     INSERT INTO audit (id, version, op) VALUES (NEW.id, NEW.version, TG_OP);
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON users
                 FOR EACH ROW EXECUTE FUNCTION audit();",
        )
        .await
        .unwrap();
    let source = pair.source().await;
    seed_users(&source, 300).await;
    pair.setup();

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        writers.push(tokio::spawn(mixed_writes(
            pair.source().await,
            usize::MAX,
            Some(stop.clone()),
        )));
    }
    let mut daemon = pair.spawn(&[]);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    for _ in 0..8 {
        let run_for = rng.random_range(200..1500);
        tokio::time::sleep(Duration::from_millis(run_for)).await;
        daemon.kill9();
        let down_for = rng.random_range(0..400);
        tokio::time::sleep(Duration::from_millis(down_for)).await;
        daemon = pair.spawn(&[]);
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    pair.wait_synced("users", Duration::from_secs(60)).await;

    // Per key, the audited writes must show versions only ever increasing, and nothing after a
    // delete: a batch applied twice, or an older state applied after a newer one, would show.
    let target = pair.target().await;
    let rows = target
        .query("SELECT id::text, version, op FROM audit ORDER BY seq", &[])
        .await
        .unwrap();
    let mut last: std::collections::HashMap<String, (i32, String)> = Default::default();
    for row in &rows {
        let (id, version, op): (String, i32, String) = (row.get(0), row.get(1), row.get(2));
        if let Some((previous, previous_op)) = last.get(&id) {
            assert_ne!(previous_op, "DELETE", "{id} written after its delete");
            if op != "DELETE" {
                assert!(
                    version > *previous,
                    "{id}: version {version} written after {previous}"
                );
            }
        }
        last.insert(id, (version, op));
    }
    assert!(
        rows.len() > 300,
        "the workload wrote too little: {}",
        rows.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_during_setup_are_neither_lost_nor_stale() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 20_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        writers.push(tokio::spawn(mixed_writes(
            pair.source().await,
            usize::MAX,
            Some(stop.clone()),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let setup = {
        let output = pair.rowsync(&["setup"], &[]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(setup.contains("copied"), "{setup}");
    let daemon = pair.spawn(&[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    assert!(written > 100, "too few writes overlapped setup: {written}");
    pair.wait_synced("users", Duration::from_secs(60)).await;
    drop(daemon);
}

/// A target whose every write to `users` is audited, in the same transaction.
const AUDITED: &str = "
    CREATE TABLE audit (seq bigserial PRIMARY KEY, id uuid NOT NULL, version integer, op text NOT NULL);
    CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO audit (id, version, op) VALUES (NEW.id, NEW.version, TG_OP);
        RETURN NULL;
    END $$;
    CREATE TRIGGER audit AFTER INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION audit();";

/// `users` with 100 rows, set up, and an audit of every write to the target from now on.
async fn audited_pair() -> Pair {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 100).await;
    pair.setup();
    pair.target().await.batch_execute(AUDITED).await.unwrap();
    pair
}

/// Runs the daemon with the crash point `name` set, makes a change that a batch must carry,
/// and waits for the daemon to die there.
async fn crash_at(pair: &Pair, name: &str) {
    let failpoint = format!("{name}=return");
    // No look-back at start: the first batch to run is the one carrying the change.
    let mut daemon = pair.spawn(&[("FAILPOINTS", &failpoint), ("SYNC_LOOKBACK", "never")]);
    daemon.wait_listening(pair).await;
    pair.source()
        .await
        .execute(
            "UPDATE users SET version = 2 WHERE name LIKE 'user-1%'",
            &[],
        )
        .await
        .unwrap();
    daemon.wait_exit(Duration::from_secs(30));
    let log = daemon.log_text();
    assert!(
        log.contains(&format!("fail point {name}: aborting")),
        "the daemon did not crash at {name}:\n{log}"
    );
}

/// After a restart the target converges, each changed row was written exactly once, and the
/// journal is empty.
async fn restart_applies_each_change_once(pair: &Pair) {
    let _daemon = pair.spawn(&[]);
    pair.wait_synced("users", Duration::from_secs(20)).await;
    let target = pair.target().await;
    pair.wait(
        "the journal to be emptied",
        Duration::from_secs(20),
        || async {
            count(
                &pair.source().await,
                "SELECT count(*) FROM rowsync.public_users_journal",
            )
            .await
                == 0
        },
    )
    .await;
    let changed = count(&target, "SELECT count(*) FROM users WHERE version = 2").await;
    assert_eq!(changed, 12, "user-1 and user-10 … user-19");
    let writes = count(&target, "SELECT count(*) FROM audit").await;
    let distinct = count(&target, "SELECT count(DISTINCT (id, version)) FROM audit").await;
    assert_eq!(
        writes, changed,
        "each change is written once (audit: {writes} writes)"
    );
    assert_eq!(distinct, changed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_target_commit_and_before_the_journal_delete_repeats_nothing() {
    let pair = audited_pair().await;
    crash_at(&pair, "batch-after-target-commit").await;
    // The crash came after the commit: the target has the batch, the journal still has its rows.
    let target = pair.target().await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM users WHERE version = 2").await,
        12
    );
    assert!(
        count(
            &pair.source().await,
            "SELECT count(*) FROM rowsync.public_users_journal"
        )
        .await
            > 0
    );
    restart_applies_each_change_once(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_holding_the_progress_lock_loses_nothing() {
    let pair = audited_pair().await;
    crash_at(&pair, "batch-after-progress-lock").await;
    // Nothing of the batch was committed.
    let target = pair.target().await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM users WHERE version = 2").await,
        0
    );
    assert_eq!(count(&target, "SELECT count(*) FROM audit").await, 0);
    restart_applies_each_change_once(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_middle_of_the_initial_copy_leaves_nothing_half_done() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 1000).await;
    let output = pair.rowsync(&["setup"], &[("FAILPOINTS", "copy-mid-stream=return")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("fail point copy-mid-stream: aborting"),
        "{stderr}"
    );
    let target = pair.target().await;
    // The copy's transaction never committed: no rows, and the table is not marked copied.
    assert_eq!(count(&target, "SELECT count(*) FROM users").await, 0);
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM rowsync_progress WHERE snapshot IS NOT NULL"
        )
        .await,
        0
    );
    // Setup again copies everything, and the daemon carries on from there.
    pair.setup();
    pair.assert_synced("users").await;
    let _daemon = pair.spawn(&[]);
    pair.source()
        .await
        .execute("UPDATE users SET version = 2 WHERE name = 'user-7'", &[])
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
}
