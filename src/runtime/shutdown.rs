//! Signals become cancellation here, and only here.
//!
//! The first SIGTERM or SIGINT cancels the returned token: work in flight finishes, nothing new
//! starts. A second one exits at once (status 128 + signal): the operator means it, and nothing is
//! lost, because progress is only ever recorded with the rows it covers.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

pub(crate) fn on_signals() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|source| Error::Io {
        action: "installing signal handlers".into(),
        source,
    })?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut seen = false;
        while let Some(signal) = signals.next().await {
            let name = if signal == SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            if seen {
                tracing::warn!(signal = name, "second signal: exiting now");
                std::process::exit(128 + signal);
            }
            seen = true;
            tracing::info!(signal = name, "shutting down: finishing in-flight work");
            cancel.cancel();
        }
    });
    Ok(token)
}
