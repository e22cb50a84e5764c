//! Schema changes while rowsync runs: within a sweep the column mapping is read again, so a
//! column added to both sides is synced (rows changed meanwhile included), a widened column keeps
//! syncing, and a column dropped from the source stops being written.

use std::time::Duration;

use crate::harness::{Pair, count};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_to_both_sides_is_synced_with_the_rows_changed_meanwhile() {
    // Sweeps every 12 s: the change below is streamed under the old mapping first.
    let (pair, daemon) = Pair::running(200, &[("SYNC_INTERVAL_MINUTES", "0.2")]).await;
    let source = pair.source().await;
    let target = pair.target().await;
    target
        .batch_execute("ALTER TABLE users ADD COLUMN nickname text")
        .await
        .unwrap();
    source
        .batch_execute(
            "ALTER TABLE users ADD COLUMN nickname text;
             -- updated_at left old, as by an application that does not touch it: no look-back
             -- over it finds these rows
             UPDATE users SET nickname = 'nick-' || name, status = 'renamed', updated_at = '2020-01-01'
              WHERE name LIKE 'user-1%';",
        )
        .await
        .unwrap();
    let changed = count(
        &source,
        "SELECT count(*) FROM users WHERE status = 'renamed'",
    )
    .await;
    pair.wait("the change to stream", Duration::from_secs(10), || async {
        count(
            &target,
            "SELECT count(*) FROM users WHERE status = 'renamed'",
        )
        .await
            == changed
    })
    .await;
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM users WHERE nickname IS NOT NULL"
        )
        .await,
        0,
        "streamed before the sweep noticed the new column"
    );
    // The next sweep reads the mapping again, and those rows again.
    pair.wait_synced("users", Duration::from_secs(40)).await;
    source
        .batch_execute("UPDATE users SET nickname = 'later' WHERE name = 'user-2'")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
    assert!(
        count(
            &target,
            "SELECT count(*) FROM users WHERE nickname IS NOT NULL"
        )
        .await
            > 100,
        "{}",
        daemon.log_text()
    );
}

/// A column the target added first with a default, then the source without one: the target's
/// rows holding the default are written again with the source's NULL. Before, only the rows
/// whose new source column was not NULL were read again (none), and every target row kept the
/// target's default for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_the_target_added_first_with_a_default_takes_the_source_values() {
    // No look-back: it would re-read the freshly seeded rows anyway.
    let (pair, _daemon) = Pair::running(
        50,
        &[
            ("SYNC_INTERVAL_MINUTES", "0.05"),
            ("SYNC_LOOKBACK", "never"),
        ],
    )
    .await;
    let source = pair.source().await;
    let target = pair.target().await;
    target
        .batch_execute("ALTER TABLE users ADD COLUMN tier text DEFAULT 'free'")
        .await
        .unwrap();
    // A sweep sees the target-only column (left alone), then the source adds it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    source
        .batch_execute(
            "ALTER TABLE users ADD COLUMN tier text;
             UPDATE users SET tier = 'gold' WHERE name = 'user-1';",
        )
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_widened_column_and_a_column_dropped_from_the_source_keep_the_rest_syncing() {
    let (pair, _daemon) = Pair::running(100, &[]).await;
    let source = pair.source().await;
    let target = pair.target().await;
    source
        .batch_execute(
            "ALTER TABLE users ALTER COLUMN email TYPE varchar(200);
             UPDATE users SET email = 'widened-' || name WHERE name LIKE 'user-1%';
             INSERT INTO users (name, email) VALUES ('after the widening', 'w@example.com');",
        )
        .await
        .unwrap();
    target
        .batch_execute("ALTER TABLE users ALTER COLUMN email TYPE varchar(200)")
        .await
        .unwrap();
    pair.wait_synced("users", Duration::from_secs(30)).await;

    // Dropped from the source; the target keeps it (nullable), and nothing writes it any more.
    source
        .batch_execute(
            "ALTER TABLE users DROP COLUMN bio;
             UPDATE users SET status = 'away' WHERE name LIKE 'user-2%';
             INSERT INTO users (name) VALUES ('after the drop');",
        )
        .await
        .unwrap();
    let query = "SELECT string_agg(id || name || coalesce(email, '') || status || version, ',' ORDER BY id) FROM users";
    let expected: String = source.query_one(query, &[]).await.unwrap().get(0);
    pair.wait(
        "the other columns to sync",
        Duration::from_secs(30),
        || async {
            let got: Option<String> = target.query_one(query, &[]).await.unwrap().get(0);
            got.as_deref() == Some(expected.as_str())
        },
    )
    .await;
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM users WHERE name = 'after the drop' AND bio IS NULL"
        )
        .await,
        1
    );

    // Dropped from the source, NOT NULL without a default in the target: those rows are
    // SCHEMA_MISMATCH records (the other rows keep syncing), retried until the target is fixed.
    target
        .batch_execute("UPDATE users SET bio = '' WHERE bio IS NULL; ALTER TABLE users ALTER COLUMN bio SET NOT NULL")
        .await
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO users (name) VALUES ('needs a bio');
             UPDATE users SET status = 'still syncing' WHERE name = 'user-3';",
        )
        .await
        .unwrap();
    pair.wait("the SCHEMA_MISMATCH record", Duration::from_secs(30), || async {
        count(
            &target,
            "SELECT count(*) FROM sync_errors WHERE NOT resolved AND error_type = 'SCHEMA_MISMATCH' \
              AND error_message LIKE '%bio%'",
        )
        .await
            == 1
    })
    .await;
    pair.wait(
        "the other rows to keep syncing",
        Duration::from_secs(30),
        || async {
            count(
                &target,
                "SELECT count(*) FROM users WHERE status = 'still syncing'",
            )
            .await
                == 1
        },
    )
    .await;
    target
        .batch_execute("ALTER TABLE users ALTER COLUMN bio SET DEFAULT 'none'")
        .await
        .unwrap();
    pair.wait(
        "the retry to go through",
        Duration::from_secs(40),
        || async {
            count(
                &target,
                "SELECT count(*) FROM users WHERE name = 'needs a bio' AND bio = 'none'",
            )
            .await
                == 1
                && count(
                    &target,
                    "SELECT count(*) FROM sync_errors WHERE NOT resolved",
                )
                .await
                    == 0
        },
    )
    .await;
}
