//! The HTTP listener for operators (`HEALTH_ADDR`, default 127.0.0.1:9393; `off` disables it).
//!
//! - `GET /health`: 200 when HEALTHY or DEGRADED, 503 when UNHEALTHY; JSON with every check and
//!   what to do about the failing ones (see [`crate::health`]).
//! - `GET /status`: JSON with the figures of the seed service's `getSyncStats()` (totalSynced,
//!   lastSyncTime, lastSyncDuration, errors, consecutiveFailures, isRealTimeActive,
//!   isSyncInProgress, healthStatus) plus lag, role and per-table counts.
//! - `GET /metrics`: Prometheus text format (see [`crate::metrics`]).
//! - `POST /sync`: starts a sweep now and returns at once (202), or says one is already running or
//!   queued (200); a standby answers 409.
//!
//! It reads only the in-memory figures and pool counters: a request never touches a database, so
//! the endpoints answer even when both databases are down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::connection::Pools;
use crate::error::{Error, Result};
use crate::health::{self, PoolUsage, Status};
use crate::metrics;
use crate::telemetry::{Role, Telemetry, rfc3339};

#[derive(Clone)]
struct AppState {
    telemetry: Arc<Telemetry>,
    settings: Arc<Settings>,
    pools: Pools,
}

/// Binds `addr` and serves until `shutdown`. Binding happens before this returns, so a taken port
/// is reported at start-up.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    settings: Arc<Settings>,
    pools: Pools,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            action: format!(
                "listening on HEALTH_ADDR {addr} (set HEALTH_ADDR to another address, or off)"
            ),
            source,
        })?;
    tracing::info!(addr = %addr, "serving /health, /status, /metrics and POST /sync");
    let app = Router::new()
        .route("/health", get(health_handler))
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .route("/sync", post(sync_handler))
        .with_state(AppState {
            telemetry,
            settings,
            pools,
        });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "the HTTP listener stopped");
        }
    }))
}

fn pool_usage(pools: &Pools) -> [(&'static str, PoolUsage); 2] {
    let usage = |pool: &deadpool_postgres::Pool| {
        let status = pool.status();
        PoolUsage {
            max_size: status.max_size,
            size: status.size,
            in_use: status.size.saturating_sub(status.available),
        }
    };
    [
        ("source", usage(&pools.source)),
        ("target", usage(&pools.target)),
    ]
}

async fn health_handler(State(state): State<AppState>) -> Response {
    let snapshot = state.telemetry.snapshot();
    let health = health::evaluate(
        &snapshot,
        &state.settings,
        &pool_usage(&state.pools),
        SystemTime::now(),
    );
    let code = if health.status == Status::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(health)).into_response()
}

/// The `/status` document.
pub fn status_document(telemetry: &Telemetry, settings: &Settings, pools: &Pools) -> Value {
    let snapshot = telemetry.snapshot();
    let usage = pool_usage(pools);
    let health = health::evaluate(&snapshot, settings, &usage, SystemTime::now());
    let totals = snapshot.totals;
    let tables: serde_json::Map<String, Value> = snapshot
        .tables
        .iter()
        .map(|(name, figures)| {
            (
                name.clone(),
                json!({
                    "created": figures.counts.created,
                    "updated": figures.counts.updated,
                    "deleted": figures.counts.deleted,
                    "unchanged": figures.counts.unchanged,
                    "failed": figures.counts.failed,
                    "pending": figures.pending,
                    "unresolved": figures.unresolved,
                    "lastBatchTime": figures.last_batch_at.map(rfc3339),
                }),
            )
        })
        .collect();
    json!({
        "totalSynced": totals.created + totals.updated + totals.deleted,
        "lastSyncTime": snapshot.last_sweep.as_ref().map(|s| rfc3339(s.finished_at)),
        "lastSyncDuration": snapshot.last_sweep.as_ref().map(|s| s.duration.as_millis() as u64),
        "errors": snapshot.errors,
        "consecutiveFailures": snapshot.consecutive_failures,
        "isRealTimeActive": snapshot.listener == crate::capture::listener::ListenerState::Listening,
        "isSyncInProgress": snapshot.sweep_in_progress,
        "healthStatus": health,
        "lagSeconds": snapshot.lag_seconds,
        "yielding": snapshot.yielding.map(|y| json!({
            "since": rfc3339(y.since),
            "sourceActiveSessions": y.active_sessions,
        })),
        "yieldedSeconds": snapshot.yielded.as_secs_f64(),
        "sourceActiveSessions": snapshot.source_active_sessions,
        "role": snapshot.role,
        "caughtUp": snapshot.caught_up,
        "startedAt": rfc3339(snapshot.started_at),
        "batches": snapshot.batches,
        "sweeps": snapshot.sweeps,
        "errorRate": snapshot.error_rate,
        "errorsByType": snapshot.errors_by_type,
        "totals": totals,
        "tables": tables,
        "pools": usage.iter().map(|(db, u)| (db.to_string(), json!(u))).collect::<serde_json::Map<_, _>>(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

async fn status_handler(State(state): State<AppState>) -> Json<Value> {
    Json(status_document(
        &state.telemetry,
        &state.settings,
        &state.pools,
    ))
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let text = metrics::render(&state.telemetry.snapshot(), &pool_usage(&state.pools));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn sync_handler(State(state): State<AppState>) -> Response {
    if state.telemetry.snapshot().role != Role::Active {
        return (
            StatusCode::CONFLICT,
            Json(
                json!({"status": "standby", "message": "this process is not the active instance"}),
            ),
        )
            .into_response();
    }
    if state.telemetry.request_sweep() {
        (
            StatusCode::ACCEPTED,
            Json(json!({"status": "started", "message": "a sweep starts now"})),
        )
            .into_response()
    } else {
        (
            StatusCode::OK,
            Json(json!({"status": "running", "message": "a sweep is already running or queued"})),
        )
            .into_response()
    }
}

/// A minimal HTTP/1.1 client for `rowsync status` and `rowsync sync-now`: one request to the
/// daemon's listener, the status code and body back.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A listener on every interface is reached on loopback.
    let addr = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        }
    } else {
        addr
    };
    let limit = std::time::Duration::from_secs(10);
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer");
    let mut stream = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out())??;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut response))
        .await
        .map_err(|_| timed_out())??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
    Ok((code, body.to_string()))
}
