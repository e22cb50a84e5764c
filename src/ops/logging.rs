//! Log output: tracing to stderr, as text for people or one JSON object per line for machines.
//!
//! Only rowsync's own events pass below `warn`: the database driver logs statements and their
//! parameters at debug level, and those may hold row contents.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::new(format!("warn,rowsync={}", settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // try_init: a second initialisation (tests) keeps the first subscriber.
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
