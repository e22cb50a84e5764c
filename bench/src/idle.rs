//! Measurement: what many tables cost when nothing changes. [`TABLES`] tables (`idle.t000` …) of
//! up to 10,000 rows each are set up and synced; the daemon then idles for a while: its CPU (the
//! process and its sessions on both servers) as a share of one core, its RSS, how long a sweep of
//! all of them takes when it finds nothing, and how long one change to one of them takes to
//! arrive. Native logical replication idles with a subscription of the same tables, side by side
//! (its walsender and apply worker).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cpu::{self, Consumer};
use crate::error::{Context, Error, Result};
use crate::fixture::Fixture;
use crate::{db, lag, stats, sweep};

pub(crate) const TABLES: usize = 200;

/// Sweeps asked for with POST /sync, each timed by the daemon.
const SWEEPS: usize = 5;

/// How long the idle CPU is measured.
const IDLE: Duration = Duration::from_secs(20);

const PUBLICATION: &str = "bench_idle_pub";
const SUBSCRIPTION: &str = "bench_idle_sub";

#[derive(Debug, Clone, Serialize)]
pub(crate) struct IdleFigures {
    pub tables: usize,
    pub rows_per_table: u64,
    /// `rowsync setup` of all of them (capture and copy).
    pub setup_s: f64,
    /// CPU of the idle daemon and its sessions, as a share of one core.
    pub rowsync_cpu_share: f64,
    pub rowsync_rss_mib: f64,
    /// Sweeps of every table that found nothing, from `/status`.
    pub empty_sweep_ms: Vec<f64>,
    pub empty_sweep_median_ms: f64,
    /// One UPDATE of one row of one table, from its commit to the target having it.
    pub change_ms: Vec<f64>,
    pub change_median_ms: f64,
    /// CPU of native replication's walsender and apply worker, subscribed to the same tables.
    pub native_cpu_share: f64,
}

fn table(i: usize) -> String {
    format!("idle.t{i:03}")
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<IdleFigures> {
    let rows = (fx.rows / 100).clamp(10, 10_000);
    fx.say(&format!(
        "idle tables: creating {TABLES} tables of {rows} rows on both servers"
    ));
    fx.stop_daemon().await?;
    let ddl = (0..TABLES)
        .map(|i| {
            format!(
                "CREATE TABLE {} (id int PRIMARY KEY, payload text NOT NULL, \
                 updated_at timestamptz NOT NULL DEFAULT now());",
                table(i)
            )
        })
        .collect::<String>();
    for client in [&fx.source, &fx.target] {
        db::exec(client, &format!("CREATE SCHEMA idle; {ddl}")).await?;
    }
    let load = (0..TABLES)
        .map(|i| {
            format!(
                "INSERT INTO {} SELECT g, md5(g::text), now() - interval '30 days' \
                   FROM generate_series(1, {rows}) g;",
                table(i)
            )
        })
        .collect::<String>();
    db::exec(&fx.source, &load).await?;
    db::exec(&fx.source, "ANALYZE").await?;
    let list = (0..TABLES).map(table).collect::<Vec<_>>().join(",");

    let started = Instant::now();
    let mut command = fx.rowsync_command("setup", None);
    command.env("SYNC_TABLES", &list);
    let mut setup = fx.spawn("rowsync-setup-idle", command)?;
    let exited = setup.wait_success(Duration::from_secs(1800)).await;
    fx.collect_rowsync_log(&setup);
    exited?;
    let setup_s = started.elapsed().as_secs_f64();
    fx.say(&format!(
        "idle tables: setup took {setup_s:.1} s; starting the daemon"
    ));

    let addr = sweep::free_addr()?;
    let mut command = fx.rowsync_command("run", Some(addr));
    command.env("SYNC_TABLES", &list);
    let daemon = fx.spawn("rowsync-run-idle", command)?;
    fx.daemon = Some(daemon);
    fx.wait_listening().await?;
    // The first sweep after a start re-reads each table's look-back: let it pass.
    let status = sweep::wait_for_sweeps(fx, addr, 1, Duration::from_secs(600)).await?;
    let mut done = sweep::sweeps(&status)?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = cpu::consumer_ticks(fx, Consumer::Rowsync).await?;
    tokio::time::sleep(IDLE).await;
    let after = cpu::consumer_ticks(fx, Consumer::Rowsync).await?;
    let rowsync_cpu_share = cpu::consumer_cpu_seconds(&before, &after) / IDLE.as_secs_f64();
    let pid = fx
        .daemon
        .as_ref()
        .map(|daemon| daemon.pid())
        .ok_or_else(|| Error::msg("the daemon is gone"))?;
    let rowsync_rss_mib = lag::status_kib(pid, "VmRSS")? as f64 / 1024.0;

    let mut empty_sweep_ms = Vec::new();
    for _ in 0..SWEEPS {
        let (code, body) =
            rowsync::ops::http::request(addr, rowsync::ops::http::Method::POST, "/sync", None)
                .await
                .context("POST /sync to the daemon")?;
        if code != 200 && code != 202 {
            return Err(Error::msg(format!("POST /sync answered {code}: {body}")));
        }
        let status = sweep::wait_for_sweeps(fx, addr, done + 1, Duration::from_secs(600)).await?;
        done = sweep::sweeps(&status)?;
        empty_sweep_ms.push(sweep::last_duration_ms(&status)?);
    }

    let mut change_ms = Vec::new();
    for (n, i) in [137, 3, 199, 64, 100].into_iter().enumerate() {
        let marker = format!("changed-{n}");
        let sql = format!("UPDATE {} SET payload = $1 WHERE id = 1", table(i));
        let check = format!(
            "SELECT count(*) FROM {} WHERE id = 1 AND payload = $1",
            table(i)
        );
        fx.source
            .execute(&sql, &[&marker])
            .await
            .context("changing one idle row")?;
        let committed = Instant::now();
        db::wait_for(
            "one change to an idle table to arrive",
            Duration::from_secs(60),
            Duration::from_millis(2),
            async || Ok((db::int(&fx.target, &check, &[&marker]).await? == 1).then_some(())),
        )
        .await?;
        change_ms.push(committed.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    fx.stop_daemon().await?;
    fx.say(&format!(
        "idle tables, rowsync: {:.2}% of a core, {rowsync_rss_mib:.1} MiB, empty sweeps \
         {empty_sweep_ms:?} ms, one change in {change_ms:?} ms",
        rowsync_cpu_share * 100.0
    ));

    fx.say("idle tables, native: a subscription of the same tables, idle");
    let port = fx.servers.source.port();
    let conninfo = format!(
        "host=127.0.0.1 port={port} dbname={} user=postgres",
        crate::fixture::DATABASE
    );
    db::exec(
        &fx.source,
        &format!("CREATE PUBLICATION {PUBLICATION} FOR TABLES IN SCHEMA idle"),
    )
    .await?;
    crate::native::wait_for_launcher(fx).await?;
    db::exec(
        &fx.target,
        &format!(
            "CREATE SUBSCRIPTION {SUBSCRIPTION} CONNECTION {} PUBLICATION {PUBLICATION} \
             WITH (copy_data = false)",
            db::literal(&conninfo)
        ),
    )
    .await?;
    fx.last_worker_start = Some(Instant::now());
    let streaming = format!(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{SUBSCRIPTION}' \
           AND state = 'streaming'"
    );
    db::wait_for(
        "the idle tables' subscription to stream",
        Duration::from_secs(120),
        Duration::from_millis(50),
        async || Ok((db::int(&fx.source, &streaming, &[]).await? > 0).then_some(())),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = native_ticks(fx).await?;
    tokio::time::sleep(IDLE).await;
    let after = native_ticks(fx).await?;
    let native_cpu_share = cpu::consumer_cpu_seconds(&before, &after) / IDLE.as_secs_f64();
    db::exec(&fx.target, &format!("DROP SUBSCRIPTION {SUBSCRIPTION}")).await?;
    db::exec(&fx.source, &format!("DROP PUBLICATION {PUBLICATION}")).await?;
    fx.say(&format!(
        "idle tables, native: {:.2}% of a core",
        native_cpu_share * 100.0
    ));
    for client in [&fx.source, &fx.target] {
        db::exec(client, "DROP SCHEMA idle CASCADE").await?;
    }
    Ok(IdleFigures {
        tables: TABLES,
        rows_per_table: rows,
        setup_s,
        rowsync_cpu_share,
        rowsync_rss_mib,
        empty_sweep_median_ms: stats::median(&empty_sweep_ms),
        empty_sweep_ms,
        change_median_ms: stats::median(&change_ms),
        change_ms,
        native_cpu_share,
    })
}

/// The idle subscription's walsender and apply worker.
async fn native_ticks(fx: &Fixture<'_>) -> Result<cpu::ConsumerTicks> {
    cpu::ticks_of(
        fx,
        &format!("SELECT pid FROM pg_stat_replication WHERE application_name = '{SUBSCRIPTION}'"),
        &format!(
            "SELECT pid FROM pg_stat_subscription WHERE subname = '{SUBSCRIPTION}' AND pid IS NOT NULL"
        ),
    )
    .await
}
