//! One table's trouble stays with that table: row-level security that would hide rows, a table
//! that cannot be read, each reported and retried while the other tables keep syncing; and nothing
//! in the target is ever deleted because rowsync could not see a row.

use std::time::Duration;

use crate::harness::{Pair, USERS, count, free_port, health, seed_users};

const ORDERS: &str = "CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL);";

/// `users` (300 rows) and `orders`, set up by the superuser, and the role `reader` with the
/// README's least privileges for `run` on the source.
async fn two_tables() -> Pair {
    let ddl = format!("{USERS}{ORDERS}");
    let pair = Pair::new(&ddl).await;
    let source = pair.source().await;
    seed_users(&source, 300).await;
    source
        .batch_execute(
            "INSERT INTO orders (item) SELECT 'item-' || g FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    let setup = pair.rowsync(&["setup"], &[("SYNC_TABLES", "users,orders")]);
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    source
        .batch_execute(
            "CREATE ROLE reader LOGIN;
             GRANT SELECT ON users, orders TO reader;
             GRANT USAGE ON SCHEMA rowsync TO reader;
             GRANT SELECT ON rowsync.captured_tables TO reader;
             GRANT SELECT, DELETE ON rowsync.public_users_journal, rowsync.public_orders_journal TO reader;
             GRANT EXECUTE ON FUNCTION rowsync.arm_doorbell() TO reader;",
        )
        .await
        .unwrap();
    pair
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_never_deletes_and_one_failing_table_holds_back_no_other() {
    let pair = two_tables().await;
    let source = pair.source().await;
    let target = pair.target().await;
    // Row-level security with no policy for rowsync's role: every row would be hidden from it.
    source
        .batch_execute(
            "ALTER TABLE users ENABLE ROW LEVEL SECURITY;
             CREATE POLICY staff_only ON users USING (current_user = 'postgres');",
        )
        .await
        .unwrap();
    let reader_url = pair.source_url().replacen("postgres@", "reader@", 1);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = [
        ("SOURCE_DATABASE_URL", reader_url.as_str()),
        ("SYNC_TABLES", "users,orders"),
        ("HEALTH_ADDR", addr.as_str()),
        ("MAX_RETRIES", "1"),
    ];
    let _daemon = pair.spawn(&env);
    // Changes to both tables: orders syncs, users is held back, not emptied.
    source
        .batch_execute(
            "UPDATE users SET status = 'away' WHERE name LIKE 'user-1%';
             INSERT INTO orders (item) VALUES ('after RLS');",
        )
        .await
        .unwrap();
    pair.wait_synced("orders", Duration::from_secs(30)).await;
    pair.wait("users to be reported", Duration::from_secs(30), || async {
        count(
            &target,
            "SELECT count(*) FROM sync_errors WHERE table_name = 'users' \
               AND error_type = 'PERMISSION_DENIED' AND NOT resolved",
        )
        .await
            == 1
    })
    .await;
    let (code, body) = health(port).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["checks"]["tables"]["ok"], false, "{body}");
    let message = body["checks"]["tables"]["message"].as_str().unwrap();
    assert!(message.contains("BYPASSRLS"), "{message}");
    assert_eq!(count(&target, "SELECT count(*) FROM users").await, 300);
    assert_eq!(
        count(&target, "SELECT count(*) FROM users WHERE status = 'away'").await,
        0
    );

    // Granted what it needs, the table catches up and its record is resolved.
    source
        .batch_execute("ALTER ROLE reader BYPASSRLS")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
    pair.wait(
        "the record to be resolved",
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
    pair.wait("/health to recover", Duration::from_secs(30), || async {
        health(port).await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_switched_on_while_running_deletes_nothing() {
    let pair = two_tables().await;
    let source = pair.source().await;
    let target = pair.target().await;
    let reader_url = pair.source_url().replacen("postgres@", "reader@", 1);
    let env = [
        ("SOURCE_DATABASE_URL", reader_url.as_str()),
        ("SYNC_TABLES", "users,orders"),
    ];
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    source
        .batch_execute(
            "ALTER TABLE users ENABLE ROW LEVEL SECURITY;
             CREATE POLICY none ON users USING (false);
             UPDATE users SET status = 'hidden change' WHERE name LIKE 'user-2%';
             INSERT INTO orders (item) VALUES ('still flowing');",
        )
        .await
        .unwrap();
    pair.wait_synced("orders", Duration::from_secs(30)).await;
    pair.wait(
        "the refused read to be recorded",
        Duration::from_secs(30),
        || async {
            count(
                &target,
                "SELECT count(*) FROM sync_errors WHERE table_name = 'public.users' \
               AND error_type = 'PERMISSION_DENIED'",
            )
            .await
                == 1
        },
    )
    .await;
    // The 111 changed rows are not in the target yet, and none of the 300 was deleted.
    assert_eq!(count(&target, "SELECT count(*) FROM users").await, 300);
}

#[test]
fn setup_refuses_a_table_whose_rows_row_level_security_would_hide() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pair = runtime.block_on(async {
        let pair = Pair::new(USERS).await;
        let source = pair.source().await;
        seed_users(&source, 10).await;
        source
            .batch_execute(
                "CREATE ROLE installer LOGIN CREATEDB;
                 GRANT CREATE ON DATABASE app TO installer;
                 ALTER TABLE users OWNER TO installer;
                 ALTER TABLE users ENABLE ROW LEVEL SECURITY;
                 ALTER TABLE users FORCE ROW LEVEL SECURITY;",
            )
            .await
            .unwrap();
        pair
    });
    let url = pair.source_url().replacen("postgres@", "installer@", 1);
    let output = pair.rowsync(&["setup"], &[("SOURCE_DATABASE_URL", &url)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("table public.users: row-level security") && stderr.contains("BYPASSRLS"),
        "{stderr}"
    );
    let target = runtime.block_on(pair.target());
    assert_eq!(
        runtime.block_on(count(&target, "SELECT count(*) FROM users")),
        0
    );
}
