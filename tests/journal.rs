//! A journal no writer can poison: writers may add keys (a forged key only causes a re-read) but
//! never choose the transaction id; rows no batch would consume are deleted; and a journal whose
//! rows are not being consumed shows on /health.

use std::time::Duration;

use crate::harness::{Pair, USERS, connect, count, free_port, health, seed_users};

/// A row with a txid a billion transactions ahead: it would never become visible.
const FORGE: &str = "INSERT INTO rowsync.public_users_journal (txid, id) \
    SELECT (pg_current_xact_id()::text::bigint + 1000000000)::text::xid8, id FROM users";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_journal_keys_but_never_choose_a_txid() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_users(&source, 20).await;
    pair.setup();
    source
        .batch_execute(
            "CREATE ROLE app LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON users TO app;",
        )
        .await
        .unwrap();
    let app = connect(&pair.source_url().replacen("postgres@", "app@", 1)).await;
    // Writing is all a writer needs; its triggers journal the keys.
    app.batch_execute(
        "UPDATE users SET status = 'away' WHERE name = 'user-1';
         INSERT INTO users (name) VALUES ('by app');
         DELETE FROM users WHERE name = 'user-2';
         INSERT INTO rowsync.public_users_journal (id) SELECT id FROM users LIMIT 1;",
    )
    .await
    .unwrap();
    let forged = app.batch_execute(FORGE).await.unwrap_err();
    assert_eq!(
        forged.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{forged}"
    );

    // A journal made by an earlier version let PUBLIC insert every column; setup takes it back.
    source
        .batch_execute("GRANT INSERT ON rowsync.public_users_journal TO PUBLIC")
        .await
        .unwrap();
    app.batch_execute(&format!("BEGIN; {FORGE}; ROLLBACK"))
        .await
        .unwrap();
    pair.setup();
    let forged = app.batch_execute(FORGE).await.unwrap_err();
    assert_eq!(
        forged.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{forged}"
    );

    let _daemon = pair.spawn(&[]);
    pair.wait_synced("users", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_the_future_are_deleted_without_other_traffic() {
    let (pair, daemon) = Pair::running(100, &[]).await;
    let source = pair.source().await;
    pair.wait_synced("users", Duration::from_secs(30)).await;
    // Written by hand, as the table owner may: a row per user that no snapshot would ever show.
    source.batch_execute(FORGE).await.unwrap();
    assert_eq!(
        count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await,
        100
    );
    pair.wait("the forged rows to go", Duration::from_secs(30), || async {
        count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await == 0
    })
    .await;
    assert!(
        daemon
            .log_text()
            .contains("deleted journal rows that no batch would consume"),
        "{}",
        pair.logs()
    );
    source
        .batch_execute("UPDATE users SET version = version + 1 WHERE name LIKE 'user-1%'")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_whose_rows_are_not_consumed_shows_on_health() {
    let pair = Pair::new(USERS).await;
    let source = pair.source().await;
    seed_users(&source, 50).await;
    pair.setup();
    // The README's privileges for `run`, but DELETE on the journal forgotten: batches apply, the
    // journal keeps every row.
    source
        .batch_execute(
            "CREATE ROLE reader LOGIN;
             GRANT SELECT ON users TO reader;
             GRANT USAGE ON SCHEMA rowsync TO reader;
             GRANT SELECT ON rowsync.captured_tables TO reader;
             GRANT SELECT ON rowsync.public_users_journal TO reader;
             GRANT EXECUTE ON FUNCTION rowsync.arm_doorbell() TO reader;",
        )
        .await
        .unwrap();
    let reader_url = pair.source_url().replacen("postgres@", "reader@", 1);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _daemon = pair.spawn(&[
        ("SOURCE_DATABASE_URL", reader_url.as_str()),
        ("HEALTH_ADDR", addr.as_str()),
    ]);
    source
        .batch_execute("UPDATE users SET status = 'away' WHERE name LIKE 'user-1%'")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
    pair.wait(
        "the journal check to fail",
        Duration::from_secs(30),
        || async { health(port).await.1["checks"]["journal"]["ok"] == false },
    )
    .await;
    let (code, body) = health(port).await;
    assert_eq!(code, 200, "a warning: {body}");
    assert_eq!(body["status"], "DEGRADED", "{body}");
    assert_eq!(
        body["checks"]["journal"]["value"]["public.users"],
        count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await,
        "{body}"
    );

    // Given DELETE, the next sweep empties the journal and the check recovers.
    source
        .batch_execute("GRANT DELETE ON rowsync.public_users_journal TO reader")
        .await
        .unwrap();
    pair.wait(
        "the journal check to recover",
        Duration::from_secs(30),
        || async { health(port).await.1["checks"]["journal"]["ok"] == true },
    )
    .await;
    assert_eq!(
        count(&source, "SELECT count(*) FROM rowsync.public_users_journal").await,
        0
    );
    pair.assert_synced("users").await;
}
