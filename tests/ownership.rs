//! Per-table ownership: several rowsync processes with overlapping table lists split the tables
//! between them, each table applied by exactly one at a time (an audit trigger on the target
//! proves it), `/status` says who applies what, and the tables of a process that dies are taken
//! over within a few seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Daemon, Pair, connect, free_port};

const TABLES: [&str; 4] = ["t1", "t2", "t3", "t4"];

fn ddl() -> String {
    TABLES
        .iter()
        .map(|t| format!("CREATE TABLE {t} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);"))
        .collect()
}

/// Every write rowsync makes to a target table records the table, the process and the time.
fn audit() -> String {
    let mut sql =
        "CREATE TABLE audit (seq bigserial PRIMARY KEY, tbl text, instance text, at timestamptz);
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO audit (tbl, instance, at)
             VALUES (TG_TABLE_NAME, current_setting('rowsync.instance', true), clock_timestamp());
             RETURN NULL;
         END $$;"
            .to_string();
    for t in TABLES {
        sql.push_str(&format!(
            "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION audit();"
        ));
    }
    sql
}

/// `/status` owners of the daemon on `port` (empty while it does not answer).
async fn owners(port: u16) -> BTreeMap<String, String> {
    let Ok((200, body)) = rowsync_status(port).await else {
        return BTreeMap::new();
    };
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["owners"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn rowsync_status(port: u16) -> Result<(u16, String), ()> {
    let request = rowsync::ops::http::request(
        ([127, 0, 0, 1], port).into(),
        rowsync::ops::http::Method::GET,
        "/status",
        None,
    );
    match tokio::time::timeout(Duration::from_secs(2), request).await {
        Ok(Ok(answer)) => Ok(answer),
        _ => Err(()),
    }
}

fn instance_of(daemon: &Daemon) -> String {
    format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim(),
        daemon.pid()
    )
}

/// A daemon syncing `list` with a health port, once `/status` says it owns `tables` (within
/// `seconds`): the daemon, its port and its instance name.
/// `rowsync setup` of `list`, which must succeed.
fn set_up(pair: &Pair, list: &str) {
    let setup = pair.rowsync(&["setup"], &[("SYNC_TABLES", list)]);
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
}

async fn spawn_owning(
    pair: &Pair,
    list: &str,
    tables: &[&str],
    seconds: u64,
) -> (Daemon, u16, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = pair.spawn(&[("SYNC_TABLES", list), ("HEALTH_ADDR", addr.as_str())]);
    let me = instance_of(&daemon);
    pair.wait(
        &format!("the daemon to own {}", tables.join(", ")),
        Duration::from_secs(seconds),
        || async {
            let owners = owners(port).await;
            tables
                .iter()
                .all(|t| owners.get(&format!("public.{t}")) == Some(&me))
        },
    )
    .await;
    (daemon, port, me)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_split_overlapping_lists_and_take_over_each_others_tables() {
    let pair = Pair::new(&ddl()).await;
    let source = pair.source().await;
    let target = pair.target().await;
    for t in TABLES {
        source
            .batch_execute(&format!(
                "INSERT INTO {t} SELECT g FROM generate_series(1, 100) g"
            ))
            .await
            .unwrap();
    }
    assert!(
        pair.rowsync(&["setup"], &[("SYNC_TABLES", "t1,t2,t3,t4")])
            .status
            .success()
    );
    target.batch_execute(&audit()).await.unwrap();

    let ports = [free_port(), free_port(), free_port()];
    let lists = ["t1,t2,t3,t4", "t1,t2", "t3,t4"];
    let mut daemons: Vec<Daemon> = ports
        .iter()
        .zip(lists)
        .map(|(port, list)| {
            let addr = format!("127.0.0.1:{port}");
            pair.spawn(&[("SYNC_TABLES", list), ("HEALTH_ADDR", &addr)])
        })
        .collect();
    let names: Vec<String> = daemons.iter().map(instance_of).collect();

    // The tables are split: every one owned, by a process that lists it, and each process
    // applies some.
    pair.wait(
        "the tables to be split",
        Duration::from_secs(60),
        || async {
            let seen = owners(ports[0]).await;
            TABLES.len() == seen.len()
                && names.iter().all(|name| seen.values().any(|o| o == name))
                && ["public.t1", "public.t2"]
                    .iter()
                    .all(|t| seen.get(*t) != Some(&names[2]))
                && ["public.t3", "public.t4"]
                    .iter()
                    .all(|t| seen.get(*t) != Some(&names[1]))
        },
    )
    .await;
    let split = owners(ports[0]).await;
    target.batch_execute("TRUNCATE audit").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (url, stop) = (pair.source_url(), stop.clone());
        async move {
            let client = connect(&url).await;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                for t in TABLES {
                    client
                        .batch_execute(&format!(
                            "UPDATE {t} SET n = n + 1 WHERE id = {}",
                            i % 100 + 1
                        ))
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The process applying t3 and t4 (the third, or the first) dies: the other one listing them
    // takes them over within a few seconds.
    let victim = if split["public.t3"] == names[2] { 2 } else { 0 };
    daemons[victim].kill9();
    let killed = Instant::now();
    let survivor = if victim == 2 { 0 } else { 2 };
    pair.wait("the takeover", Duration::from_secs(10), || async {
        let seen = owners(ports[survivor]).await;
        ["public.t3", "public.t4"].iter().all(|t| {
            seen.get(*t)
                .is_some_and(|o| o != &names[victim] && o != "nobody")
        })
    })
    .await;
    let took = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    for t in TABLES {
        pair.wait_synced(t, Duration::from_secs(30)).await;
    }
    assert!(took < Duration::from_secs(5), "the takeover took {took:?}");

    // Never two processes applying one table at once: per table, the times each process wrote
    // it form intervals that do not overlap.
    let rows = target
        .query(
            "SELECT tbl, instance, min(at)::text, max(at)::text, count(*) FROM audit \
              GROUP BY tbl, instance ORDER BY tbl, min(at)",
            &[],
        )
        .await
        .unwrap();
    let mut intervals: BTreeMap<String, Vec<(Option<String>, String, String)>> = BTreeMap::new();
    for row in &rows {
        intervals
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2), row.get(3)));
    }
    assert_eq!(intervals.len(), TABLES.len(), "{rows:?}");
    for (table, spans) in &intervals {
        assert!(
            spans.iter().all(|(instance, _, _)| instance.is_some()),
            "{table}: writes without rowsync.instance"
        );
        for pair_of_spans in spans.windows(2) {
            // timestamptz text in one time zone: text order is time order.
            assert!(
                pair_of_spans[0].2 < pair_of_spans[1].1,
                "{table} was applied by two processes at once: {spans:?}"
            );
        }
    }
}

/// A table lock held by something other than a rowsync process (`rowsync repair` applying a
/// table itself) is not a process to hand tables to: the daemon keeps its tables, and takes the
/// table once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_a_repair_is_not_a_process_to_hand_tables_to() {
    let pair = Pair::new(&ddl()).await;
    let list = TABLES.join(",");
    set_up(&pair, &list);
    let holder = pair.target().await;
    let lock = "SELECT pg_advisory_lock(hashtext('rowsync.table'), hashtext(to_regclass('t4')::oid::text))";
    holder.execute(lock, &[]).await.unwrap();
    let (daemon, port, me) = spawn_owning(&pair, &list, &["t1", "t2", "t3"], 30).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !daemon.log_text().contains("handing the table over"),
        "{}",
        daemon.log_text()
    );
    holder
        .execute(
            "SELECT pg_advisory_unlock(hashtext('rowsync.table'), hashtext(to_regclass('t4')::oid::text))",
            &[],
        )
        .await
        .unwrap();
    pair.wait(
        "the daemon to take t4 too",
        Duration::from_secs(30),
        || async { owners(port).await.get("public.t4") == Some(&me) },
    )
    .await;
}

/// Advisory locks belong to a database: a rowsync of another database on the same target server
/// (here a staging copy whose table has the same oid, so its lock the same key, and two more
/// of its processes) neither holds this database's tables nor shares them out. The daemon owns and
/// syncs all four at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rowsync_of_another_database_on_the_target_server_holds_none_of_these_tables() {
    let pair = Pair::new(&ddl()).await;
    let list = TABLES.join(",");
    let setup = pair.rowsync(&["setup"], &[("SYNC_TABLES", list.as_str())]);
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let target = pair.target().await;
    target
        .batch_execute("CREATE DATABASE staging")
        .await
        .unwrap();
    let key: i32 = target
        .query_one("SELECT hashtext(to_regclass('t1')::oid::text)", &[])
        .await
        .unwrap()
        .get(0);
    // The other deployment: the lock of its t1, held by a process named as rowsync names its
    // lock sessions, and two more of its processes.
    let mut others = Vec::new();
    for n in 0..3 {
        let other = connect(&pair.target.url("staging")).await;
        other
            .batch_execute(&format!(
                "SET application_name = 'rowsync-leader staging:{n}'"
            ))
            .await
            .unwrap();
        if n == 0 {
            other
                .execute(
                    "SELECT pg_advisory_lock(hashtext('rowsync.table'), $1)",
                    &[&key],
                )
                .await
                .unwrap();
        }
        others.push(other);
    }

    let (daemon, _, _) = spawn_owning(&pair, &list, &TABLES, 10).await;
    let source = pair.source().await;
    for t in TABLES {
        source
            .batch_execute(&format!(
                "INSERT INTO {t} SELECT g, g FROM generate_series(1, 20) g"
            ))
            .await
            .unwrap();
    }
    for t in TABLES {
        pair.wait_synced(t, Duration::from_secs(30)).await;
    }
    // Nor are the other database's processes ones to share tables with: counted, they would
    // be handed a table every rebalancing (10 s), which nobody here takes.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        !daemon.log_text().contains("handing the table over"),
        "{}",
        daemon.log_text()
    );
    drop(others);
}

/// A second process that cannot reach the source takes no table: before, it was counted in the
/// share-out, the healthy process handed it half the tables, and those stalled for as long as it
/// lived (health green on both sides of the hand-over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_cannot_reach_the_source_is_handed_no_table() {
    let pair = Pair::new(&ddl()).await;
    let list = TABLES.join(",");
    set_up(&pair, &list);
    let (daemon, port, me) = spawn_owning(&pair, &list, &TABLES, 30).await;
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/app", free_port());
    let blind = pair.spawn(&[
        ("SYNC_TABLES", list.as_str()),
        ("SOURCE_DATABASE_URL", unreachable.as_str()),
    ]);
    pair.wait_logged(
        &blind,
        "the second process to find the source out of reach",
        "cannot reach the source",
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        !daemon.log_text().contains("handing the table over"),
        "{}",
        daemon.log_text()
    );
    let owners = owners(port).await;
    assert!(
        TABLES
            .iter()
            .all(|t| owners.get(&format!("public.{t}")) == Some(&me)),
        "{owners:?}"
    );
}
