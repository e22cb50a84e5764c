//! The HTTP listener for operators (`HEALTH_ADDR`, default 127.0.0.1:9393; `off` disables it).
//!
//! - `GET /health`: 200 when HEALTHY or DEGRADED, 503 when UNHEALTHY; JSON with every check and
//!   what to do about the failing ones (see `ops::health`).
//! - `GET /status`: JSON with the figures of the seed service's `getSyncStats()` (totalSynced,
//!   lastSyncTime, lastSyncDuration, errors, consecutiveFailures, isRealTimeActive,
//!   isSyncInProgress, healthStatus) plus lag, role and per-table counts.
//! - `GET /metrics`: Prometheus text format (see [`crate::ops::metrics`]).
//! - `POST /sync`: starts a sweep now and returns at once (202), or says one is already running or
//!   queued (200); a standby answers 409.
//! - `/`, `/api/…`: the dashboard (see [`crate::ops::dashboard`]), the one part that reads the
//!   target (its `sync_runs` and `sync_errors` rows, bounded in time).
//!
//! The others read only the in-memory figures and pool counters: such a request never touches a
//! database, so they answer even when both databases are down.
//!
//! No client can wedge it, or keep the process from stopping:
//! - a request's head must arrive within `HEADER_READ_TIMEOUT` (an idle keep-alive connection
//!   counts as waiting for one), or the connection is closed;
//! - a request body may have at most `MAX_BODY_BYTES`, and at most `MAX_CONNECTIONS` are open
//!   at once (more are closed as they arrive);
//! - at shutdown the listener stops accepting and open connections get until the caller's
//!   deadline (`SHUTDOWN_TIMEOUT_SECONDS` after the signal), then they are dropped.
//!
//! And no web page can use it through an operator's browser:
//! - `POST` needs `Content-Type: application/json`, which a page on another site cannot send without
//!   a CORS preflight (answered by nobody here), and is refused when the browser says the request
//!   is cross-site (`Origin` other than the `Host`, or `Sec-Fetch-Site` other than `same-origin`).
//! - With `HEALTH_TOKEN` set, everything but `/health` needs `Authorization: Bearer <token>`
//!   (`/health` stays open for load balancers and probes; it shows no figures a token would hide).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
pub use axum::http::Method;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::HealthToken;
use crate::connection::Pools;
use crate::error::{Error, Result};
use crate::ops::dashboard;
use crate::ops::health::{self, PoolUsage, Status};
use crate::ops::status::StatusDocument;
use crate::ops::telemetry::Role;
use crate::runtime::daemon::Context;

/// Longest wait for a request's head (its request line and headers).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body accepted.
pub(crate) const MAX_BODY_BYTES: u64 = 64 * 1024;
/// Connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// What the handlers read: the daemon's figures, settings and pools, and where sweep requests go.
type AppState = Context;

/// The running listener.
pub(crate) struct Server {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stops accepting, lets open connections finish until `deadline`, then drops them.
    pub(crate) async fn stop(self, deadline: tokio::time::Instant) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            tracing::debug!(
                "closed HTTP connections that were still open at the shutdown deadline"
            );
        }
    }
}

/// Binds `addr` and serves until [`Server::stop`]. Binding happens before this returns, so a taken
/// port is reported at start-up.
pub(crate) async fn serve(addr: SocketAddr, state: Context) -> Result<Server> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            action: format!(
                "listening on HEALTH_ADDR {addr} (set HEALTH_ADDR to another address, or off)"
            ),
            source,
        })?;
    tracing::info!(
        addr = %addr,
        token = state.settings.health_token.is_some(),
        "serving the dashboard (/), /health, /status, /metrics and POST /sync"
    );
    let app = Router::new()
        .route("/health", get(health_handler))
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .route("/sync", post(sync_handler))
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/api/dashboard", get(dashboard::document))
        .route("/api/errors/retry", post(dashboard::retry))
        .route("/api/errors/resolve", post(dashboard::resolve))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES as usize))
        .with_state(state);
    let stop = CancellationToken::new();
    let task = tokio::spawn(accept(listener, app, stop.clone()));
    Ok(Server { stop, task })
}

/// Accepts connections until `stop`, then waits for the open ones to finish (the caller bounds
/// that wait).
async fn accept(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            // Cancel-safe: nothing accepted is lost but a connection not yet taken.
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::debug!(%error, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("too many HTTP connections; closing a new one");
            continue;
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// What every request passes before its handler: the token, and for `POST`, proof that it does not
/// come from a web page on another site.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let oversized = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|length| length > MAX_BODY_BYTES);
    if oversized {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request bodies may have at most {MAX_BODY_BYTES} bytes"),
        );
    }
    if let Some(token) = &state.settings.health_token
        && request.uri().path() != "/health"
        && !dashboard::is_public(request.uri().path())
        && !bearer_matches(headers, token)
    {
        let mut response = refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs the header Authorization: Bearer <HEALTH_TOKEN>".into(),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"rowsync\""),
        );
        return response;
    }
    // Without a token, a page of another site could reach the dashboard's API through DNS
    // rebinding (its name made to point at this listener: same origin to the browser). Such a
    // request is addressed to that name: answer only requests addressed to an IP or localhost.
    if state.settings.health_token.is_none()
        && dashboard::is_browser_facing(request.uri().path())
        && !addressed_by_ip(headers)
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "host",
            "without HEALTH_TOKEN the dashboard answers only requests addressed to an IP address \
             or localhost (set HEALTH_TOKEN to reach it by name)"
                .into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if let Some(problem) = cross_site(headers) {
            return refuse(StatusCode::FORBIDDEN, "cross_site", problem.into());
        }
        if !is_json(headers) {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type",
                "POST needs the header Content-Type: application/json (rowsync sync-now sends it)"
                    .into(),
            );
        }
    }
    next.run(request).await
}

fn refuse(code: StatusCode, status: &str, message: String) -> Response {
    (code, Json(json!({"status": status, "message": message}))).into_response()
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn bearer_matches(headers: &HeaderMap, token: &HealthToken) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, credentials) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(credentials.trim())
        })
    else {
        return false;
    };
    bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
}

/// Why a browser's request is cross-site, if it is.
fn cross_site(headers: &HeaderMap) -> Option<&'static str> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(HeaderName::from_static("sec-fetch-site"))
        && !site.eq_ignore_ascii_case("same-origin")
        && !site.eq_ignore_ascii_case("none")
    {
        return Some("the browser says this request comes from another site");
    }
    if let Some(origin) = text(header::ORIGIN) {
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        let host = text(header::HOST);
        if authority.is_none() || authority != host {
            return Some("the request's Origin is not this server");
        }
    }
    None
}

/// The request's `Host` is an IP address or `localhost` (with or without a port).
fn addressed_by_ip(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // [::1]:9393
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

pub(crate) fn pool_usage(pools: &Pools) -> [(&'static str, PoolUsage); 2] {
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
    let figures = state.telemetry.figures();
    let health = health::evaluate(
        &figures,
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

async fn status_handler(State(state): State<AppState>) -> Json<StatusDocument> {
    Json(StatusDocument::new(
        &state.telemetry.figures(),
        &state.settings,
        &pool_usage(&state.pools),
        SystemTime::now(),
    ))
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let text = state
        .telemetry
        .metrics()
        .render(&state.telemetry.figures(), &pool_usage(&state.pools));
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
    if state.telemetry.figures().role != Role::Active {
        return (
            StatusCode::CONFLICT,
            Json(
                json!({"status": "standby", "message": "this process is not the active instance"}),
            ),
        )
            .into_response();
    }
    // While a sweep runs, that sweep is the answer: nothing more is queued.
    if !state.telemetry.figures().sweep_in_progress && state.requests.request() {
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

/// One request to the daemon's listener, for `rowsync status` and `rowsync sync-now`: the status
/// code and body. `POST`s carry an empty JSON object; `token` goes in as a bearer token.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&HealthToken>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Error as IoError, ErrorKind};
    // A listener on every interface is reached on loopback.
    let addr = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], addr.port())),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        }
    } else {
        addr
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(IoError::other)?;
        let driver = tokio::spawn(connection);
        let mut builder = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, addr.to_string());
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let body = if method == Method::POST {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Full::new(Bytes::from_static(b"{}"))
        } else {
            Full::new(Bytes::new())
        };
        let request = builder
            .body(body)
            .map_err(|err| IoError::new(ErrorKind::InvalidInput, err))?;
        let response = sender.send_request(request).await.map_err(IoError::other)?;
        let code = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(IoError::other)?
            .to_bytes();
        driver.abort();
        Ok::<_, IoError>((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| IoError::new(ErrorKind::TimedOut, "no answer"))?
}
