//! Batches bounded by bytes as well as rows: a table of wide rows syncs in bounded memory, in
//! statements far below PostgreSQL's 1 GiB message limit.

use std::time::Duration;

use crate::harness::{Pair, count};

/// Megabytes of row data in the daemon's statements (`BATCH_MAX_MB`).
const BATCH_MAX_MB: u64 = 4;

/// The peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_rows_sync_in_bounded_memory() {
    let pair = Pair::new("CREATE TABLE docs (id int PRIMARY KEY, body text, data bytea);").await;
    let source = pair.source().await;
    let target = pair.target().await;
    source
        .batch_execute("INSERT INTO docs SELECT g, 'small', NULL FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let mb = BATCH_MAX_MB.to_string();
    let env = [("SYNC_TABLES", "docs"), ("BATCH_MAX_MB", mb.as_str())];
    assert!(pair.rowsync(&["setup"], &env).status.success());
    let daemon = pair.spawn(&env);
    // 400 rows of about 1 MB each (text and bytea), in one transaction: one batch of 400 MB,
    // which a row-bounded batch would hold in memory whole and send as one statement.
    source
        .batch_execute(
            "INSERT INTO docs
             SELECT g, repeat(md5(g::text), 16000), convert_to(repeat(md5((-g)::text), 16000), 'UTF8')
               FROM generate_series(11, 410) g;
             UPDATE docs SET body = repeat('x', 900000) WHERE id <= 10;",
        )
        .await
        .unwrap();
    let digest = "SELECT md5(string_agg(id || ':' || md5(body) || ':' || coalesce(md5(data), '-'), ',' ORDER BY id)) FROM docs";
    let expected: String = source.query_one(digest, &[]).await.unwrap().get(0);
    pair.wait(
        "the wide rows to arrive",
        Duration::from_secs(120),
        || async {
            let got: Option<String> = target.query_one(digest, &[]).await.unwrap().get(0);
            got.as_deref() == Some(expected.as_str())
        },
    )
    .await;
    pair.assert_synced("docs").await;
    assert_eq!(count(&target, "SELECT count(*) FROM docs").await, 410);

    // The daemon's own ~25 MiB, the first chunk (8 rows, before any size is known), then two
    // chunks of BATCH_MAX_MB in flight and their encoding: far below the 400 MB of the batch.
    let peak = peak_rss_mib(daemon.pid());
    eprintln!("peak RSS of the daemon: {peak} MiB");
    assert!(
        peak < 100,
        "peak RSS {peak} MiB while applying 400 MB of rows\n{}",
        daemon.log_text()
    );
}
