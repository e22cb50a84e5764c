//! The benchmark's error: what it was doing, with the cause underneath as `source`.
//!
//! One small type for the whole binary; `main` prints it once as a chain ("error: …",
//! "caused by: …") with the library's [`rowsync::error::report`].

use std::fmt;

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug)]
pub(crate) struct Error {
    action: String,
    source: Option<Cause>,
    interrupted: bool,
}

impl Error {
    /// An error with no underlying cause.
    pub(crate) fn msg(action: impl Into<String>) -> Self {
        Self {
            action: action.into(),
            source: None,
            interrupted: false,
        }
    }

    /// The benchmark was stopped by SIGINT or SIGTERM.
    pub(crate) fn interrupted() -> Self {
        Self {
            action: "interrupted".into(),
            source: None,
            interrupted: true,
        }
    }

    pub(crate) fn is_interrupted(&self) -> bool {
        self.interrupted
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.action)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|cause| cause as &(dyn std::error::Error + 'static))
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches "what was being done" to any error.
pub(crate) trait Context<T> {
    fn context(self, action: &str) -> Result<T>;
    fn with_context(self, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E> Context<T> for std::result::Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn context(self, action: &str) -> Result<T> {
        self.with_context(|| action.to_string())
    }

    fn with_context(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|cause| Error {
            action: action(),
            source: Some(Box::new(cause)),
            interrupted: false,
        })
    }
}
