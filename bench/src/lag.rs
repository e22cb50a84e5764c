//! Measurement 4: end-to-end lag under a steady 1,000 changes/s, and the daemon's RSS meanwhile.
//!
//! Four writers, each paced at 250 single-row updates/s on its own keys, record every change's key,
//! `updated_at` and transaction id. On the target an `AFTER INSERT OR UPDATE` row trigger on users
//! records each row version rowsync writes, with the writing transaction's id. Both servers track
//! commit timestamps and share the machine's clock, so a change's lag is the commit time of the
//! target transaction that wrote that exact row version (same key, same `updated_at`) minus the
//! commit time of the source transaction. A change overwritten before rowsync read it never
//! arrives by itself (rowsync applies the row's current state); such changes are counted as
//! superseded, not as lag samples.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::error::{Context, Error, Result};
use crate::fixture::Fixture;
use crate::{db, stats};

const WRITERS: u64 = 4;
const RATE_PER_WRITER: u64 = 250;
pub(crate) const RATE: u64 = WRITERS * RATE_PER_WRITER;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LagFigures {
    pub seconds: u64,
    pub writes: u64,
    pub achieved_rate_per_s: f64,
    pub samples: usize,
    /// Changes overwritten before rowsync applied them (no arrival of their own).
    pub superseded: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct StreamingRss {
    /// Largest VmRSS seen, sampled every 200 ms during the steady load.
    pub sampled_peak_mib: f64,
    /// VmHWM at the end of the steady load (reset just before it).
    pub hwm_mib: f64,
    /// VmHWM of the daemon just before, covering its start and the catch-up.
    pub catch_up_hwm_mib: f64,
}

/// One source change.
struct Change {
    id: String,
    xid: String,
    updated_us: i64,
}

const ARRIVALS: &str = "
    CREATE TABLE bench_arrivals (
        id         uuid,
        status     text,
        updated_at timestamptz,
        xid        xid8 DEFAULT pg_current_xact_id()
    );
    CREATE FUNCTION bench_arrival() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO bench_arrivals (id, status, updated_at) VALUES (NEW.id, NEW.status, NEW.updated_at);
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER bench_arrival AFTER INSERT OR UPDATE ON users
        FOR EACH ROW EXECUTE FUNCTION bench_arrival();";

const DROP_ARRIVALS: &str = "
    DROP TRIGGER IF EXISTS bench_arrival ON users;
    DROP FUNCTION IF EXISTS bench_arrival();
    DROP TABLE IF EXISTS bench_arrivals;";

const UPDATE: &str = "
    UPDATE users SET status = CASE WHEN status = 'active' THEN 'away' ELSE 'active' END,
                     updated_at = now()
     WHERE id = md5($1::int8::text)::uuid
    RETURNING id::text, pg_current_xact_id()::text, (extract(epoch FROM updated_at) * 1000000)::int8";

/// The commit time (µs since the epoch) of an xid8 given as text. pg_xact_commit_timestamp takes a
/// 32-bit xid, and PostgreSQL 15 has no xid8 → xid cast: drop the epoch through numeric.
fn commit_us(xid8_text: &str) -> String {
    format!(
        "(extract(epoch FROM pg_xact_commit_timestamp(((({xid8_text})::numeric % 4294967296)::int8)::text::xid)) \
         * 1000000)::int8"
    )
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<(LagFigures, StreamingRss)> {
    let seconds = fx.seconds.max(5);
    fx.wait_caught_up(Duration::from_secs(600)).await?;
    db::exec(&fx.target, DROP_ARRIVALS).await?;
    db::exec(&fx.target, ARRIVALS).await?;
    let result = run(fx, seconds).await;
    let dropped = db::exec(&fx.target, DROP_ARRIVALS).await;
    let figures = result?;
    dropped?;
    Ok(figures)
}

async fn run(fx: &mut Fixture<'_>, seconds: u64) -> Result<(LagFigures, StreamingRss)> {
    let pid = fx
        .daemon
        .as_ref()
        .map(|daemon| daemon.pid())
        .ok_or_else(|| Error::msg("the lag measurement needs a running rowsync daemon"))?;
    let catch_up_hwm = status_kib(pid, "VmHWM")?;
    // "5" resets the peak RSS (VmHWM) to the current RSS.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .context("resetting the daemon's peak RSS (/proc/<pid>/clear_refs)")?;

    let (stop_sampler, stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample_rss(pid, stopped));

    fx.say(&format!(
        "lag: {RATE} updates/s for {seconds} s ({WRITERS} writers at {RATE_PER_WRITER}/s)"
    ));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut writers = JoinSet::new();
    for index in 0..WRITERS {
        let client = db::connect(&fx.servers.source_url(), "source").await?;
        writers.spawn(write(client, index, fx.rows, deadline));
    }
    let mut changes = Vec::new();
    while let Some(joined) = writers.join_next().await {
        changes.extend(joined.context("a writer task failed")??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop_sampler.send(true);
    let sampled_peak = sampler.await.context("the RSS sampler failed")?;
    let hwm = status_kib(pid, "VmHWM")?;
    if let Some(daemon) = fx.daemon.as_mut() {
        daemon.ensure_running()?;
    }

    fx.wait_caught_up(Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lags = lags(fx, &changes).await?;
    let superseded = changes.len() - lags.len();
    let mut sorted = lags;
    sorted.sort_by(f64::total_cmp);
    let figures = LagFigures {
        seconds,
        writes: changes.len() as u64,
        achieved_rate_per_s: changes.len() as f64 / elapsed,
        samples: sorted.len(),
        superseded,
        p50_ms: stats::percentile(&sorted, 50.0),
        p99_ms: stats::percentile(&sorted, 99.0),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
    };
    fx.say(&format!(
        "lag: {} writes at {:.0}/s; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} superseded)",
        figures.writes,
        figures.achieved_rate_per_s,
        figures.p50_ms,
        figures.p99_ms,
        figures.max_ms,
        figures.superseded
    ));
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok((
        figures,
        StreamingRss {
            sampled_peak_mib: mib(sampled_peak),
            hwm_mib: mib(hwm),
            catch_up_hwm_mib: mib(catch_up_hwm),
        },
    ))
}

/// Updates random rows of its own (keys ≡ index mod 4) at 250/s until `deadline`.
async fn write(client: Client, index: u64, rows: u64, deadline: Instant) -> Result<Vec<Change>> {
    let statement = client
        .prepare(UPDATE)
        .await
        .context("preparing the writers' update")?;
    let mut random = SplitMix64(0x5eed_0000 + index);
    let keys_per_writer = (rows / WRITERS).max(1);
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_WRITER));
    let mut changes = Vec::new();
    loop {
        ticker.tick().await;
        if Instant::now() >= deadline {
            return Ok(changes);
        }
        let key = ((random.next() % keys_per_writer) * WRITERS + index) % rows + 1;
        let row = client
            .query_one(&statement, &[&(key as i64)])
            .await
            .context("updating a user")?;
        changes.push(Change {
            id: row.get(0),
            xid: row.get(1),
            updated_us: row.get(2),
        });
    }
}

/// Lag in ms of every change that arrived in the target as itself.
async fn lags(fx: &Fixture<'_>, changes: &[Change]) -> Result<Vec<f64>> {
    let xids: Vec<String> = changes.iter().map(|c| c.xid.clone()).collect();
    let committed: HashMap<String, i64> = fx
        .source
        .query(
            &format!("SELECT x, {} FROM unnest($1::text[]) AS x", commit_us("x")),
            &[&xids],
        )
        .await
        .context("reading source commit timestamps")?
        .into_iter()
        .filter_map(|row| Some((row.get::<_, String>(0), row.get::<_, Option<i64>>(1)?)))
        .collect();
    let mut arrived: HashMap<(String, i64), i64> = HashMap::new();
    for row in fx
        .target
        .query(
            &format!(
                "SELECT id::text, (extract(epoch FROM updated_at) * 1000000)::int8, {} \
                   FROM bench_arrivals",
                commit_us("xid::text")
            ),
            &[],
        )
        .await
        .context("reading target arrivals")?
    {
        let Some(at) = row.get::<_, Option<i64>>(2) else {
            continue;
        };
        let entry = arrived.entry((row.get(0), row.get(1))).or_insert(at);
        *entry = (*entry).min(at);
    }
    let mut lags = Vec::new();
    for change in changes {
        let (Some(&source_at), Some(&target_at)) = (
            committed.get(&change.xid),
            arrived.get(&(change.id.clone(), change.updated_us)),
        ) else {
            continue;
        };
        lags.push((target_at - source_at) as f64 / 1000.0);
    }
    Ok(lags)
}

/// Samples VmRSS every 200 ms until told to stop; returns the largest, KiB.
async fn sample_rss(pid: libc::pid_t, mut stop: tokio::sync::watch::Receiver<bool>) -> u64 {
    let mut peak = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return peak,
            _ = ticker.tick() => {
                if let Ok(rss) = status_kib(pid, "VmRSS") {
                    peak = peak.max(rss);
                }
            }
        }
    }
}

/// A `kB` field of /proc/<pid>/status.
pub(crate) fn status_kib(pid: libc::pid_t, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| Error::msg(format!("no {field} in {path}")))
}

/// A small deterministic generator (SplitMix64): the keys need to be spread, not secret.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
