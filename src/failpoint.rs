//! Deterministic crash points for the tests (the `fail` crate), at the moments where a crash is
//! hardest to survive:
//! - `batch-after-progress-lock`: a batch holds its table's progress lock and has applied nothing;
//! - `batch-after-target-commit`: the target has the batch, the source journal still has its rows;
//! - `copy-mid-stream`: the initial copy has sent part of the table.
//!
//! They exist only in test builds: the fail points are compiled in when `fail`'s `failpoints`
//! feature is on, which the tests' dev-dependency turns on, and a release build never reads
//! `FAILPOINTS`. A test sets `FAILPOINTS=name=return` and the process aborts there, as a `kill -9`
//! would stop it.

use crate::config::ConfigError;

/// Configures the fail points named in `FAILPOINTS` (`name=actions;…`), when they are compiled in.
pub fn configure(failpoints: Option<&str>) -> Result<(), ConfigError> {
    if !fail::has_failpoints() {
        return Ok(());
    }
    for entry in failpoints.unwrap_or_default().split(';') {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let configured = entry
            .split_once('=')
            .ok_or_else(|| "expected name=actions".to_string())
            .and_then(|(name, actions)| fail::cfg(name.trim(), actions.trim()));
        configured
            .map_err(|problem| ConfigError::new("FAILPOINTS", format!("{entry:?}: {problem}")))?;
    }
    Ok(())
}

/// Ends the process at once, without unwinding or cleaning up, as a crash would.
#[allow(
    dead_code,
    reason = "called only by fail points, which only test builds compile in"
)]
pub(crate) fn crash<T>(name: &str) -> T {
    eprintln!("fail point {name}: aborting the process");
    std::process::abort()
}

/// A crash point: `crash_point!("name")` aborts the process when the fail point is configured
/// with `return`, and is nothing at all in builds without fail points.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::failpoint::crash($name))
    };
}
pub(crate) use crash_point;
