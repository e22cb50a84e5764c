//! The fault-injection suite: each fault injected for real (network cuts, refusals and black holes
//! through a proxy, kill -9, server restarts, rejected and locked rows, signals), each test ending
//! with full table contents compared and sync_errors checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

use crate::harness::proxy::Proxy;
use crate::harness::{Pair, USERS, count, resilient_writes, seed_users};

/// Starts `n` writers on the source (directly, not through any proxy).
fn start_writers(pair: &Pair, n: usize) -> (Arc<AtomicBool>, Vec<JoinHandle<u64>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writers = (0..n)
        .map(|_| tokio::spawn(resilient_writes(pair.source_url(), stop.clone())))
        .collect();
    (stop, writers)
}

async fn stop_writers(stop: Arc<AtomicBool>, writers: Vec<JoinHandle<u64>>) -> u64 {
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for writer in writers {
        total += writer.await.unwrap();
    }
    total
}

/// `(error_type, resolved)` of every sync_errors row.
async fn sync_errors(pair: &Pair) -> Vec<(String, bool)> {
    pair.target()
        .await
        .query(
            "SELECT error_type, resolved FROM sync_errors ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until every sync_errors row is resolved; returns how many rows there are (all resolved).
async fn wait_all_resolved(pair: &Pair) -> i64 {
    let target = pair.target().await;
    pair.wait(
        "every sync_errors row to be resolved",
        Duration::from_secs(30),
        || async {
            count(
                &target,
                "SELECT count(*) FROM sync_errors WHERE NOT resolved",
            )
            .await
                == 0
        },
    )
    .await;
    count(&target, "SELECT count(*) FROM sync_errors").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_then_refused_source_connections_lose_nothing_and_are_recorded() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 200).await;
    pair.setup();
    let proxy = Proxy::start(pair.source.port()).await;
    let url = proxy.url("app");
    let daemon = pair.spawn(&[
        ("SOURCE_DATABASE_URL", &url),
        ("MAX_RECONNECT_ATTEMPTS", "3"),
    ]);
    daemon.wait_listening(&pair).await;
    let (stop, writers) = start_writers(&pair, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;

    proxy.cut();
    proxy.refuse();
    pair.wait_logged(
        &daemon,
        "the real-time path to be reported down",
        "real-time path is down",
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.heal().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(stop_writers(stop, writers).await > 100);

    pair.wait_synced("users", Duration::from_secs(30)).await;
    let recorded = wait_all_resolved(&pair).await;
    assert!(
        recorded > 0,
        "the failure should have been recorded in sync_errors"
    );
    let errors = sync_errors(&pair).await;
    assert!(
        errors
            .iter()
            .any(|(kind, _)| kind == "REALTIME_SYNC_CONNECTION_ERROR"),
        "the listener's failure was not recorded: {errors:?}"
    );
    assert_eq!(
        count(
            &pair.target().await,
            "SELECT count(*) FROM sync_errors WHERE error_type = 'REALTIME_SYNC_CONNECTION_ERROR'"
        )
        .await,
        1,
        "one record per failure episode, not one per reconnect attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_then_refused_target_connections_lose_nothing() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 200).await;
    pair.setup();
    let proxy = Proxy::start(pair.target.port()).await;
    let url = proxy.url("app");
    let daemon = pair.spawn(&[("TARGET_DATABASE_URL", &url)]);
    daemon.wait_listening(&pair).await;
    let (stop, writers) = start_writers(&pair, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.cut();
    proxy.refuse();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.heal().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_writers(stop, writers).await;
    pair.wait_synced("users", Duration::from_secs(30)).await;
    // Nothing may be left open; whether anything was recorded depends on the fault (with the
    // target unreachable, or the process killed, there is nowhere or no time to record it).
    wait_all_resolved(&pair).await;
    // With the target gone, rowsync either retries its batches or, having lost its leader-lock
    // session, stands by until it can take the lock again.
    let log = daemon.log_text();
    assert!(
        log.contains("sync failed; retrying") || log.contains("stepping down"),
        "{log}"
    );
}

/// With the target out of reach, the only process has lost its lock session and applies
/// nothing: `/health` says so (critical `lock_session`, 503), not "standing by: another rowsync
/// process is active". Before, it answered 200 HEALTHY as a standby for as long as the outage
/// lasted. Once the target is back, the check clears and the changes arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_out_of_reach_is_reported_unhealthy_not_standing_by() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 20).await;
    pair.setup();
    let proxy = Proxy::start(pair.target.port()).await;
    let url = proxy.url("app");
    let port = crate::harness::free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = pair.spawn(&[
        ("TARGET_DATABASE_URL", &url),
        ("HEALTH_ADDR", &addr),
        ("RETRY_MAX_DELAY", "1000"),
    ]);
    daemon.wait_listening(&pair).await;
    pair.lose_the_target(&proxy, &daemon).await;
    pair.wait(
        "the lock_session check to fail",
        Duration::from_secs(20),
        || async { crate::harness::health(port).await.1["checks"]["lock_session"]["ok"] == false },
    )
    .await;
    let (code, body) = crate::harness::health(port).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "UNHEALTHY", "{body}");
    assert!(
        !body
            .to_string()
            .contains("another rowsync process is active"),
        "{body}"
    );
    pair.source()
        .await
        .batch_execute("UPDATE users SET status = 'during the outage' WHERE name LIKE 'user-1%'")
        .await
        .unwrap();
    proxy.heal().await;
    pair.wait_synced("users", Duration::from_secs(60)).await;
    pair.wait(
        "the lock_session check to clear",
        Duration::from_secs(20),
        || async { crate::harness::health(port).await.1["checks"]["lock_session"]["ok"] == true },
    )
    .await;
}

/// A black hole: connections accepted, nothing ever answered, no reset. Only timeouts can tell.
async fn black_hole_scenario(through_source: bool) {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 200).await;
    pair.setup();
    let proxy = Proxy::start(if through_source {
        pair.source.port()
    } else {
        pair.target.port()
    })
    .await;
    let url = proxy.url("app");
    let variable = if through_source {
        "SOURCE_DATABASE_URL"
    } else {
        "TARGET_DATABASE_URL"
    };
    let daemon = pair.spawn(&[(variable, &url), ("STATEMENT_TIMEOUT_SECONDS", "2")]);
    daemon.wait_listening(&pair).await;
    let (stop, writers) = start_writers(&pair, 2);
    tokio::time::sleep(Duration::from_secs(1)).await;

    proxy.black_hole();
    pair.wait_logged(
        &daemon,
        "rowsync to notice the dead connections",
        "timed out",
        Duration::from_secs(20),
    )
    .await;
    proxy.heal().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_writers(stop, writers).await;
    // The sessions that were black-holed never answer again: rowsync must have replaced them.
    pair.wait_synced("users", Duration::from_secs(30)).await;
    let recorded = wait_all_resolved(&pair).await;
    // With the target black-holed there is nowhere to record the failure while it lasts.
    if through_source {
        assert!(
            recorded > 0,
            "the failure should have been recorded in sync_errors"
        );
    }
    if std::env::var_os("ROWSYNC_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", pair.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_source_is_detected_by_timeouts_and_replaced() {
    black_hole_scenario(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_target_is_detected_by_timeouts_and_replaced() {
    black_hole_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_storm_during_40_seconds_of_writes_converges() {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 500).await;
    pair.setup();
    let (stop, writers) = start_writers(&pair, 3);
    let mut daemon = pair.spawn(&[]);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let started = Instant::now();
    // Ten kills at random moments spread over 40 seconds.
    for kill in 0..10u32 {
        let slot_end = Duration::from_secs(4 * (u64::from(kill) + 1));
        let at = Duration::from_millis(4000 * u64::from(kill) + rng.random_range(300..3700));
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        daemon.kill9();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        daemon = pair.spawn(&[]);
        tokio::time::sleep(slot_end.saturating_sub(started.elapsed())).await;
    }
    let written = stop_writers(stop, writers).await;
    assert!(written > 1000, "too few writes: {written}");
    pair.wait_synced("users", Duration::from_secs(60)).await;
    // Nothing may be left open; whether anything was recorded depends on the fault (with the
    // target unreachable, or the process killed, there is nowhere or no time to record it).
    wait_all_resolved(&pair).await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_target_restarts_under_write_load_lose_nothing() {
    let mut pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 300).await;
    pair.setup();
    let daemon = pair.spawn(&[]);
    daemon.wait_listening(&pair).await;
    let (stop, writers) = start_writers(&pair, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| pair.source.restart()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| pair.target.restart()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(stop_writers(stop, writers).await > 100);
    pair.wait_synced("users", Duration::from_secs(40)).await;
    daemon.wait_listening(&pair).await;
    let recorded = wait_all_resolved(&pair).await;
    assert!(
        recorded > 0,
        "the failure should have been recorded in sync_errors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_are_isolated_recorded_retried_and_resolved() {
    // The target is stricter than the source: a CHECK and a shorter column.
    let target_ddl = format!(
        "{USERS}
         ALTER TABLE users ADD CONSTRAINT no_banned CHECK (status <> 'banned');
         ALTER TABLE users ALTER COLUMN email TYPE varchar(20);"
    );
    let pair = Pair::with_ddl(USERS, &target_ddl).await;
    let source = pair.source().await;
    seed_users(&source, 100).await;
    pair.setup();
    let daemon = pair.spawn(&[
        ("SYNC_INTERVAL_MINUTES", "0.01"),
        ("RETRY_INITIAL_DELAY", "200"),
    ]);
    daemon.wait_listening(&pair).await;

    // One statement changes every row; two of them the target rejects.
    source
        .batch_execute(
            "UPDATE users SET version = version + 1,
                 status = CASE WHEN name = 'user-7' THEN 'banned' ELSE 'updated' END,
                 email = CASE WHEN name = 'user-8' THEN 'much-too-long-for-the-target@example.com' ELSE email END",
        )
        .await
        .unwrap();
    let target = pair.target().await;
    pair.wait(
        "the other 98 rows to be applied",
        Duration::from_secs(20),
        || async {
            count(
                &target,
                "SELECT count(*) FROM users WHERE status = 'updated'",
            )
            .await
                == 98
        },
    )
    .await;
    let records = target
        .query(
            "SELECT error_type, record_id, metadata->>'table', metadata->>'operation', metadata->>'sqlstate', \
                    metadata->'key'->>'id', stack_trace, resolved \
               FROM sync_errors ORDER BY error_type",
            &[],
        )
        .await
        .unwrap();
    let ids: Vec<String> = source
        .query(
            "SELECT id::text FROM users WHERE name IN ('user-7', 'user-8') ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(records.len(), 2, "one record per rejected row");
    let expected = [
        ("CONSTRAINT_VIOLATION", &ids[0], "23514"),
        // The target's column is narrower than the source's: a schema mismatch (issue 12).
        ("SCHEMA_MISMATCH", &ids[1], "22001"),
    ];
    for (row, (kind, id, sqlstate)) in records.iter().zip(expected) {
        assert_eq!(row.get::<_, String>(0), kind);
        assert_eq!(&row.get::<_, String>(1), id);
        assert_eq!(row.get::<_, String>(2), "public.users");
        assert_eq!(row.get::<_, String>(3), "upsert");
        assert_eq!(row.get::<_, String>(4), sqlstate);
        assert_eq!(&row.get::<_, String>(5), id);
        assert!(
            row.get::<_, String>(6)
                .contains(&format!("sqlstate: {sqlstate}"))
        );
        assert!(!row.get::<_, bool>(7));
    }
    // Sweeps retry them, with backoff, in the same records.
    pair.wait(
        "a retry of each rejected row",
        Duration::from_secs(20),
        || async { count(&target, "SELECT min(retry_count)::int8 FROM sync_errors").await >= 1 },
    )
    .await;
    assert_eq!(count(&target, "SELECT count(*) FROM sync_errors").await, 2);

    // Once the target accepts them, the next retry applies them and closes the records.
    target
        .batch_execute(
            "ALTER TABLE users DROP CONSTRAINT no_banned; ALTER TABLE users ALTER COLUMN email TYPE text;",
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
    pair.wait(
        "both records to be resolved",
        Duration::from_secs(20),
        || async {
            count(
                &target,
                "SELECT count(*) FROM sync_errors WHERE resolved AND resolved_at IS NOT NULL",
            )
            .await
                == 2
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_target_rejects_does_not_block_the_initial_copy() {
    let target_ddl =
        format!("{USERS} ALTER TABLE users ADD CONSTRAINT no_banned CHECK (status <> 'banned');");
    let pair = Pair::with_ddl(USERS, &target_ddl).await;
    let source = pair.source().await;
    seed_users(&source, 100).await;
    source
        .execute(
            "UPDATE users SET status = 'banned' WHERE name = 'user-42'",
            &[],
        )
        .await
        .unwrap();
    let summary = pair.setup();
    assert!(
        summary.contains("copied 100 rows")
            && summary.contains("99 created")
            && summary.contains("1 rejected by the target"),
        "{summary}"
    );
    let target = pair.target().await;
    assert_eq!(count(&target, "SELECT count(*) FROM users").await, 99);
    let record: (String, String) = target
        .query_one(
            "SELECT error_type, record_id FROM sync_errors WHERE NOT resolved",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let id: String = source
        .query_one("SELECT id::text FROM users WHERE name = 'user-42'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(record, ("CONSTRAINT_VIOLATION".to_string(), id));

    // The daemon retries it; once the target accepts it, it is copied and the record closed.
    let _daemon = pair.spawn(&[
        ("SYNC_INTERVAL_MINUTES", "0.01"),
        ("RETRY_INITIAL_DELAY", "200"),
    ]);
    target
        .batch_execute("ALTER TABLE users DROP CONSTRAINT no_banned")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    let recorded = wait_all_resolved(&pair).await;
    assert!(
        recorded > 0,
        "the failure should have been recorded in sync_errors"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_row_locked_longer_than_lock_timeout_neither_hangs_nor_loses_the_change() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_users(&source, 50).await;
    pair.setup();
    let daemon = pair.spawn(&[
        ("LOCK_TIMEOUT_SECONDS", "1"),
        ("SYNC_INTERVAL_MINUTES", "0.02"),
        ("RETRY_INITIAL_DELAY", "200"),
    ]);
    daemon.wait_listening(&pair).await;

    // Another session holds user-5's target row.
    let holder = pair.target().await;
    holder
        .batch_execute("BEGIN; SELECT * FROM users WHERE name = 'user-5' FOR UPDATE")
        .await
        .unwrap();
    source
        .execute(
            "UPDATE users SET status = 'locked-test', version = version + 1",
            &[],
        )
        .await
        .unwrap();
    let target = pair.target().await;
    pair.wait(
        "the 49 unlocked rows to be applied",
        Duration::from_secs(20),
        || async {
            count(
                &target,
                "SELECT count(*) FROM users WHERE status = 'locked-test'",
            )
            .await
                == 49
        },
    )
    .await;
    pair.wait(
        "the locked row to be recorded",
        Duration::from_secs(10),
        || async {
            count(
                &target,
                "SELECT count(*) FROM sync_errors WHERE error_type = 'TIMEOUT' AND NOT resolved",
            )
            .await
                == 1
        },
    )
    .await;
    holder.batch_execute("COMMIT").await.unwrap();
    pair.wait_synced("users", Duration::from_secs(20)).await;
    let recorded = wait_all_resolved(&pair).await;
    assert!(
        recorded > 0,
        "the failure should have been recorded in sync_errors"
    );
}

/// Starts rowsync again and waits until the target equals the source, with no error recorded.
async fn restart_converges_cleanly(pair: &Pair) {
    let _daemon = pair.spawn(&[]);
    pair.wait_synced("users", Duration::from_secs(60)).await;
    assert_eq!(
        count(&pair.target().await, "SELECT count(*) FROM sync_errors").await,
        0
    );
}

/// A backlog big enough that its catch-up is still running when the signal comes.
async fn pair_with_backlog(rows: i32) -> Pair {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_users(&source, rows).await;
    pair.setup();
    source
        .batch_execute(
            "UPDATE users SET version = version + 1, updated_at = now();
             UPDATE users SET status = 'second-pass' WHERE name LIKE '%1';
             DELETE FROM users WHERE name LIKE '%7';",
        )
        .await
        .unwrap();
    pair
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_large_backlog_exits_0_within_the_timeout_and_a_restart_converges() {
    let pair = pair_with_backlog(150_000).await;
    let mut daemon = pair.spawn(&[("SHUTDOWN_TIMEOUT_SECONDS", "2"), ("BATCH_SIZE", "1000")]);
    pair.wait_logged(
        &daemon,
        "the catch-up to start",
        "sync loop started",
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.log_text()
    );
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} to stop with a 2 s timeout"
    );
    assert!(
        daemon.log_text().contains("rowsync stopped"),
        "{}",
        daemon.log_text()
    );

    restart_converges_cleanly(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_slower_than_its_1_second_interval_never_overlaps_and_loses_nothing() {
    let pair = pair_with_backlog(60_000).await;
    let mut daemon = pair.spawn(&[
        ("SYNC_INTERVAL_MINUTES", "0.0167"),
        ("SYNC_WINDOW_MULTIPLIER", "100"),
    ]);
    let (stop, writers) = start_writers(&pair, 2);
    let target = pair.target().await;
    pair.wait("four sweeps", Duration::from_secs(60), || async {
        crate::harness::finished_sweeps(&target).await >= 4
    })
    .await;
    stop_writers(stop, writers).await;
    pair.wait_synced("users", Duration::from_secs(60)).await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));
    let log = daemon.log_text();
    assert!(
        log.contains("sweep took more than 80% of the interval"),
        "{log}"
    );
    assert!(crate::harness::assert_sweeps_never_overlapped(&pair).await >= 3);
    assert_eq!(
        count(&pair.target().await, "SELECT count(*) FROM sync_errors").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_a_restart_still_converges() {
    let pair = pair_with_backlog(150_000).await;
    let mut daemon = pair.spawn(&[("SHUTDOWN_TIMEOUT_SECONDS", "60"), ("BATCH_SIZE", "1000")]);
    pair.wait_logged(
        &daemon,
        "the catch-up to start",
        "sync loop started",
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.signal(libc::SIGINT);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    daemon.signal(libc::SIGINT);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(128 + libc::SIGINT)
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "second signal took {:?}",
        signalled.elapsed()
    );
    assert!(
        daemon.log_text().contains("second signal: exiting now"),
        "{}",
        daemon.log_text()
    );

    restart_converges_cleanly(&pair).await;
}
