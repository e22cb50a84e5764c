//! Signals become cancellation (and reloads) here, and only here.
//!
//! The first SIGTERM or SIGINT cancels the returned token: work in flight finishes, nothing new
//! starts. A second one exits at once (status 128 + signal): the operator means it, and nothing is
//! lost, because progress is only ever recorded with the rows it covers. SIGHUP (`systemctl
//! reload`) notifies `reload`: the configuration is read again (see `commands::run`).

use std::sync::Arc;

use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

pub(crate) fn on_signals(reload: Arc<Notify>) -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|source| Error::Io {
        action: "installing signal handlers".into(),
        source,
    })?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut seen = false;
        while let Some(signal) = signals.next().await {
            if signal == SIGHUP {
                tracing::info!(signal = "SIGHUP", "reading the configuration again");
                reload.notify_one();
                continue;
            }
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
