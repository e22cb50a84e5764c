//! Measurement 5: how long a sweep that finds nothing takes on N rows, from the daemon's own
//! figures (`lastSyncDuration` in `/status`).
//!
//! The daemon is restarted with its HTTP listener on. Its first sweep also re-reads the rows
//! updated within the look-back window (the benchmark's own recent writes), so it is reported on
//! its own; then sweeps are requested with `POST /sync`, one at a time.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Context, Error, Result};
use crate::fixture::Fixture;
use crate::{db, stats};

pub(crate) const SAMPLES: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SweepFigures {
    /// The first sweep after a start (journal plus the look-back re-read).
    pub first_after_start_ms: f64,
    /// Sweeps requested with POST /sync on an idle, caught-up daemon.
    pub empty_ms: Vec<f64>,
    pub empty_median_ms: f64,
    pub empty_max_ms: f64,
}

pub(crate) async fn measure(fx: &mut Fixture<'_>) -> Result<SweepFigures> {
    fx.say("empty sweep: restarting rowsync run with its HTTP listener");
    fx.stop_daemon().await?;
    let addr = free_addr()?;
    fx.start_daemon(Some(addr)).await?;
    let first = wait_for_sweeps(fx, addr, 1, Duration::from_secs(1800)).await?;
    let first_after_start_ms = last_duration_ms(&first)?;
    fx.say(&format!(
        "empty sweep: first sweep after start took {first_after_start_ms:.0} ms"
    ));
    let mut empty_ms = Vec::new();
    let mut done = sweeps(&first)?;
    for _ in 0..SAMPLES {
        let (code, body) =
            rowsync::ops::http::request(addr, rowsync::ops::http::Method::POST, "/sync", None)
                .await
                .context("POST /sync to the daemon")?;
        if code != 200 && code != 202 {
            return Err(Error::msg(format!("POST /sync answered {code}: {body}")));
        }
        let status = wait_for_sweeps(fx, addr, done + 1, Duration::from_secs(600)).await?;
        done = sweeps(&status)?;
        empty_ms.push(last_duration_ms(&status)?);
    }
    fx.say(&format!(
        "empty sweep: requested sweeps took {empty_ms:?} ms"
    ));
    fx.stop_daemon().await?;
    Ok(SweepFigures {
        first_after_start_ms,
        empty_median_ms: stats::median(&empty_ms),
        empty_max_ms: empty_ms.iter().copied().fold(f64::NAN, f64::max),
        empty_ms,
    })
}

/// A loopback address nobody listens on right now.
pub(crate) fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    listener.local_addr().context("finding a free port")
}

/// Polls `/status` until it reports at least `count` finished sweeps; returns that document.
pub(crate) async fn wait_for_sweeps(
    fx: &mut Fixture<'_>,
    addr: SocketAddr,
    count: u64,
    timeout: Duration,
) -> Result<Value> {
    db::wait_for(
        &format!("the daemon's /status to report {count} sweeps"),
        timeout,
        Duration::from_millis(20),
        async || {
            if let Some(daemon) = fx.daemon.as_mut() {
                daemon.ensure_running()?;
            }
            let Ok((200, body)) =
                rowsync::ops::http::request(addr, rowsync::ops::http::Method::GET, "/status", None)
                    .await
            else {
                return Ok(None);
            };
            let status: Value = serde_json::from_str(&body).context("parsing /status")?;
            Ok(
                (sweeps(&status)? >= count && status["isSyncInProgress"] == false)
                    .then_some(status),
            )
        },
    )
    .await
}

pub(crate) fn sweeps(status: &Value) -> Result<u64> {
    status["sweeps"]
        .as_u64()
        .ok_or_else(|| Error::msg(format!("/status has no sweeps count: {status}")))
}

pub(crate) fn last_duration_ms(status: &Value) -> Result<f64> {
    status["lastSyncDuration"]
        .as_f64()
        .ok_or_else(|| Error::msg(format!("/status has no lastSyncDuration: {status}")))
}
