//! Partitioned source tables: writes through the table or straight into a partition, rows moved
//! between partitions, TRUNCATE of one partition, partitions created, attached and detached while
//! rowsync runs; into a partitioned target or a plain one.

use std::time::Duration;

use crate::harness::{Pair, count};

/// Two levels: `events_eu` is itself partitioned.
pub(crate) const PARTITIONED: &str = "
    CREATE TABLE events (id int, region text, v text, PRIMARY KEY (id, region))
        PARTITION BY LIST (region);
    CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
    CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu') PARTITION BY RANGE (id);
    CREATE TABLE events_eu_low PARTITION OF events_eu FOR VALUES FROM (MINVALUE) TO (1000);
    CREATE TABLE events_eu_high PARTITION OF events_eu FOR VALUES FROM (1000) TO (MAXVALUE);";

const PLAIN: &str = "CREATE TABLE events (id int, region text, v text, PRIMARY KEY (id, region));";

const TABLES: [(&str, &str); 1] = [("SYNC_TABLES", "events")];

const SEED: &str =
    "INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'us' ELSE 'eu' END, 'v' || g
                      FROM generate_series(1, 2000) g";

async fn start(target_ddl: &str) -> (Pair, crate::harness::Daemon) {
    let pair = Pair::with_ddl(PARTITIONED, target_ddl).await;
    pair.source().await.batch_execute(SEED).await.unwrap();
    let setup = pair.rowsync(&["setup"], &TABLES);
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    pair.assert_synced("events").await;
    let daemon = pair.spawn(&TABLES);
    (pair, daemon)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_into_partitions_moves_and_truncates_reach_a_partitioned_target() {
    let (pair, _daemon) = start(PARTITIONED).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO events VALUES (5001, 'us', 'through the table');
             INSERT INTO events_us VALUES (5002, 'us', 'straight in');
             INSERT INTO events_eu_low VALUES (5, 'eu', 'duplicate id, other region') ON CONFLICT DO NOTHING;
             INSERT INTO events_eu_high VALUES (5003, 'eu', 'two levels down');
             UPDATE events_eu_low SET v = 'updated in the leaf' WHERE id < 50;
             DELETE FROM events_us WHERE id BETWEEN 100 AND 200;
             -- moved to another partition: the key changes without a row UPDATE trigger firing
             UPDATE events SET region = 'eu' WHERE id BETWEEN 300 AND 320 AND region = 'us';
             -- moved within the sub-partitioned partition, written to directly
             UPDATE events_eu SET id = id + 3000 WHERE id BETWEEN 501 AND 521;",
        )
        .await
        .unwrap();
    pair.wait_synced("events", Duration::from_secs(30)).await;

    source
        .batch_execute("TRUNCATE events_eu_high")
        .await
        .unwrap();
    pair.wait_synced("events", Duration::from_secs(30)).await;

    // A partition created while rowsync runs (the event trigger captures it in the same
    // transaction), on both sides.
    let ddl = "CREATE TABLE events_jp PARTITION OF events FOR VALUES IN ('jp')";
    pair.target().await.batch_execute(ddl).await.unwrap();
    source
        .batch_execute(&format!(
            "{ddl}; INSERT INTO events_jp SELECT g, 'jp', 'new' FROM generate_series(1, 50) g;"
        ))
        .await
        .unwrap();
    source
        .batch_execute("UPDATE events_jp SET v = 'changed' WHERE id <= 10")
        .await
        .unwrap();
    pair.wait_synced("events", Duration::from_secs(30)).await;
    assert_eq!(
        count(
            &pair.target().await,
            "SELECT count(*) FROM events WHERE region = 'jp'"
        )
        .await,
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_attached_and_detached_without_an_event_trigger_reach_a_plain_target() {
    let (pair, daemon) = start(PLAIN).await;
    let source = pair.source().await;
    // As on a managed server where rowsync's role may not create one: the sweeps catch up.
    source
        .batch_execute("DROP EVENT TRIGGER rowsync_follow_ddl")
        .await
        .unwrap();

    // A table with rows, attached: its rows join the table, and later writes into it follow.
    source
        .batch_execute(
            "CREATE TABLE events_ca (LIKE events INCLUDING ALL);
             INSERT INTO events_ca SELECT g, 'ca', 'attached' FROM generate_series(1, 300) g;
             ALTER TABLE events ATTACH PARTITION events_ca FOR VALUES IN ('ca');
             -- written into before any sweep captured it
             UPDATE events_ca SET v = 'before capture' WHERE id <= 20;
             INSERT INTO events_ca VALUES (301, 'ca', 'before capture');",
        )
        .await
        .unwrap();
    pair.wait_synced("events", Duration::from_secs(30)).await;
    source
        .batch_execute(
            "DELETE FROM events_ca WHERE id > 250; UPDATE events_ca SET v = 'after' WHERE id = 1",
        )
        .await
        .unwrap();
    pair.wait_synced("events", Duration::from_secs(30)).await;

    // Detached: its rows are no longer the table's, so they leave the target.
    source
        .batch_execute("ALTER TABLE events DETACH PARTITION events_us")
        .await
        .unwrap();
    pair.wait_synced("events", Duration::from_secs(30)).await;
    assert_eq!(
        count(
            &pair.target().await,
            "SELECT count(*) FROM events WHERE region = 'us'"
        )
        .await,
        0
    );
    // Writes into the detached table are its own business now, and need no rowsync trigger.
    assert_eq!(
        count(
            &source,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events_us'::regclass AND tgname LIKE 'rowsync%'"
        )
        .await,
        0
    );
    source
        .batch_execute("INSERT INTO events_us VALUES (9999, 'us', 'not synced')")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE events SET v = 'last' WHERE id = 1")
        .await
        .unwrap();
    pair.wait_synced("events", Duration::from_secs(30)).await;
    assert!(
        daemon
            .log_text()
            .contains("captured partition public.events_ca"),
        "{}",
        daemon.log_text()
    );
}
