//! Native logical replication of `users_lr`: the publication, the subscription, and making sure no
//! replication slot is ever left behind retaining WAL or keeping a walsender busy.
//!
//! `CREATE SUBSCRIPTION` and `DROP SUBSCRIPTION` cannot run in a transaction block, so each
//! statement is sent on its own.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::db;
use crate::error::{Context, Result};
use crate::fixture::{Fixture, NATIVE};

pub(crate) const PUBLICATION: &str = "bench_pub";
pub(crate) const SUBSCRIPTION: &str = "bench_sub";

const POLL: Duration = Duration::from_millis(20);

pub(crate) async fn create_publication(fx: &Fixture<'_>) -> Result<()> {
    db::exec(
        &fx.source,
        &format!("CREATE PUBLICATION {PUBLICATION} FOR TABLE {NATIVE}"),
    )
    .await
}

/// Creates the subscription; with `copy_data` it starts with a table copy, else it streams only
/// what is written from now on (a fresh slot).
pub(crate) async fn subscribe(fx: &mut Fixture<'_>, copy_data: bool) -> Result<()> {
    let port = fx.servers.source.port();
    let conninfo = format!(
        "host=127.0.0.1 port={port} dbname={} user=postgres",
        crate::fixture::DATABASE
    );
    db::exec(
        &fx.target,
        &format!(
            "CREATE SUBSCRIPTION {SUBSCRIPTION} CONNECTION {} PUBLICATION {PUBLICATION} \
             WITH (copy_data = {copy_data})",
            db::literal(&conninfo)
        ),
    )
    .await?;
    fx.last_worker_start = Some(Instant::now());
    Ok(())
}

/// PostgreSQL's logical replication launcher starts at most one apply worker per
/// `wal_retrieve_retry_interval` (5 s by default). A subscription created or enabled sooner after
/// the previous one would be measured waiting for the launcher, not replicating: wait that out.
pub(crate) async fn wait_for_launcher(fx: &Fixture<'_>) -> Result<()> {
    let Some(last) = fx.last_worker_start else {
        return Ok(());
    };
    let interval_ms = db::int(
        &fx.target,
        "SELECT setting::int8 FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'",
        &[],
    )
    .await?;
    let ready_at = last + Duration::from_millis(interval_ms.max(0) as u64 + 500);
    tokio::time::sleep_until(ready_at.into()).await;
    Ok(())
}

/// Waits until every table of the subscription is in state `r` (ready: its copy is done).
pub(crate) async fn wait_tables_ready(fx: &Fixture<'_>, timeout: Duration) -> Result<()> {
    let sql = format!(
        "SELECT CASE WHEN count(*) > 0 AND bool_and(r.srsubstate = 'r') THEN 1 ELSE 0 END::int8
           FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
          WHERE s.subname = '{SUBSCRIPTION}'"
    );
    db::wait_for(
        "the subscription's table copy to be ready",
        timeout,
        POLL,
        async || Ok((db::int(&fx.target, &sql, &[]).await? == 1).then_some(())),
    )
    .await
}

/// Waits until the subscription's walsender on the source is streaming.
pub(crate) async fn wait_streaming(fx: &Fixture<'_>) -> Result<()> {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_replication
          WHERE application_name = '{SUBSCRIPTION}' AND state = 'streaming'"
    );
    db::wait_for(
        "the subscription to stream",
        Duration::from_secs(60),
        POLL,
        async || Ok((db::int(&fx.source, &sql, &[]).await? > 0).then_some(())),
    )
    .await
}

/// Stops the subscription's apply worker; its slot stays and keeps the WAL from now on.
pub(crate) async fn disable(fx: &Fixture<'_>) -> Result<()> {
    db::exec(
        &fx.target,
        &format!("ALTER SUBSCRIPTION {SUBSCRIPTION} DISABLE"),
    )
    .await?;
    let sql = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SUBSCRIPTION}' AND active"
    );
    db::wait_for(
        "the subscription's slot to become inactive",
        Duration::from_secs(60),
        POLL,
        async || Ok((db::int(&fx.source, &sql, &[]).await? == 0).then_some(())),
    )
    .await
}

pub(crate) async fn enable(fx: &mut Fixture<'_>) -> Result<()> {
    db::exec(
        &fx.target,
        &format!("ALTER SUBSCRIPTION {SUBSCRIPTION} ENABLE"),
    )
    .await?;
    fx.last_worker_start = Some(Instant::now());
    Ok(())
}

/// Drops the subscription (which drops its slot on the source) and checks no slot is left.
pub(crate) async fn unsubscribe(fx: &Fixture<'_>) -> Result<()> {
    db::exec(
        &fx.target,
        &format!("DROP SUBSCRIPTION IF EXISTS {SUBSCRIPTION}"),
    )
    .await?;
    drop_all_slots(&fx.source).await
}

/// Best effort, for every exit path: removes the subscription without contacting the publisher,
/// then every slot on the source.
pub(crate) async fn clean_up(source: &Client, target: &Client) -> Result<()> {
    let exists = db::int(
        target,
        &format!("SELECT count(*) FROM pg_subscription WHERE subname = '{SUBSCRIPTION}'"),
        &[],
    )
    .await?;
    if exists > 0 {
        for statement in [
            format!("ALTER SUBSCRIPTION {SUBSCRIPTION} DISABLE"),
            format!("ALTER SUBSCRIPTION {SUBSCRIPTION} SET (slot_name = NONE)"),
            format!("DROP SUBSCRIPTION {SUBSCRIPTION}"),
        ] {
            db::exec(target, &statement).await?;
        }
    }
    drop_all_slots(source).await
}

/// Drops every replication slot on the source, waiting for (and at last ending) the walsenders
/// still using them. The benchmark's source has no other slots.
pub(crate) async fn drop_all_slots(source: &Client) -> Result<()> {
    let started = Instant::now();
    db::wait_for(
        "every replication slot on the source to be dropped",
        Duration::from_secs(60),
        POLL,
        async || {
            let slots = source
                .query(
                    "SELECT slot_name::text, active, active_pid FROM pg_replication_slots",
                    &[],
                )
                .await
                .context("listing replication slots")?;
            if slots.is_empty() {
                return Ok(Some(()));
            }
            for slot in &slots {
                let name: String = slot.get(0);
                let active: bool = slot.get(1);
                let pid: Option<i32> = slot.get(2);
                if !active {
                    // Another session may drop it meanwhile (the subscription's own drop).
                    let _ = source
                        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                        .await;
                } else if let Some(pid) = pid
                    && started.elapsed() > Duration::from_secs(10)
                {
                    let _ = source
                        .execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .await;
                }
            }
            Ok(None)
        },
    )
    .await
}

/// Slots on the source now (0 whenever no subscription is meant to exist).
pub(crate) async fn slot_count(source: &Client) -> Result<i64> {
    db::int(source, "SELECT count(*) FROM pg_replication_slots", &[]).await
}
