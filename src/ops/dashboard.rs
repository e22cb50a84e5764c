//! The dashboard at `/` on `HEALTH_ADDR`: one page and its script, embedded in the binary (no
//! CDN, no build step), and the endpoints it reads and acts through.
//!
//! - `GET /`, `GET /dashboard.js`: the page. It holds no figures, so it is served without the
//!   token; everything it shows comes from `GET /api/dashboard`, which needs the token like
//!   `/status` (the page asks for it, or takes it from the address's `#token=…`, and keeps it for
//!   the tab only). Its Content-Security-Policy allows nothing but this server, and no framing.
//! - `GET /api/dashboard`: `/status` and `/health` in one document, plus the newest `sync_runs`
//!   rows and the unresolved `sync_errors` rows, read from the target within [`DB_WAIT`] (when the
//!   target cannot answer, the document says so and the rest is still there).
//! - `POST /api/errors/retry`, `POST /api/errors/resolve`: what `rowsync errors retry` and
//!   `resolve` do. Like every `POST` here they need `Content-Type: application/json`, and are
//!   refused when the browser says they come from another site (see `ops::http`).

use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ops::health;
use crate::ops::status::StatusDocument;
use crate::runtime::daemon::Context;
use crate::target::queue::{self, ErrorFilter, Selection};

const PAGE: &str = include_str!("../../web/dashboard.html");
const SCRIPT: &str = include_str!("../../web/dashboard.js");

/// Longest wait for the target when reading its rows for the dashboard.
const DB_WAIT: Duration = Duration::from_secs(2);

/// Rows of `sync_runs` and `sync_errors` the dashboard shows.
const RUNS_SHOWN: i64 = 10;
const ERRORS_SHOWN: i64 = 50;

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                      connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                      form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

pub(crate) async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

pub(crate) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

/// Paths a browser uses for the dashboard: the page, its script and its API.
pub(crate) fn is_browser_facing(path: &str) -> bool {
    is_public(path) || path.starts_with("/api/")
}

/// Paths served without the token: the page and its script, which hold no figures.
pub(crate) fn is_public(path: &str) -> bool {
    matches!(path, "/" | "/dashboard.js")
}

/// Everything the page shows, in one document.
pub(crate) async fn document(State(state): State<Context>) -> Json<Value> {
    let figures = state.telemetry.figures();
    let pools = super::http::pool_usage(&state.pools);
    let now = SystemTime::now();
    let status = StatusDocument::new(&figures, &state.settings, &pools, now);
    let health = health::evaluate(&figures, &state.settings, &pools, now);
    let filter = ErrorFilter {
        limit: ERRORS_SHOWN,
        ..ErrorFilter::default()
    };
    let rows = tokio::time::timeout(DB_WAIT, async {
        let target = state.pools.target().await?;
        let errors = queue::unresolved(&**target, &filter).await;
        let runs = queue::last_runs(&**target, RUNS_SHOWN).await;
        Ok::<_, crate::error::Error>((errors, runs))
    })
    .await;
    let unavailable = |error: &dyn std::fmt::Display| Some(error.to_string());
    let (errors, runs, errors_unavailable, runs_unavailable) = match rows {
        Ok(Ok((errors, runs))) => {
            let (errors, errors_problem) = match errors {
                Ok(rows) => (rows, None),
                Err(err) => (Vec::new(), Some(crate::error::chain(&err))),
            };
            let (runs, runs_problem) = match runs {
                Ok(rows) => (rows, None),
                Err(err) => (Vec::new(), Some(crate::error::chain(&err))),
            };
            (errors, runs, errors_problem, runs_problem)
        }
        Ok(Err(err)) => {
            let problem = crate::error::chain(&err);
            (
                Vec::new(),
                Vec::new(),
                unavailable(&problem),
                unavailable(&problem),
            )
        }
        Err(_) => {
            let problem = format!("the target did not answer within {DB_WAIT:?}");
            (
                Vec::new(),
                Vec::new(),
                unavailable(&problem),
                unavailable(&problem),
            )
        }
    };
    Json(json!({
        "status": status,
        "health": health,
        "errors": errors,
        "runs": runs,
        "errorsUnavailable": errors_unavailable,
        "runsUnavailable": runs_unavailable,
    }))
}

/// The rows an action is for: `{"ids": [1, 2]}` or `{"all": true, "table": "public.users"}`.
#[derive(Debug, Deserialize)]
pub(crate) struct Action {
    #[serde(default)]
    ids: Vec<i64>,
    #[serde(default)]
    all: bool,
    table: Option<String>,
    /// Why they are resolved (resolve only).
    note: Option<String>,
}

impl Action {
    /// None unless exactly one of `ids` and `all` names the rows.
    fn selection(&self) -> Option<Selection> {
        match (self.all, self.ids.is_empty()) {
            (true, true) => Some(Selection::All {
                table: self.table.clone(),
            }),
            (false, false) => Some(Selection::Ids(self.ids.clone())),
            _ => None,
        }
    }
}

const UNNAMED: &str = "name the errors: {\"ids\": [...]} or {\"all\": true}";

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

fn acted(done: crate::error::Result<Vec<i64>>, asked: &Selection) -> Response {
    match done {
        Ok(done) => {
            let missing = asked.missing(&done);
            Json(json!({ "done": done, "missing": missing })).into_response()
        }
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": crate::error::chain(&err) })),
        )
            .into_response(),
    }
}

pub(crate) async fn retry(State(state): State<Context>, Json(action): Json<Action>) -> Response {
    let Some(rows) = action.selection() else {
        return bad_request(UNNAMED);
    };
    let done = async { queue::retry_now(&**state.pools.target().await?, &rows).await }.await;
    // "Retry now": the sweep that retries them starts at once (on the active process).
    if done.as_ref().is_ok_and(|ids| !ids.is_empty())
        && state.telemetry.figures().role == crate::ops::telemetry::Role::Active
    {
        state.requests.request();
    }
    acted(done, &rows)
}

pub(crate) async fn resolve(State(state): State<Context>, Json(action): Json<Action>) -> Response {
    let Some(rows) = action.selection() else {
        return bad_request(UNNAMED);
    };
    let Some(note) = action
        .note
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
    else {
        return bad_request("say why they are resolved: {\"note\": \"...\"}");
    };
    let done = async {
        queue::resolve_by_hand(&**state.pools.target().await?, &rows, note, "dashboard").await
    }
    .await;
    acted(done, &rows)
}
