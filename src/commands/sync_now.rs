//! `rowsync sync-now`: asks the running daemon for a sweep now (`POST /sync`).

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::ops::http;

/// The daemon's answer, to print. Fails when no daemon answers at `HEALTH_ADDR`.
pub async fn sync_now(settings: &Settings) -> Result<String> {
    let Some(addr) = settings.health_addr else {
        return Err(Error::Io {
            action: "HEALTH_ADDR is off, so there is no daemon to ask".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "set HEALTH_ADDR"),
        });
    };
    let (code, body) = http::request(
        addr,
        http::Method::POST,
        "/sync",
        settings.health_token.as_ref(),
    )
    .await
    .map_err(|source| Error::Io {
        action: format!("no rowsync daemon answers at {addr}"),
        source,
    })?;
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|doc| doc["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    match code {
        200 | 202 => Ok(message),
        _ => Err(Error::Io {
            action: format!("the daemon at {addr} declined: {message}"),
            source: std::io::Error::other(format!("HTTP {code}")),
        }),
    }
}
