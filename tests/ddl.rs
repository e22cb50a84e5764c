//! Migrations on synced tables never make a source write fail, and capture follows them: key
//! columns renamed and retyped (with the event trigger adapting capture in the migration's own
//! transaction, and without it, when the daemon adapts it), tables renamed, truncated, dropped and
//! re-created with another key type, and a migration capture cannot follow (reported, repaired
//! by a re-copy).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::harness::{Pair, connect, count, free_port};

const ACCOUNTS: &str = "CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL UNIQUE, n int NOT NULL DEFAULT 0);";
const ACCOUNTS_TARGET: &str =
    "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL, n int NOT NULL DEFAULT 0);";

/// An application writing `accounts` without naming its key (so it keeps working across the
/// migrations): inserts, updates and deletes until `stop`. Returns (committed, failed) and the
/// first failure.
struct Writer {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<(u64, Option<String>)>,
}

impl Writer {
    fn start(url: String, table: &'static str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, failed) = (stop.clone(), failed.clone());
            async move {
                let client = connect(&url).await;
                let mut committed = 0;
                let mut first_error = None;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let sql = match i % 3 {
                        0 => format!("INSERT INTO {table} (name) VALUES ('w-{i}')"),
                        1 => format!(
                            "UPDATE {table} SET n = n + 1 WHERE name IN ('w-{}', 'seed-{}')",
                            i.saturating_sub(4),
                            i % 50
                        ),
                        _ => format!(
                            "DELETE FROM {table} WHERE name = 'w-{}'",
                            i.saturating_sub(30)
                        ),
                    };
                    match client.batch_execute(&sql).await {
                        Ok(()) => committed += 1,
                        Err(err) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert_with(|| format!("{sql}: {err:?}"));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (committed, first_error)
            }
        });
        Writer { stop, failed, task }
    }

    /// Stops the writer and asserts that every write it made went through.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (committed, first_error) = self.task.await.unwrap();
        assert_eq!(
            self.failed.load(Ordering::Relaxed),
            0,
            "source writes failed: {first_error:?}"
        );
        assert!(committed > 30, "the writer barely wrote: {committed}");
        committed
    }
}

/// The journal's key column of `accounts`: name and type.
async fn journal_key(source: &tokio_postgres::Client) -> String {
    source
        .query_one(
            "SELECT a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod) \
               FROM pg_attribute a \
              WHERE a.attrelid = 'rowsync.public_accounts_journal'::regclass AND a.attnum = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Whether `/health` on `port` answers 503 with `text` in it.
async fn critical_with(port: u16, text: &str) -> bool {
    match rowsync::ops::http::request(
        ([127, 0, 0, 1], port).into(),
        rowsync::ops::http::Method::GET,
        "/health",
        None,
    )
    .await
    {
        Ok((code, body)) => code == 503 && body.contains(text),
        Err(_) => false,
    }
}

async fn accounts_pair() -> Pair {
    let pair = Pair::with_ddl(ACCOUNTS, ACCOUNTS_TARGET).await;
    pair.source()
        .await
        .batch_execute(
            "INSERT INTO accounts (name) SELECT 'seed-' || g FROM generate_series(0, 49) g",
        )
        .await
        .unwrap();
    let setup = pair.rowsync(&["setup"], &[("SYNC_TABLES", "accounts")]);
    assert!(setup.status.success(), "{setup:?}");
    pair
}

/// Renames the key and changes its type on both sides while an application writes, then changes
/// a key: no write fails, and the target ends equal to the source.
async fn key_migrations_under_writes(event_trigger: bool) {
    let pair = accounts_pair().await;
    let source = pair.source().await;
    let target = pair.target().await;
    if !event_trigger {
        source
            .batch_execute("DROP EVENT TRIGGER rowsync_follow_ddl")
            .await
            .unwrap();
    }
    let _daemon = pair.spawn(&[("SYNC_TABLES", "accounts")]);
    let writer = Writer::start(pair.source_url(), "accounts");
    tokio::time::sleep(Duration::from_millis(500)).await;

    source
        .batch_execute("ALTER TABLE accounts RENAME COLUMN id TO account_id")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    target
        .batch_execute("ALTER TABLE accounts RENAME COLUMN id TO account_id")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    source
        .batch_execute("ALTER TABLE accounts ALTER COLUMN account_id TYPE bigint")
        .await
        .unwrap();
    target
        .batch_execute("ALTER TABLE accounts ALTER COLUMN account_id TYPE bigint")
        .await
        .unwrap();
    // Capture is adapted (by the event trigger, in the migration's transaction; else by the
    // daemon, at its next sweep): the journal takes the key's new name and type, so writes are
    // journaled by the static SQL again. (Until then, keys the old type cannot hold could not be
    // journaled: the next test.)
    pair.wait("capture to be adapted", Duration::from_secs(30), || async {
        journal_key(&source).await == "account_id bigint"
    })
    .await;
    // A key change after the migrations: its old key must leave the target.
    source
        .batch_execute(
            "UPDATE accounts SET account_id = account_id + 5000000000 WHERE name = 'seed-7';
             INSERT INTO accounts (account_id, name) VALUES (6000000000, 'big key');",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.finish().await;

    pair.wait_synced("accounts", Duration::from_secs(40)).await;
    let lost: Vec<String> = source
        .query(
            "SELECT lost_reason FROM rowsync.captured_tables WHERE lost_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(lost.is_empty(), "{lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_renamed_and_retyped_under_writes_with_the_event_trigger() {
    key_migrations_under_writes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_renamed_and_retyped_under_writes_without_the_event_trigger() {
    key_migrations_under_writes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_table_is_reported_and_followed_and_a_recreated_one_set_up_afresh() {
    let pair = accounts_pair().await;
    let source = pair.source().await;
    let target = pair.target().await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut daemon = pair.spawn(&[("SYNC_TABLES", "accounts"), ("HEALTH_ADDR", &addr)]);
    daemon.wait_listening(&pair).await;

    let writer = Writer::start(pair.source_url(), "members");
    source
        .batch_execute("ALTER TABLE accounts RENAME TO members")
        .await
        .unwrap();
    // The writer only starts succeeding once the table has its new name; count from there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.failed.store(0, Ordering::Relaxed);
    source
        .batch_execute("TRUNCATE members; INSERT INTO members (name) SELECT 'seed-' || g FROM generate_series(0, 49) g")
        .await
        .unwrap();
    pair.wait("health to name the rename", Duration::from_secs(30), || {
        critical_with(port, "renamed to public.members")
    })
    .await;
    writer.finish().await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));

    target
        .batch_execute("ALTER TABLE accounts RENAME TO members")
        .await
        .unwrap();
    let tables = [("SYNC_TABLES", "members")];
    let setup = pair.rowsync(&["setup"], &tables);
    let out = String::from_utf8_lossy(&setup.stdout).into_owned();
    assert!(setup.status.success(), "{out}");
    assert!(out.contains("capture already installed"), "{out}");
    let _daemon = pair.spawn(&tables);
    source
        .batch_execute("UPDATE members SET n = 42 WHERE name LIKE 'seed-1%'")
        .await
        .unwrap();
    pair.wait_synced("members", Duration::from_secs(30)).await;

    // Dropped and re-created with a key of another type: setup starts capture afresh, and every
    // write keeps going through.
    for db in [&source, &target] {
        db.batch_execute(
            "DROP TABLE members;
             CREATE TABLE members (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text NOT NULL, n int NOT NULL DEFAULT 0);",
        )
        .await
        .unwrap();
    }
    source
        .batch_execute(
            "INSERT INTO members (name) SELECT 'uuid-' || g FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    let setup = pair.rowsync(&["setup"], &tables);
    assert!(setup.status.success(), "{setup:?}");
    let writer = Writer::start(pair.source_url(), "members");
    tokio::time::sleep(Duration::from_secs(2)).await;
    writer.finish().await;
    pair.wait_synced("members", Duration::from_secs(40)).await;
    assert_eq!(
        count(&source, "SELECT count(*) FROM rowsync.captured_tables").await,
        1,
        "the dropped table's capture is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_capture_cannot_journal_are_reported_and_a_setup_copies_them() {
    let pair = accounts_pair().await;
    let source = pair.source().await;
    let target = pair.target().await;
    // Without the event trigger, and with a daemon that may not adapt capture: the key becomes
    // text while the journal still holds integers.
    source
        .batch_execute("DROP EVENT TRIGGER rowsync_follow_ddl")
        .await
        .unwrap();
    for db in [&source, &target] {
        db.batch_execute(
            "ALTER TABLE accounts ALTER COLUMN id DROP DEFAULT;
             ALTER TABLE accounts ALTER COLUMN id TYPE text USING 'k' || id;",
        )
        .await
        .unwrap();
    }
    source
        .batch_execute("INSERT INTO accounts (id, name) VALUES ('text key', 'after the migration')")
        .await
        .unwrap();
    assert_eq!(
        count(
            &source,
            "SELECT count(*) FROM rowsync.captured_tables WHERE lost_at IS NOT NULL"
        )
        .await,
        1
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let tables = [("SYNC_TABLES", "accounts")];
    let mut daemon = pair.spawn(&[("SYNC_TABLES", "accounts"), ("HEALTH_ADDR", &addr)]);
    pair.wait(
        "health to report the lost writes",
        Duration::from_secs(30),
        || critical_with(port, "could not be journaled"),
    )
    .await;
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    let setup = pair.rowsync(&["setup"], &tables);
    let out = String::from_utf8_lossy(&setup.stdout).into_owned();
    assert!(setup.status.success(), "{out}");
    assert!(out.contains("capture repaired"), "{out}");
    let _daemon = pair.spawn(&tables);
    source
        .batch_execute("UPDATE accounts SET n = 7 WHERE id = 'text key'")
        .await
        .unwrap();
    pair.wait_synced("accounts", Duration::from_secs(30)).await;
}

/// A migration that rewrites the source table (`ALTER COLUMN … TYPE`) while a batch is about to
/// read it: the batch waits for it before taking its snapshot. Before, the batch took its
/// snapshot first, then waited for the table and read it as rewritten, which a snapshot older
/// than the rewrite sees empty: every key it had journaled looked deleted, and the target lost
/// those rows (a probe lost ~200 live rows per rewrite of a busy 1M-row table; health stayed
/// green).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_rewrite_while_changes_are_applied_deletes_nothing_in_the_target() {
    let ddl = "CREATE TABLE big (id int PRIMARY KEY, n int NOT NULL, v int);
        CREATE FUNCTION slowly(x int) RETURNS bigint LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_sleep(0.05); RETURN x; END $$;";
    let pair = Pair::new(ddl).await;
    let source = pair.source().await;
    source
        .batch_execute("INSERT INTO big SELECT g, g, g FROM generate_series(1, 40) g")
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "big")];
    let output = pair.rowsync(&["setup"], &env);
    assert!(output.status.success(), "{output:?}");
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    let migrating = connect(&pair.source_url()).await;
    for round in 0..3 {
        let (to, using) = if round % 2 == 0 {
            ("bigint", "slowly(v)")
        } else {
            ("int", "slowly(v::int)::int")
        };
        source
            .execute("UPDATE big SET n = n + 1 WHERE id <= 10", &[])
            .await
            .unwrap();
        // About 2 s under an ACCESS EXCLUSIVE lock, starting as the daemon wakes for the update.
        migrating
            .batch_execute(&format!(
                "ALTER TABLE big ALTER COLUMN v TYPE {to} USING {using}"
            ))
            .await
            .unwrap();
        pair.wait_synced("big", Duration::from_secs(20)).await;
    }
    assert!(daemon.is_running(), "{}", daemon.log_text());
}

/// Another primary key on both sides while the daemon runs, then `rowsync resync` (as the README
/// says): the daemon reads the table's mapping again and applies it by the new key. Before, it
/// kept the statements of the old key and failed ("column j.id does not exist") until a restart,
/// and changes after the resync never arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_primary_key_then_a_resync_is_followed_by_the_running_daemon() {
    let ddl = "CREATE TABLE codes (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text);";
    let pair = Pair::new(ddl).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO codes SELECT g, 'c' || g, 'v' || g FROM generate_series(1, 30) g",
        )
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "codes"), ("RETRY_MAX_DELAY", "1000")];
    let output = pair.rowsync(&["setup"], &env);
    assert!(output.status.success(), "{output:?}");
    let daemon = pair.spawn(&env);
    daemon.wait_listening(&pair).await;
    let target = pair.target().await;
    for db in [&source, &target] {
        db.batch_execute("ALTER TABLE codes DROP CONSTRAINT codes_pkey, ADD PRIMARY KEY (code)")
            .await
            .unwrap();
    }
    source
        .batch_execute("UPDATE codes SET v = 'during' WHERE id <= 5")
        .await
        .unwrap();
    let resync = pair.rowsync(&["resync", "codes"], &env);
    assert!(resync.status.success(), "{resync:?}");
    source
        .batch_execute(
            "UPDATE codes SET v = 'after the resync' WHERE id > 25; DELETE FROM codes WHERE id = 1",
        )
        .await
        .unwrap();
    pair.wait_synced("codes", Duration::from_secs(30)).await;
    assert!(daemon.is_running(), "{}", daemon.log_text());
}
